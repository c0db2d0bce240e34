"""End to end in a real headless Chromium: type a prompt, see the grid, click a cell, append a token.

Needs Debian's `chromium` (/usr/bin/chromium) and Playwright for Python; Playwright never downloads a
browser here, it drives the system one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install playwright")
pytest.importorskip("uvicorn")

from test_server import LiveServer, tiny_viewer_lm  # noqa: E402

from forethought.server import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def base_url():
    with LiveServer(create_app(tiny_viewer_lm(), Limits(max_tokens=96))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_prompt_grid_cell_append(browser, base_url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(15_000)
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelectorAll('#metric option').length > 0")
    assert [o.get_attribute("value") for o in page.locator("#metric option").all()] == ["norm", "lens", "change"]

    page.fill("#prompt", "Once upon a time, there was a little fox")
    page.fill("#new-tokens", "4")
    page.click("#analyze")
    page.wait_for_selector("#grid .cell")
    n_tok = page.locator("#grid .tok").count()
    assert n_tok >= 6
    assert page.locator("#grid .rowlabel").all_inner_texts() == ["embed", "L0", "L1"]
    assert page.locator("#grid .cell").count() == 3 * n_tok
    assert page.locator("#grid .tok.generated").count() == 4
    assert "tokens" in page.inner_text("#cache-info") and page.inner_text("#cache-info").startswith(f"{n_tok} tokens")
    colour = page.locator('#grid .cell[data-row="1"][data-pos="1"]').evaluate("e => e.style.background")
    assert colour.startswith("rgb(")

    # Another metric and scale recolour the grid without a request.
    page.select_option("#metric", "change")
    assert "position 0" in page.inner_text("#legend-text")
    assert page.locator('#grid .cell.nan[data-pos="0"]').count() == 3
    page.select_option("#metric", "norm")
    page.select_option("#scale", "grid")

    # Click a layer cell: lens top-k, the next token, attention per head.
    page.click(f'#grid .cell[data-row="2"][data-pos="{n_tok - 2}"]')
    page.wait_for_selector("#panel h3")
    assert page.inner_text("#panel h3").startswith(f"L1 · position {n_tok - 2}")
    assert page.locator("#panel ul.bars").first.locator("li").count() == 10
    assert "actually came next" in page.inner_text("#panel")
    assert page.locator("#attention").count() == 1
    assert page.locator("#attention").evaluate("c => [c.width, c.height]") == [n_tok - 1, 4 + 1]

    # The embedding row explains why it has no attention.
    page.click('#grid .cell[data-row="0"][data-pos="0"]')
    page.wait_for_selector("#panel .note")
    assert "no attention" in page.inner_text("#panel .note")

    # Append a greedy token: one more column, the earlier ones marked unchanged, the cache grows.
    page.click("#append-greedy")
    page.wait_for_selector("#unchanged-badge:not(.hidden)")
    badge = page.inner_text("#unchanged-badge")
    assert f"columns 0..{n_tok - 1} unchanged (max |diff|" in badge, badge
    assert page.locator("#grid .tok").count() == n_tok + 1
    assert page.locator("#grid .tok.unchanged").count() == n_tok
    assert page.locator("#grid .tok.appended").count() == 1
    assert page.inner_text("#cache-info").startswith(f"{n_tok + 1} tokens")

    # Typed text goes through the same path.
    page.fill("#append-text", " fox")
    page.click("#append-typed")
    page.wait_for_function(f"document.querySelectorAll('#grid .tok').length === {n_tok + 2}")
    assert "unchanged" in page.inner_text("#unchanged-badge")
    page.click(f'#grid .cell[data-row="1"][data-pos="{n_tok + 1}"]')
    page.wait_for_selector("#attention")

    assert not errors, errors  # no script errors, no failed requests so far

    # Errors from the server are shown, not swallowed.
    page.fill("#prompt", "")
    page.click("#analyze")
    page.wait_for_selector("#error:not(.hidden)")
    assert "empty" in page.inner_text("#error")

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert [e for e in errors if "status of 400" not in e] == [], errors  # only the 400 we asked for
    page.close()

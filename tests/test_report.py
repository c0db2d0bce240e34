"""`forethought report` on the tiny random Llama: every section present, a failing one isolated, the cache reused,
other commands' JSON results picked up, and the page rendered in a real Chromium without console errors."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import _CORPUS

from forethought.cli import main
from forethought.report import (
    SECTIONS,
    Figure,
    Finding,
    ReportContext,
    ReportSettings,
    Section,
    run_report,
    write_report,
)

UNAVAILABLE = {"second_model", "where_it_plans"}  # answered only with --compare or --results
BUILTIN = [s.key for s in SECTIONS if s.key not in UNAVAILABLE]
TINY = ReportSettings(
    equivalence_steps=4,
    lens_steps=3,
    future_tokens=2500,
    future_layers=2,
    future_offsets=2,
    future_window=32,
    future_doc_tokens=32,
    future_eval_tokens=256,
    anatomy_docs=8,
    anatomy_length=24,
    revise_steps=4,
    state_tokens=(1, 10, 100),
    plan_offsets=(1, 2, 4),
    plan_positions=24,
    plan_max_prefix=20,
    plan_ceiling_offsets=(1, 2),
    plan_ceiling_positions=None,
    plan_rollouts=2,
    plan_n_boot=100,
    speculative_tokens=8,
    arch_preset="smoke",
)


def _boom(ctx, folder):
    raise RuntimeError("this section always fails")


BOOM = Section("boom", "A section that fails", "Does one failure spare the rest?", _boom, lambda ctx: {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    words = " ".join(_CORPUS).split()
    rng = random.Random(0)
    for i in range(48):  # enough documents that the hash split puts some on the test side
        # words in random order: no held-out document is a near-copy of a training one (those are dropped)
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(40)))
    return folder


@pytest.fixture(scope="module")
def built(llama_dir, corpus, tmp_path_factory):
    """One report of every section plus one that fails; returns (ctx, cache, out, report, seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("report")
    ctx = ReportContext(model=str(llama_dir), corpus=str(corpus), settings=TINY)
    started = time.perf_counter()
    report = run_report(ctx, [*SECTIONS, BOOM], cache, command="forethought report (test)")
    write_report(report, out)
    return ctx, cache, out, report, time.perf_counter() - started


def test_every_section_is_answered_or_says_why(built):
    _, _, out, report, _ = built
    by_key = {o.key: o for o in report.outcomes}
    assert list(by_key) == [s.key for s in SECTIONS] + ["boom"]
    for key in BUILTIN:
        assert by_key[key].status == "ok", (key, by_key[key].reason)
        assert by_key[key].finding.verdict and by_key[key].finding.figures
    for key in UNAVAILABLE:
        assert by_key[key].status == "unavailable"
    assert "no second model's report to compare with" in by_key["second_model"].reason
    assert "no plan map to show" in by_key["where_it_plans"].reason
    assert by_key["boom"].status == "failed"
    assert "RuntimeError: this section always fails" in by_key["boom"].reason
    assert by_key["invariance"].finding.numbers["causal_unchanged"] is True
    assert by_key["invariance"].finding.numbers["control_unchanged"] is False  # the control must fail
    assert by_key["equivalence"].finding.numbers["identical_tokens"] is True
    plan = by_key["plan"].finding
    assert plan.verdict.startswith("Setting: at k = 1")
    assert "Does h_t carry anything about later tokens beyond its context?" in plan.verdict
    assert "Used? Hiding one key" in plan.verdict
    assert [f.file for f in plan.figures] == ["plan_horizon.png", "plan_causal.png", "plan_steering.png"]
    for k in (1, 2, 4):  # the horizon: per offset, what h_t adds to the baseline features, with its interval
        low, high = plan.intervals[f"k{k}_h_adds"]
        assert low <= plan.numbers[f"k{k}_h_adds"] <= high
        assert f"k={k} {100 * plan.numbers[f'k{k}_h_adds']:+.1f}" in plan.verdict
    assert plan.numbers["causal_positions"] > 0 and "knockout_t@0_minus_random_t+2" in plan.intervals
    spec = by_key["speculative"].finding
    assert spec.numbers["greedy_identical"] is True  # drafting never changes greedy text
    assert spec.numbers["lookup_tokens_per_forward"] >= 1.0
    assert "heads" in spec.data["skipped"]  # no heads ship for the tiny model: said, not hidden
    arch = by_key["architectures"].finding
    assert "myopia_gap_repeat_L1_loss" in arch.intervals and arch.figures


def test_json_and_markdown_carry_the_same_numbers(built):
    _, _, out, report, _ = built
    saved = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    for o, s in zip(report.outcomes, saved["sections"]):
        assert s["key"] == o.key and s["status"] == o.status
        if o.finding is None:
            assert o.reason in markdown
            continue
        assert s["numbers"] == json.loads(json.dumps(o.finding.numbers))
        assert o.finding.verdict in markdown
        for f in s["figures"]:
            assert (out / f["file"]).stat().st_size > 1000 and f["file"] in markdown
    fl = saved["sections"][[o.key for o in report.outcomes].index("future_lens")]
    low, high = fl["intervals"]["probe_top1"]
    assert low <= fl["numbers"]["probe_top1"] <= high
    assert saved["meta"]["model"]["description"]["config"]["n_layers"] == 2
    assert saved["meta"]["versions"]["torch"]


def test_second_run_reuses_the_cache(built):
    ctx, cache, out, first, seconds = built
    fresh = ReportContext(model=ctx.model, corpus=ctx.corpus, settings=TINY)
    started = time.perf_counter()
    again = run_report(fresh, SECTIONS, cache)
    took = time.perf_counter() - started
    assert all(o.cached for o in again.outcomes if o.status == "ok")
    assert not fresh._loaded, "a fully cached report must not load the model"
    assert took < max(1.0, seconds / 5), (took, seconds)
    before = {o.key: o.finding.numbers for o in first.outcomes if o.finding}
    assert {o.key: o.finding.numbers for o in again.outcomes if o.finding} == before
    # other settings are another key: the changed section runs again, the others stay cached
    changed = run_report(replace(fresh, settings=replace(TINY, lens_steps=2)), SECTIONS[:4], cache)
    assert [o.cached for o in changed.outcomes] == [True, True, True, False]


def test_the_second_model_section_reads_another_runs_json(built, tmp_path):
    ctx, cache, _, report, _ = built
    png = next(o for o in report.outcomes if o.key == "lens").folder / "lens.png"
    (tmp_path / "plot.png").write_bytes(png.read_bytes())
    finding = Finding(
        "Yes, 3 tokens ahead.",
        numbers={"horizon": 3, "knockout_drop": 0.12},
        intervals={"knockout_drop": [0.08, 0.16]},
        figures=[Figure("plot.png", "A plot.", "forethought plan --plot plot.png")],
        commands=["forethought plan --json"],
    )
    (tmp_path / "second_model.json").write_text(json.dumps(finding.to_dict()))
    second = [s for s in SECTIONS if s.key == "second_model"]
    result = run_report(replace(ctx, results_dir=tmp_path, _loaded={}), second, cache).outcomes[0]
    assert result.status == "ok", result.reason
    assert result.finding.numbers == {"horizon": 3, "knockout_drop": 0.12}
    assert (result.folder / "plot.png").is_file()


def test_a_second_models_report_side_by_side(built):
    ctx, cache, out, _, _ = built
    sections = [s for s in SECTIONS if s.key in ("invariance", "second_model")]
    other = replace(ctx, compare=out, findings={}, _loaded={})
    outcome = run_report(other, sections, cache).outcomes[1]
    assert outcome.status == "ok", outcome.reason
    assert outcome.finding.numbers["invariance.causal_unchanged"] == "True vs True"
    missing = replace(ctx, compare=out / "nowhere", findings={}, _loaded={})
    assert "no report.json there" in run_report(missing, sections, cache).outcomes[1].reason


def test_cli_report_and_its_errors(llama_dir, corpus, tmp_path, capsys):
    args = ["report", "--model", str(llama_dir), "--corpus", str(corpus), "--cache", str(tmp_path / "c")]
    assert main([*args, "--out", str(tmp_path / "r"), "--sections", "nope"]) == 2
    assert "unknown section 'nope'" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "r"), "--sections", "invariance,second_model", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in printed["sections"]] == ["ok", "unavailable"]
    assert (tmp_path / "r" / "index.html").read_text().count("data:image/png;base64,") == 1
    assert main(["report", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "r")]) == 2


def test_page_renders_in_chromium(built, tmp_path):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install playwright")
    _, _, out, report, _ = built
    n_figures = sum(len(o.finding.figures) for o in report.outcomes if o.finding)
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        requests: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "index.html").as_uri())
        for o in report.outcomes:
            card = page.locator(f"section#{o.key}")
            assert card.get_attribute("data-status") == o.status
            assert o.title in card.inner_text()
        assert "not available in this install" in page.inner_text("section#second_model")
        assert "Does h_t carry anything about later tokens beyond its context?" in page.inner_text("section#plan")
        assert page.locator("section#plan img").count() == 3
        assert "this section always fails" in page.inner_text("section#boom")
        images = page.locator("img")
        assert images.count() == n_figures
        assert images.evaluate_all("imgs => imgs.every(i => i.complete && i.naturalWidth > 100)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing fetched


# ---------------------------------------------------------------------------------------------- cache integrity


def _counting_section(calls: list) -> Section:
    """A model-free section: one number, one figure; `calls` counts how often it really ran."""

    def run(ctx, folder):
        calls.append(1)
        (folder / "fig.png").write_bytes(b"\x89PNG" + bytes(range(256)) * 4)
        return Finding("64 bytes per token.", numbers={"bytes_per_token": 64}, figures=[Figure("fig.png", "c", "x")])

    return Section("count", "Counting", "How often?", run, lambda ctx: {})


@pytest.mark.parametrize(
    "damage", ["digit", "truncate", "figure_cut", "figure_gone", "hashes_gone", "hashes_edited", "finding_gone"]
)
def test_a_damaged_cache_entry_is_recomputed_never_shown(tmp_path, damage):
    from forethought.report.runner import run_section

    calls: list = []
    section, ctx, model = _counting_section(calls), ReportContext(model="m"), {"fingerprint": "f"}
    first = run_section(section, ctx, model, tmp_path, use_cache=True)
    again = run_section(section, ctx, model, tmp_path, use_cache=True)
    assert first.status == again.status == "ok" and again.cached and len(calls) == 1  # the control: served
    folder, finding = again.folder, again.folder / "finding.json"
    if damage == "digit":  # the case: 64 -> 94 must never reach the page
        finding.write_text(finding.read_text().replace("64", "94"))
    elif damage == "truncate":
        finding.write_bytes(finding.read_bytes()[:20])
    elif damage == "figure_cut":
        (folder / "fig.png").write_bytes(b"\x89PNG")
    elif damage == "figure_gone":
        (folder / "fig.png").unlink()
    elif damage == "hashes_gone":
        (folder / "sha256.json").unlink()
    elif damage == "hashes_edited":
        (folder / "sha256.json").write_text(json.dumps({"finding.json": "0" * 64}))
    else:
        finding.unlink()
    third = run_section(section, ctx, model, tmp_path, use_cache=True)
    assert third.status == "ok" and not third.cached and len(calls) == 2, third.reason
    assert third.finding.numbers == {"bytes_per_token": 64}
    fourth = run_section(section, ctx, model, tmp_path, use_cache=True)  # repaired: served from the cache again
    assert fourth.cached and fourth.finding.numbers == {"bytes_per_token": 64} and len(calls) == 2


def test_cached_json_with_its_own_hash(tmp_path):
    from forethought.report.cache import read_json, write_json

    path = tmp_path / "model-x.json"
    write_json(path, {"n_params": 134515008, "name": "m"})
    assert read_json(path) == {"n_params": 134515008, "name": "m"}
    path.write_text(path.read_text().replace("134515008", "134515009"))
    assert read_json(path) is None  # rebuilt by the caller, not shown
    path.write_text("{")
    assert read_json(path) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"verdict": 5}',
        '{"verdict": "v", "numbers": [1]}',
        '{"verdict": "v", "numbers": {"a": {"b": 1}}}',
        '{"verdict": "v", "intervals": {"a": [2, 1]}}',
        '{"verdict": "v", "figures": [{"file": "/etc/passwd", "caption": "c", "command": "c"}]}',
        '{"verdict": "v", "figures": [{"file": "a.png"}]}',
        '{"verdict": "v", "commands": "c"}',
    ],
)
def test_finding_fields_are_type_checked(text):
    with pytest.raises(ValueError):
        Finding.from_dict(json.loads(text))


def test_report_inputs_are_one_line_before_work(tmp_path, capsys):
    out_file = tmp_path / "f"
    out_file.write_text("x")
    bad_compare = tmp_path / "c.json"
    bad_compare.write_text('{"meta": {"model": {"name": "x"}, "mode": "q", "started": "t"}, "sections": [1]}')
    results = tmp_path / "results"
    results.mkdir()
    (results / "second_model.json").write_text('{"verdict": "v", "numbers": [1]}')
    for extra, words in (
        (["--out", str(out_file)], ("--out", "ENOTDIR")),
        (["--out", str(tmp_path / "r"), "--compare", str(bad_compare)], ("--compare", "sections[0]")),
        (["--out", str(tmp_path / "r"), "--results", str(results)], ("--results", "numbers")),
        (["--out", str(tmp_path / "r"), "--results", str(out_file)], ("--results", "is a file")),
    ):
        code = main(["report", "--model", str(tmp_path / "never-loaded.gguf"), "--cache", str(tmp_path / "c"), *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err


def test_future_store_keeps_float32_where_the_residual_outgrows_float16(llama_dir, corpus, tmp_path):
    """Gemma 3's residual stream reaches ~1e5, past float16's 65,504: the report's Future Lens store is float32
    for its family (the quick report failed two sections on it before), float16 elsewhere."""
    import torch

    from forethought.errors import ForethoughtError
    from forethought.experiments.future import run_extract
    from forethought.model.random_init import random_model, tiny_config
    from forethought.report.builtin import future_store
    from forethought.weights.registry import LoadedModel, load_model

    tokenizer = load_model(str(llama_dir)).tokenizer
    gemma = random_model(tiny_config("gemma3", vocab_size=tokenizer.vocab_size), seed=0)
    with torch.no_grad():
        gemma.embed.mul_(1e5)  # a residual far past float16's range, as on the real model
    ctx = ReportContext(model=str(llama_dir), corpus=str(corpus), settings=TINY, work_dir=tmp_path)
    ctx._loaded["float32"] = LoadedModel(gemma, tokenizer, "tiny-gemma3", llama_dir)
    store, layers, _, command = future_store(ctx)
    assert "--float16" not in command and store.settings["dtype"] == "float32"
    with pytest.raises(ForethoughtError, match="overflows float16"):  # control: float16 storage fails here
        run_extract(ctx._loaded["float32"], str(corpus), ctx.work_dir / "f16", layers, 600, window=64, float16=True)

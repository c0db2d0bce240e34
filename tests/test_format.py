"""The shared pieces of the house: how numbers read (forethought.format), integer lists (commands.common), and the
probe file's one owner (experiments.probe_file) as the viewer and `revise` read it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from forethought import format as fmt
from forethought.commands.common import parse_int_list
from forethought.errors import ForethoughtError
from forethought.experiments.probe_file import cells_of, load_probe_layer, probe_metadata, save_probe_layer


def test_sizes_are_decimal_with_three_significant_digits():
    assert fmt.size(999) == "999 B"
    assert fmt.size(1000) == "1 kB"
    assert fmt.size(46_080) == "46.1 kB"
    assert fmt.size(377_487_360) == "377 MB"
    assert fmt.size(1.5e9) == "1.5 GB"
    assert fmt.size(None) == fmt.size(float("nan")) == fmt.MISSING


def test_percentages_and_intervals():
    assert fmt.percent(0.1234) == "12.3%"
    assert fmt.percent(0.1234, unit="") == "12.3"
    assert fmt.percent(-0.021, sign=True, unit="") == "-2.1"
    assert fmt.percent(None) == fmt.MISSING
    iv = SimpleNamespace(estimate=-0.021, low=-0.036, high=-0.007)
    assert fmt.interval(iv, sign=True) == "-2.1 [-3.6, -0.7]"
    assert fmt.interval(iv, unit="%") == "-2.1% [-3.6%, -0.7%]"
    assert fmt.interval(SimpleNamespace(estimate=1.38, low=1.15, high=1.62), digits=2, scale=1) == "1.38 [1.15, 1.62]"
    assert fmt.interval(None) == fmt.MISSING
    assert fmt.plus_minus({"mean": 0.65, "ci95": 0.031}, scale=100, digits=1) == "65.0 ± 3.1"
    assert fmt.plus_minus({"mean": 0.65, "ci95": math.nan}) == "0.650"


def test_numbers_and_tokens():
    assert fmt.number(12345) == "12,345" and fmt.number(0.000123) == "0.000123" and fmt.number(3.14159) == "3.142"
    assert fmt.number(True) == "True" and fmt.number([1, 2]) == "[1, 2]"
    assert fmt.short_token("\n") == "\\n" and fmt.short_token("  ") == "␣␣" and fmt.short_token("") == "∅"
    assert fmt.short_token("abcdefghij", 5) == "abcd…"


def test_one_integer_list_parser():
    assert parse_int_list("0-3,8", "layers") == [0, 1, 2, 3, 8]
    assert parse_int_list("all", "layers", upper=3) == [0, 1, 2]
    assert parse_int_list(" ", "eval-lengths", empty_ok=True) == []
    for bad, message in (("x", "use 'all'"), ("", "is empty"), ("5", "0..3")):
        with pytest.raises(ForethoughtError, match=message):
            parse_int_list(bad, "layers", upper=4)


def _cell(offset: int, temperature: float) -> SimpleNamespace:
    return SimpleNamespace(
        offset=offset,
        probe_lambda=1e-3,
        lens_lambda=1e-2,
        probe_temperature=temperature,
        lens_temperature=2.0,
        probe_val_top1=0.25,
    )


def test_probe_file_round_trip_and_apply(tmp_path):
    """Saved by the owner, read back by the owner; applying it equals the formula written out here."""
    d, n_columns = 6, 5
    g = torch.Generator().manual_seed(0)
    tensors = {
        "mean": torch.randn(d, generator=g),
        "std": torch.rand(d, generator=g) + 0.5,
        "columns": torch.tensor([7, 3, 9, 1, 4], dtype=torch.int32),
        "probe.2": torch.randn(d + 1, n_columns, generator=g),
        "lens.2": torch.randn(d + 1, d, generator=g),
    }
    meta = probe_metadata(4, [_cell(2, 0.5)], model="tiny", store="store/")
    assert meta["point"] == "blocks.4.resid_post" and meta["cells"][0]["probe_lambda_per_token"] == 1e-3
    probe = load_probe_layer(save_probe_layer(tmp_path, 4, tensors, meta), d_model=d, readouts=("probe", "lens"))
    assert probe.layer == 4 and probe.offsets == [2] and probe.temperature(2) == 0.5
    assert probe.temperature(2, "lens") == 2.0 and probe.temperature(3) == 1.0
    h = torch.randn(3, d, generator=g)
    z = torch.cat([(h - tensors["mean"]) / tensors["std"], torch.ones(3, 1)], dim=1)
    torch.testing.assert_close(probe.token_probs(h, 2), torch.softmax(0.5 * z @ tensors["probe.2"], dim=-1))
    torch.testing.assert_close(probe.future_lens_states(h, 2), z @ tensors["lens.2"])
    with pytest.raises(ForethoughtError, match="width 6"):
        load_probe_layer(tmp_path / "probe-layer04.safetensors", d_model=7)
    del tensors["lens.2"]
    save_probe_layer(tmp_path, 5, tensors, probe_metadata(5, [_cell(2, 0.5)], model="tiny", store="store/"))
    with pytest.raises(ForethoughtError, match="lacks a probe.k / lens.k tensor"):
        load_probe_layer(tmp_path / "probe-layer05.safetensors", readouts=("probe", "lens"))


def test_cells_are_parsed_in_one_place():
    meta = {
        "cells": [
            {"offset": 3, "probe_temperature": 0.0, "lens_temperature": "hot"},  # unusable temperatures read as 1
            {"offset": 1, "probe_temperature": 0.7},
            {"offset": "2"},  # not an offset: skipped
            "junk",
        ]
    }
    cells = cells_of(meta)
    assert list(cells) == [1, 3]
    assert cells[1].probe_temperature == 0.7 and cells[1].lens_temperature == 1.0
    assert cells[3].probe_temperature == 1.0 and cells[3].lens_temperature == 1.0
    assert cells_of({}) == {} and cells_of({"cells": "x"}) == {}

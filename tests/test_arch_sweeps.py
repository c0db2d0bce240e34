"""The architectures lab's depth and length sweeps: evaluation at other lengths on models trained in a second, the
aggregation over seeds on hand-made numbers, and the smoke preset through table, markdown and PNGs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from forethought.arch.compare import PRESETS, RunSummary, run_comparison
from forethought.arch.config import ArchConfig
from forethought.arch.sweeps import depth_sweep, evaluate_lengths, length_record, length_sweep, sweep_lengths
from forethought.arch.tasks import build_task
from forethought.arch.train import TrainSettings, evaluate, train
from forethought.errors import ForethoughtError


def trained(arch: str, task):
    torch.set_num_threads(1)
    config = ArchConfig(arch, task.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32, context_length=32)
    settings = TrainSettings(steps=150, batch_size=16, lr=1e-2, warmup=10, seed=0, eval_batches=1)
    return train(config, task, settings)


def test_a_gru_keeps_parity_at_four_times_its_length_where_a_one_layer_decoder_falls_to_chance():
    """Trained on 8-bit running parity: the GRU's one-bit state is right at the end of 32-bit sequences; the 1-layer
    standard decoder (the control that must fail) is at chance on their last quarter, though it learned position 1."""
    task = build_task("parity", length=8)
    gru, gru_result = trained("recurrent", task)
    standard, standard_result = trained("standard", task)
    at = evaluate_lengths(gru, task, [8, 32], batches=1)
    # At its own length the sweep is the training loop's evaluation, number for number.
    assert at[8].accuracy == gru_result.final.accuracy and at[8].loss == gru_result.final.loss
    assert length_record(at)[32]["tail_accuracy"] > 0.95
    control = length_record(evaluate_lengths(standard, task, [8, 32], batches=1))
    assert standard_result.final.by_position[0] > 0.95  # it trained
    assert 0.35 < control[32]["tail_accuracy"] < 0.65
    with pytest.raises(ForethoughtError, match=r"^evaluation length 33 is outside 1\.\.32 \(the model's context"):
        evaluate_lengths(gru, task, [8, 33])
    assert evaluate(gru, task, 1, 64, 16).accuracy == evaluate_lengths(gru, task, [16], batches=1)[16].accuracy


def run(task: str, layers: int, arch: str, seed: int, accuracy: float, by_length: dict) -> RunSummary:
    return RunSummary(task, layers, arch, seed, 10, accuracy, 0.5, [], 1.0, [], 1.0, by_length)


def test_sweep_aggregation_on_hand_made_numbers():
    def at(tail: float) -> dict:
        return {"accuracy": 1.0, "tail_accuracy": tail, "loss": 0.1}

    runs = [
        run("parity", 1, "standard", 0, 0.6, {8: at(1.0), 16: at(0.5)}),
        run("parity", 1, "standard", 1, 0.6, {8: at(1.0), 16: at(0.75), 32: at(0.5)}),  # 32: only one seed has it
        run("parity", 1, "standard", 2, 0.6, {8: at(1.0), 16: at(1.0)}),
    ]
    (sweep,) = length_sweep(runs, {"parity": 8})
    assert sweep["train_length"] == 8 and [p["length"] for p in sweep["points"]] == [8, 16]
    sixteen = sweep["points"][1]["tail_accuracy"]
    assert sixteen["mean"] == pytest.approx(0.75) and sixteen["n"] == 3
    assert sixteen["ci95"] == pytest.approx(4.303 * 0.25 / 3**0.5)  # t(2) x sd / sqrt(n)
    iv = {"mean": 0.5, "ci95": 0.1, "n": 3, "values": [0.4, 0.5, 0.6]}
    table = [
        {"task": "parity", "layers": n, "arch": "feedback", "accuracy": iv | {"mean": m}}
        for n, m in ((4, 0.9), (1, 0.7), (2, 0.8))
    ]
    table += [{"task": "repeat", "layers": 2, "arch": "feedback", "accuracy": iv}]  # one depth: no sweep
    table += [{"task": "text", "layers": n, "arch": "feedback", "accuracy": iv} for n in (1, 2)]  # loss task: none
    (depth,) = depth_sweep(table, {"parity": 16, "repeat": 24, "text": 64})
    assert depth["length"] == 16 and [(p["layers"], p["accuracy"]["mean"]) for p in depth["points"]] == [
        (1, 0.7),
        (2, 0.8),
        (4, 0.9),
    ]
    assert sweep_lengths(16, (0.5, 1, 2, 4)) == [8, 16, 32, 64] and sweep_lengths(3, (0.1, 0.25)) == [1]


def test_smoke_preset_sweeps_reach_the_table_markdown_and_pngs(tmp_path, monkeypatch):
    from forethought.viz.arch import markdown, plot_all

    torch.set_num_threads(1)
    result = run_comparison(PRESETS["smoke"], tmp_path)
    assert {(d["arch"], tuple(p["layers"] for p in d["points"])) for d in result.depth_sweep} == {
        (a, (1, 2)) for a in ("standard", "feedback", "myopic", "recurrent")
    }
    assert len(result.length_sweep) == 8  # 4 architectures x 2 depths
    assert {s["train_length"] for s in result.length_sweep} == {8}
    assert all([p["length"] for p in s["points"]] == [4, 8, 16, 32] for s in result.length_sweep)
    assert (tmp_path / "runs" / "parity-L2-feedback-s1" / "lengths.json").is_file()
    text = markdown(result)
    assert "Accuracy vs number of layers: parity at its training length 8" in text
    assert "Length generalisation: parity trained at length 8" in text and "| n = 32 |" in text
    names = {p.name for p in plot_all(result, tmp_path / "png")}
    assert {"arch_accuracy_by_position.png", "arch_accuracy_vs_depth.png", "arch_length_generalisation.png"} <= names

    # A rerun reads every length sweep back from the run folders: nothing is evaluated again.
    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr("forethought.arch.compare.evaluate_lengths", refuse)
    again = run_comparison(PRESETS["smoke"], tmp_path, train_missing=False)
    assert again.length_sweep == result.length_sweep
    # A preset with another budget in the same folder is refused, not silently given these runs.
    longer = replace(PRESETS["smoke"], plans=tuple(replace(p, steps=4) for p in PRESETS["smoke"].plans))
    with pytest.raises(ForethoughtError, match="other training settings; choose a new --out"):
        run_comparison(longer, tmp_path)

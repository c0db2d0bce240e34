"""`forethought arch` at the command line: a tiny run whose engine folder the other commands read; bad flags exit 2."""

from __future__ import annotations

import json

import pytest

from forethought.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_checkpoint_the_engine_loads(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["arch", "train", "--arch", "standard", "--task", "repeat", "--steps", "4", "--batch", "4"]
    code, stdout, _ = run(capsys, *args, "--d-model", "16", "--heads", "2", "--d-ff", "32", "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["steps_done"] == 4 and 0 <= summary["final"]["accuracy"] <= 1
    # The exported folder is an ordinary model for every engine command.
    code, stdout, _ = run(capsys, "info", "--model", summary["engine_folder"], "--json")
    assert code == 0
    assert json.loads(stdout)["config"]["n_layers"] == 2
    # A rerun with the same settings resumes (nothing left to do), one with another shape is refused.
    code, stdout, _ = run(capsys, *args, "--d-model", "16", "--heads", "2", "--d-ff", "32", "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["steps_done"] == 4
    code, _, err = run(capsys, *args, "--d-model", "32", "--out", str(out))
    assert code == 2 and err.startswith("error: ") and "another config" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["arch", "train", "--arch", "transformer-xl", "--out", "x"], "unknown architecture"),
        (["arch", "train", "--task", "sorting", "--out", "x"], "unknown task"),
        (["arch", "train", "--d-model", "30", "--heads", "4", "--out", "x"], "heads of even size"),
        (["arch", "train", "--steps", "0", "--out", "x"], "--steps"),
        (["arch", "compare", "--preset", "huge"], "unknown preset"),
        (["arch", "compare", "--archs", "standard,lstm"], "unknown architecture"),
        (["arch", "compare", "--tasks", "chess"], "--tasks"),
        (["arch", "compare", "--layers", "3"], "--layers"),
        (["arch", "compare", "--layers", "one"], "--layers"),
        (["arch", "train", "--eval-lengths", "8,300", "--out", "x"], "evaluation length 300 is outside 1..256"),
        (["arch", "train", "--task", "recall", "--eval-lengths", "8", "--out", "x"], "one length"),
    ],
)
def test_bad_input_is_one_error_line(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err, err

"""The lab's files that cannot half-exist and the values it refuses, in-process and in milliseconds (the hostile
cases through the CLI, kills included, are tests/test_fuzz_lab.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from forethought.arch import checkpoint
from forethought.arch.budget import check_fits, training_bytes
from forethought.arch.config import ArchConfig
from forethought.arch.tasks import build_task
from forethought.arch.train import TrainSettings, check_state, read_state, train
from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.weights import validate


def _tiny(tmp_path, steps=4, checkpoint_every=2):
    task = build_task("recall", pairs=3)
    config = ArchConfig("standard", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    settings = TrainSettings(steps=steps, batch_size=4, warmup=1, eval_batches=1, checkpoint_every=checkpoint_every)
    return config, task, settings


def test_a_failed_checkpoint_write_leaves_the_previous_one_current(tmp_path, monkeypatch):
    """The write of the step-4 checkpoint fails after the weights are on disk (the optimizer's torch.save raises,
    as a full disk would): the step-2 checkpoint stays current and whole, and nothing of the failed one is left."""
    config, task, settings = _tiny(tmp_path)
    uninterrupted, _ = train(config, task, settings, export=False)
    calls = []
    original = torch.save

    def failing_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_second_save)
    with pytest.raises(ForethoughtError, match="cannot write the checkpoint .No space left on device"):
        train(config, task, settings, tmp_path, export=False)
    monkeypatch.setattr(torch, "save", original)
    assert read_state(tmp_path)["steps_done"] == 2
    assert [p.name for p in tmp_path.glob("ckpt-*")] == [checkpoint.current(tmp_path).name]
    resumed, result = train(config, task, settings, tmp_path, export=False)
    assert result.steps_done == 4
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit: optimizer state and RNG restored exactly


def test_resume_refuses_a_flipped_byte(tmp_path):
    config, task, settings = _tiny(tmp_path, steps=2)
    train(config, task, settings, tmp_path, export=False)
    weights = checkpoint.current(tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1  # a weight's low bit: a valid file, a different model
    weights.write_bytes(bytes(data))
    with pytest.raises(ForethoughtError, match="does not match its sha256"):
        train(config, task, settings, tmp_path, export=False)


def _state(**final) -> dict:
    config, _, settings = _tiny(None)
    from dataclasses import asdict

    return {
        "config": config.to_dict(),
        "settings": asdict(settings),
        "steps_done": 4,
        "history": [{"step": i, "train_loss": 1.0, "flops": 1.0} for i in range(4)],
        "train_seconds": 1.0,
        "train_tokens": 10,
        "evals": [],
        "final": {"accuracy": 0.5, "loss": 1.0, "by_position": [0.5, math.nan]} | final,
    }


@pytest.mark.parametrize(
    "final, message",
    [({"accuracy": 7.5}, "accuracy 7.5"), ({"loss": -3}, "loss -3"), ({"by_position": [2.0]}, "by_position")],
)
def test_impossible_results_are_refused(tmp_path, final, message):
    check_state(_state(), tmp_path)  # the control: a possible result passes
    with pytest.raises(ForethoughtError, match=message):
        check_state(_state(**final), tmp_path)


def test_memory_is_estimated_before_allocation():
    small = ArchConfig("standard", vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    check_fits(small, 4, 24)
    huge = ArchConfig("standard", vocab_size=16, d_model=2**20, n_layers=2, n_heads=2, d_ff=32)
    assert training_bytes(huge, 4, 24) > 2**40
    with pytest.raises(ForethoughtError, match="needs about"):
        check_fits(huge, 4, 24)
    with pytest.raises(ForethoughtError, match="more than the lab's"):
        check_fits(ArchConfig("recurrent", vocab_size=16, d_model=16, n_layers=10**9, n_heads=2, d_ff=32), 4, 24)


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0, -1.0])
def test_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(ForethoughtError, match="--lr"):
        TrainSettings(lr=lr)


def _lab_config(family: str, **extra) -> dict:
    kind = {"llama": "forethought_llama"}.get(family, f"forethought_{family}")
    arch = {"llama": "standard"}.get(family, family)
    return {"model_type": kind, "forethought_arch": {"arch": arch, "task": {"task": "parity"}}} | extra


@pytest.mark.parametrize(
    "raw, message",
    [
        (_lab_config("feedback", model_type="forethought_recurrent"), "cannot be a 'forethought_recurrent'"),
        (_lab_config("recurrent", use_rope=True), "use_rope does not apply to a GRU"),
        (_lab_config("feedback", forethought_arch="feedback"), "forethought_arch must be an object"),
        (_lab_config("llama", use_rope="no"), "use_rope must be true or false"),
        ({"model_type": "forethought_feedback"}, "must say what it was trained as"),
    ],
)
def test_lab_config_labels_must_agree(raw, message):
    validate.lab_config(_lab_config("feedback"), "config.json")  # the control
    with pytest.raises(ForethoughtError, match=message):
        validate.lab_config(raw, "config.json")


def test_lab_tensors_are_exactly_their_familys():
    config = ModelConfig(
        family="recurrent",
        n_layers=1,
        d_model=8,
        n_heads=2,
        n_kv_heads=2,
        head_dim=4,
        d_ff=16,
        vocab_size=5,
        context_length=8,
    )
    names = validate.lab_tensor_names(config)
    validate.lab_tensors(config, names, "folder")
    with pytest.raises(ForethoughtError, match="not part of a recurrent model"):
        validate.lab_tensors(config, names | {"memory.layer_logits"}, "folder")
    with pytest.raises(ForethoughtError, match="lacks the tensor"):
        validate.lab_tensors(config, names - {"blocks.0.gru.bias_hh"}, "folder")
    shapes = validate.expected_shapes(config)
    weights = {name: torch.zeros(shapes[name]) for name in names}
    validate.tensors(config, weights, "folder")
    weights["blocks.0.gru.weight_ih"] = weights["blocks.0.gru.weight_ih"].int()
    with pytest.raises(ForethoughtError, match="floating-point"):
        validate.tensors(config, weights, "folder")


def test_exported_folder_is_verified_by_its_manifest(tmp_path):
    config, task, settings = _tiny(tmp_path, steps=2)
    train(config, task, settings, tmp_path)
    folder = tmp_path / "engine"
    validate.folder_manifest(folder)
    (folder / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | {"x": 1}))
    with pytest.raises(ForethoughtError, match="config.json does not match its sha256"):
        validate.folder_manifest(folder)

"""The architectures lab's trained known answers: tiny models, trained in seconds on one thread."""

from __future__ import annotations

import torch

from forethought.arch.config import ArchConfig
from forethought.arch.tasks import build_task
from forethought.arch.train import TrainSettings, load_checkpoint, train


def test_feedback_solves_parity_where_a_one_layer_decoder_fails():
    """Running parity over 16 bits with ONE layer. A 1-layer decoder's position t sees earlier positions only as
    embeddings, through one softmax average, and cannot carry the parity so far (Hahn 2020 proves soft attention of
    bounded depth cannot compute parity robustly as length grows); the feedback model reads the previous token's
    top-layer state from memory and only has to xor one bit. The standard decoder is the control that must fail."""
    torch.set_num_threads(1)
    task = build_task("parity", length=16)
    settings = TrainSettings(steps=200, batch_size=32, lr=3e-3, warmup=30, seed=0)
    shape = dict(vocab_size=2, d_model=32, n_layers=1, n_heads=4, d_ff=64)
    _, feedback = train(ArchConfig("feedback", **shape), task, settings)
    _, standard = train(ArchConfig("standard", **shape), task, settings)
    assert feedback.final.accuracy > 0.95
    late = standard.final.by_position[8:]  # the first few positions are easy for anyone
    assert sum(late) / len(late) < 0.7
    assert standard.final.by_position[0] > 0.95  # it did learn what one layer can


class Interrupted(Exception):
    pass


def test_training_resumes_from_its_checkpoint(tmp_path):
    """A 10-step run killed after step 6 and rerun gives the weights of one uninterrupted 10-step run."""
    task = build_task("recall", pairs=3)
    config = ArchConfig("myopic", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    settings = TrainSettings(steps=10, batch_size=4, warmup=2, eval_batches=1, checkpoint_every=3)
    uninterrupted, _ = train(config, task, settings)

    def stop_at_6(step, loss, tokens_per_second):
        if step == 6:
            raise Interrupted

    try:
        train(config, task, settings, tmp_path, on_step=stop_at_6)
    except Interrupted:
        pass
    _, state = load_checkpoint(tmp_path)
    assert state["steps_done"] == 6
    resumed, result = train(config, task, settings, tmp_path)
    assert result.steps_done == 10 and len(result.history) == 10
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

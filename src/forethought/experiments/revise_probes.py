"""How future-token probes read two runs that part at an off-plan token (`revise --probes`): per layer and
offset, how often the probes' top-1 changes, the KL between their distributions, and whose actual future
tokens the revised run's probes name. The probes are read through `probe_file`, the format's one owner."""

from __future__ import annotations

from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.experiments.probe_file import load_probe_folder


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float64 so that identical logits give exactly 0."""
    lp = torch.log_softmax(p_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def probe_shift(
    probes_dir: str | Path,
    states_o: torch.Tensor,
    states_r: torch.Tensor,
    ids_o: list[int],
    ids_r: list[int],
    first: int,
) -> dict:
    """How the future-token probes' top-1 predictions move between the runs, per layer and offset k.

    `states_*` are [1 + layer, position, d] (embed first); `ids_*` are every token each run has (prompt +
    new), so that a prediction at t can be checked against the token each run actually has at t + k.
    Over positions t >= `first` (the off-plan one and later): `changed` = share of positions whose top-1
    differs, `kl` = mean KL(original || revised) of softmax(s * scores), s the probe's fitted inverse temperature,
    `revised_reads_original` / `revised_reads_revised` = share of positions where the probe on the revised
    state names the original's / the revised run's actual token at t + k. Positions before `first` are
    checked too (`changed_before`, which causality makes 0). Returns {"skipped": why} when unusable.
    """
    try:
        probes = load_probe_folder(probes_dir, states_o.shape[-1])
    except ForethoughtError as e:
        return {"skipped": str(e)}
    n_pos = states_o.shape[1]
    cells = []
    for layer, probe in sorted(probes.items()):
        if layer + 1 >= states_o.shape[0]:
            continue
        columns = probe.columns
        for k in probe.offsets:
            so, sr = probe.token_scores(states_o[layer + 1], k), probe.token_scores(states_r[layer + 1], k)
            top_o, top_r = columns[so.argmax(-1)], columns[sr.argmax(-1)]
            t = torch.arange(n_pos)
            later = t >= first
            has_target = (t + k < len(ids_o)) & (t + k < len(ids_r))
            rows = later & has_target
            target_o = torch.tensor([ids_o[i + k] if i + k < len(ids_o) else -1 for i in range(n_pos)])
            target_r = torch.tensor([ids_r[i + k] if i + k < len(ids_r) else -1 for i in range(n_pos)])
            temperature = probe.temperature(k)
            kl = kl_rows(so[later] * temperature, sr[later] * temperature) if bool(later.any()) else torch.zeros(0)
            n_rows = max(int(rows.sum()), 1)
            cells.append(
                {
                    "layer": layer,
                    "offset": k,
                    "positions": int(later.sum()),
                    "changed": float((top_o != top_r)[later].float().mean()) if bool(later.any()) else 0.0,
                    "changed_before": float((top_o != top_r)[~later].float().mean()) if bool((~later).any()) else 0.0,
                    "kl": float(kl.mean()) if kl.numel() else 0.0,
                    "original_reads_original": float((top_o == target_o)[rows].sum()) / n_rows,
                    "revised_reads_original": float((top_r == target_o)[rows].sum()) / n_rows,
                    "revised_reads_revised": float((top_r == target_r)[rows].sum()) / n_rows,
                    "at_off_plan": {"original": int(top_o[first]), "revised": int(top_r[first])}
                    if first < n_pos
                    else None,
                }
            )
    if not cells:
        return {"skipped": f"--probes {probes_dir}: no probe matches this model's layers"}
    return {"dir": str(probes_dir), "cells": cells}

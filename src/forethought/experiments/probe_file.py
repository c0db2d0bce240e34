"""The one owner of the saved-probe file format: written by `forethought probe`, read by `revise` and the viewer.
Saving, loading, the metadata layout, its "cells" and standardise-and-apply live here and nowhere else; every
problem with a file is a ForethoughtError that names it.

One `probe-layer{l:02d}.safetensors` per layer (plus a `.json` copy of its metadata for people):
  mean, std [d]                 standardisation of the layer's resid_post
  columns [n_columns] int32     token ids of the token probe's outputs
  probe.{k} [d + 1, n_columns]  token probe for offset k (last row = intercept), float16
  lens.{k} [d + 1, d]           Future Lens map to the final layer's state at t + k - 1
metadata "forethought": JSON with the layer, the activation name, the model, and per offset the ridge lambdas and
the temperatures (`probe_temperature`, `lens_temperature`). Apply as z = [(h - mean) / std, 1]: token-probe
scores = z @ probe.k over `columns`; Future Lens logits = model.lens_logits(z @ lens.k).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.trace import act_name

FILE = re.compile(r"^probe-layer(\d+)\.safetensors$")
REQUIRED = ("mean", "std", "columns")


def file_name(layer: int) -> str:
    return f"probe-layer{layer:02d}.safetensors"


@dataclass(frozen=True)
class CellMeta:
    """What the file says about one offset's readouts: the fitted temperatures (and, for people, the ridge
    lambdas per training token and the probe's validation top-1)."""

    offset: int
    probe_lambda_per_token: float | None = None
    lens_lambda_per_token: float | None = None
    probe_temperature: float = 1.0
    lens_temperature: float = 1.0
    probe_val_top1: float | None = None


def probe_metadata(layer: int, cells, model: str, store: str) -> dict:
    """The metadata layout of one layer's file; `cells` are the layer's fitted cells (anything with offset,
    probe_lambda, lens_lambda, probe_temperature, lens_temperature, probe_val_top1: `experiments.probes.Cell`)."""
    described = [
        CellMeta(
            offset=c.offset,
            probe_lambda_per_token=c.probe_lambda,
            lens_lambda_per_token=c.lens_lambda,
            probe_temperature=c.probe_temperature,
            lens_temperature=c.lens_temperature,
            probe_val_top1=c.probe_val_top1,
        )
        for c in cells
    ]
    return {
        "store": store,
        "model": model,
        "point": act_name(layer, "resid_post"),
        "lens_target": "final-layer resid_post at t+k-1, decode with model.lens_logits",
        "cells": [asdict(c) for c in described],
    }


def cells_of(meta: dict) -> dict[int, CellMeta]:
    """Offset -> its CellMeta, from a file's metadata (the one parser of "cells"; malformed entries are skipped,
    a missing or non-positive temperature reads as 1)."""
    cells = meta.get("cells")
    if not isinstance(cells, list):
        return {}
    found = {}
    for c in cells:
        if not isinstance(c, dict) or not isinstance(c.get("offset"), int):
            continue
        temps = {}
        for name in ("probe_temperature", "lens_temperature"):
            t = c.get(name)
            temps[name] = float(t) if isinstance(t, int | float) and math.isfinite(t) and t > 0 else 1.0
        known = {k: c.get(k) for k in ("probe_lambda_per_token", "lens_lambda_per_token", "probe_val_top1")}
        found[c["offset"]] = CellMeta(offset=c["offset"], **known, **temps)
    return dict(sorted(found.items()))


def save_probe_layer(folder: Path, layer: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one layer's probes; `meta` must carry "cells" (one dict per offset with its temperatures)."""
    from safetensors.torch import save_file

    meta = {"layer": layer, **meta}
    path = Path(folder) / file_name(layer)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"forethought": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def read_header(path: Path, readouts: tuple[str, ...] = ("probe",)) -> tuple[dict, set[str], int]:
    """(metadata, tensor names, width d) without loading the tensors; ForethoughtError naming the file. Every
    offset must have a tensor for each of `readouts` ("probe", "lens")."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("forethought", "{}"))
            keys = set(f.keys())
            d = f.get_slice("mean").get_shape()[0] if "mean" in keys else -1
    except Exception as e:  # a corrupt or foreign file: say which
        raise ForethoughtError(f"probe file {path.name} is not readable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layer"), int) or not set(REQUIRED) <= keys:
        raise ForethoughtError(f"probe file {path.name} lacks the layer, mean, std or columns of a probe file")
    offsets = offsets_of(meta)
    wanted = " / ".join(f"{r}.k" for r in readouts)
    if not offsets or any(f"{r}.{k}" not in keys for k in offsets for r in readouts):
        raise ForethoughtError(f"probe file {path.name} lacks a {wanted} tensor for its offsets")
    return meta, keys, d


def offsets_of(meta: dict) -> list[int]:
    return list(cells_of(meta))


@dataclass
class ProbeLayer:
    layer: int
    tensors: dict[str, torch.Tensor]  # float32
    meta: dict

    @property
    def offsets(self) -> list[int]:
        return offsets_of(self.meta)

    @property
    def columns(self) -> torch.Tensor:
        return self.tensors["columns"].long()

    def temperature(self, k: int, readout: str = "probe") -> float:
        """The fitted inverse temperature of a readout ("probe" or "lens") at offset k (1 when not recorded)."""
        cell = cells_of(self.meta).get(k)
        return 1.0 if cell is None else getattr(cell, f"{readout}_temperature")

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """z = [(h - mean) / std, 1] for states [n, d]."""
        z = (states.float().cpu() - self.tensors["mean"]) / self.tensors["std"]
        return torch.cat([z, torch.ones(z.shape[0], 1)], dim=1)

    def token_scores(self, states: torch.Tensor, k: int) -> torch.Tensor:
        """Token-probe scores [n, n_columns] (softmax(temperature * scores) are its probabilities)."""
        return self.features(states) @ self.tensors[f"probe.{k}"]

    def token_probs(self, states: torch.Tensor, k: int) -> torch.Tensor:
        """Token-probe probabilities [n, n_columns] over `columns`, at the fitted temperature."""
        return torch.softmax(self.temperature(k) * self.token_scores(states, k), dim=-1)

    def future_lens_states(self, states: torch.Tensor, k: int) -> torch.Tensor:
        """The Future Lens's predicted final-layer state [n, d]; decode with model.lens_logits."""
        return self.features(states) @ self.tensors[f"lens.{k}"]

    def direction(self, token: int, k: int) -> torch.Tensor | None:
        """The direction in the raw residual stream that raises the probe's score for `token` at offset k."""
        where = torch.nonzero(self.columns == token)
        if len(where) == 0:
            return None
        return self.tensors[f"probe.{k}"][:-1, int(where[0, 0])] / self.tensors["std"]


def load_probe_layer(
    path: str | Path, d_model: int | None = None, readouts: tuple[str, ...] = ("probe",)
) -> ProbeLayer:
    path = Path(path)
    meta, _, d = read_header(path, readouts)
    if d_model is not None and d != d_model:
        raise ForethoughtError(f"probe file {path.name} was fitted on states of width {d}, this model's is {d_model}")
    from safetensors.torch import load_file

    try:
        tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:
        raise ForethoughtError(f"probe file {path.name} is not readable ({type(e).__name__})") from None
    return ProbeLayer(int(meta["layer"]), tensors, meta)


def probe_files(folder: str | Path) -> dict[int, Path]:
    """Layer -> file in a folder written by `forethought probe`; ForethoughtError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ForethoughtError(f"probes {folder}: not a folder")
    found = {int(m.group(1)): p for p in sorted(folder.iterdir()) if (m := FILE.match(p.name))}
    if not found:
        raise ForethoughtError(f"probes {folder}: no probe-layer*.safetensors files (run `forethought probe`)")
    return found


def load_probe_folder(
    folder: str | Path, d_model: int | None = None, readouts: tuple[str, ...] = ("probe",)
) -> dict[int, ProbeLayer]:
    return {layer: load_probe_layer(p, d_model, readouts) for layer, p in probe_files(folder).items()}

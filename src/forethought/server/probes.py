"""Future-token probes in the viewer, read from the folder `forethought probe` saves them in.

The format (owned by `forethought.experiments.probe_file`): one `probe-layer{l:02d}.safetensors` per layer
with `mean`, `std` (standardisation), `columns` (the token ids the token probe scores), `probe.{k}` [d+1, n_columns]
and `lens.{k}` [d+1, d] (last row = intercept), and in its metadata the temperature of each readout and offset.
Apply as z = [(h - mean) / std, 1]: token-probe probabilities = softmax(t * z @ probe.k); Future Lens =
final_norm + unembed of z @ lens.k, times its own temperature. When the folder is missing or unreadable the
viewer says why and leaves the probe metric out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.experiments.probe_file import ProbeLayer, load_probe_layer, offsets_of, probe_files, read_header

GRID_BUDGET_BYTES = 2 << 30  # probes held in memory to colour the whole grid; above it, cells only
READOUTS = ("probe", "lens")  # the viewer shows both: every offset needs its token probe and its Future Lens map


class ViewerProbes:
    """Saved probes for some layers and offsets; grid row r is layer r - 1 (row 0 is the embedding)."""

    def __init__(self, folder: str | Path, model) -> None:
        self.folder = Path(folder)
        self.model = model
        self.files = probe_files(self.folder)
        self.meta: dict[int, dict] = {}
        self._loaded: dict[int, ProbeLayer] = {}
        for layer, path in self.files.items():
            meta, _, d = read_header(path, READOUTS)
            if d != model.config.d_model:
                raise ForethoughtError(f"{path.name} is for d_model {d}, this model has {model.config.d_model}")
            self.meta[layer] = meta
        self.offsets = sorted(set.intersection(*(set(offsets_of(m)) for m in self.meta.values())))
        if not self.offsets:
            raise ForethoughtError("the layers' files share no offset")
        self.layers = sorted(self.files)
        self.grid_ok = sum(p.stat().st_size for p in self.files.values()) <= GRID_BUDGET_BYTES
        self.source_model = next(iter(self.meta.values())).get("model")

    def describe(self) -> dict:
        return {
            "folder": str(self.folder),
            "layers": self.layers,
            "offsets": self.offsets,
            "model": self.source_model,
            "grid": self.grid_ok,
        }

    def _probe(self, layer: int) -> ProbeLayer:
        if layer not in self._loaded:
            probe = load_probe_layer(self.files[layer], readouts=READOUTS)
            if not self.grid_ok:  # too large to keep every layer: keep the last one asked for
                self._loaded.clear()
            self._loaded[layer] = probe
        return self._loaded[layer]

    @torch.inference_mode()
    def token_probs(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """Token-probe probabilities [K, n, n_columns] for states [n, d]."""
        probe = self._probe(layer)
        return torch.stack([probe.token_probs(states, k) for k in self.offsets])

    @torch.inference_mode()
    def future_lens_probs(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        """Future Lens probabilities [K, vocab] for one state [d]: the predicted final state, decoded by the model."""
        probe = self._probe(layer)
        predicted = torch.cat([probe.future_lens_states(state[None], k) for k in self.offsets])
        logits = self.model.lens_logits(predicted.to(self.model.device)).cpu()
        temps = torch.tensor([probe.temperature(k, "lens") for k in self.offsets])
        return torch.softmax(temps[:, None] * logits, dim=-1)

    def confidence(self, states: torch.Tensor) -> torch.Tensor:
        """Mean over k of the token probe's top-1 probability per cell of states [row, position, d]; NaN: no probe."""
        out = torch.full(states.shape[:2], float("nan"))
        for layer in self.layers:
            if layer + 1 < states.shape[0]:
                out[layer + 1] = self.token_probs(layer, states[layer + 1]).amax(dim=-1).mean(dim=0)
        return out

    def predictions(self, row: int, state: torch.Tensor, k: int, tokenizer) -> list[dict] | None:
        layer = row - 1
        if layer not in self.files:
            return None
        columns = self._probe(layer).columns
        probe = self.token_probs(layer, state[None])[:, 0]
        lens = self.future_lens_probs(layer, state)

        def top(p: torch.Tensor, ids: torch.Tensor | None) -> list[dict]:
            best = torch.topk(p, min(k, p.numel()))
            out = []
            for q, i in zip(best.values, best.indices):
                token = int(ids[i]) if ids is not None else int(i)
                out.append({"id": token, "text": tokenizer.token_str(token), "prob": float(q)})
            return out

        return [
            {"k": offset, "top": top(probe[j], columns), "lens": top(lens[j], None)}
            for j, offset in enumerate(self.offsets)
        ]


def load_probes(folder: str | Path, model) -> tuple[ViewerProbes | None, str]:
    """(probes, "") when `folder` holds probes saved by `forethought probe` for this model's width, else (None, why)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, f"{folder} is not a folder"
    try:
        return ViewerProbes(folder, model), ""
    except ForethoughtError as e:  # an unreadable folder must not stop the viewer, only its probe metric
        return None, f"{folder}: probes not readable ({e})"

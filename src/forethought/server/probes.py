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

from forethought.experiments.probe_file import FILE, load_probe_layer, read_header

GRID_BUDGET_BYTES = 2 << 30  # probes held in memory to colour the whole grid; above it, cells only


class ViewerProbes:
    """Saved probes for some layers and offsets; grid row r is layer r - 1 (row 0 is the embedding)."""

    def __init__(self, folder: str | Path, model) -> None:
        self.folder = Path(folder)
        self.model = model
        self.files: dict[int, Path] = {}
        self.meta: dict[int, dict] = {}
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}
        for path in sorted(self.folder.iterdir()):
            match = FILE.match(path.name)
            if not match:
                continue
            meta, keys, d = read_header(path)
            if d != model.config.d_model:
                raise ValueError(f"{path.name} is for d_model {d}, this model has {model.config.d_model}")
            layer = int(meta.get("layer", match.group(1)))
            offsets = {int(c["offset"]) for c in meta.get("cells", [])}
            if not offsets or any(f"probe.{k}" not in keys or f"lens.{k}" not in keys for k in offsets):
                raise ValueError(f"{path.name} lacks probe.k / lens.k tensors for its offsets")
            self.files[layer] = path
            self.meta[layer] = meta
        if not self.files:
            raise ValueError("no probe-layer*.safetensors files")
        offset_sets = [{int(c["offset"]) for c in m["cells"]} for m in self.meta.values()]
        self.offsets = sorted(set.intersection(*offset_sets))
        if not self.offsets:
            raise ValueError("the layers' files share no offset")
        self.layers = sorted(self.files)
        self.temperatures = {layer: {int(c["offset"]): c for c in meta["cells"]} for layer, meta in self.meta.items()}
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

    def _tensors(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._loaded:
            tensors = load_probe_layer(self.files[layer]).tensors
            if not self.grid_ok:  # too large to keep every layer: keep the last one asked for
                self._loaded.clear()
            self._loaded[layer] = tensors
        return self._loaded[layer]

    def _z(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        t = self._tensors(layer)
        z = (states.float() - t["mean"]) / t["std"]
        return torch.cat([z, torch.ones(z.shape[0], 1)], dim=1)

    @torch.inference_mode()
    def token_probs(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """Token-probe probabilities [K, n, n_columns] for states [n, d]."""
        t, z = self._tensors(layer), self._z(layer, states)
        temps = self.temperatures[layer]
        return torch.stack(
            [torch.softmax(temps[k]["probe_temperature"] * (z @ t[f"probe.{k}"]), dim=-1) for k in self.offsets]
        )

    @torch.inference_mode()
    def lens_probs(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        """Future Lens probabilities [K, vocab] for one state [d]: the predicted final state, decoded by the model."""
        t, z = self._tensors(layer), self._z(layer, state[None])
        m = self.model
        logits = m.lens_logits(torch.cat([z @ t[f"lens.{k}"] for k in self.offsets])).cpu()
        temps = torch.tensor([self.temperatures[layer][k]["lens_temperature"] for k in self.offsets])
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
        columns = self._tensors(layer)["columns"].long()
        probe = self.token_probs(layer, state[None])[:, 0]
        lens = self.lens_probs(layer, state)

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
    except Exception as e:  # an unreadable folder must not stop the viewer, only its probe metric
        return None, f"{folder}: probes not readable ({type(e).__name__}: {e})"

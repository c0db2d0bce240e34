"""Capture and patch named activations: the one trace API every experiment reuses.

Names follow one pattern everywhere (CLI, store, plots, viewer):
  embed, blocks.{layer}.{resid_pre|attn_out|resid_mid|mlp_out|resid_post|q|k|v|attn_pattern},
  final_norm, logits; a Feedback Transformer adds `memory`, and a recurrent (GRU) model's blocks have only
  resid_pre and resid_post.
Patterns may use globs (`blocks.*.resid_post`, `blocks.1?.q`), and a bare point name such as
`resid_post` means that point at every layer. Only what is asked for is kept: a plain forward pays
one set lookup per point, which keeps capture of every layer's residual stream within a few
percent of a plain forward.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.kv_cache import KVCache
from forethought.model.layers import BLOCK_POINTS, act_name  # act_name: spelled beside the points, used from here
from forethought.model.transformer import Transformer


def block_points(config: ModelConfig) -> tuple[str, ...]:
    """The named points inside each block of this model (a GRU layer has no attention or residual parts)."""
    return config.family_spec.block_points


def all_names(config: ModelConfig) -> list[str]:
    names = ["embed"]
    for layer in range(config.n_layers):
        names += [act_name(layer, point) for point in block_points(config)]
    names += config.family_spec.model_points  # e.g. the Feedback Transformer's `memory`
    return names + ["final_norm", "logits"]


def resolve_names(config: ModelConfig, patterns: str | Iterable[str]) -> list[str]:
    """Expand globs and bare point names into concrete activation names, in network order."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    known = all_names(config)
    chosen: set[str] = set()
    for raw in patterns:
        pattern = raw.strip()
        if pattern in BLOCK_POINTS:
            pattern = f"blocks.*.{pattern}"
        matches = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            points = ", ".join(block_points(config))
            raise ForethoughtError(
                f"no activation matches {raw!r} in this {config.family} model (names look like embed, "
                f"blocks.3.resid_post, blocks.*.{block_points(config)[-1]}, logits; block points: {points})"
            )
        chosen.update(matches)
    return [n for n in known if n in chosen]


def split_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.resid_post' -> (3, 'resid_post'); 'embed' -> (None, 'embed'). The inverse of act_name."""
    if name.startswith("blocks."):
        _, layer, point = name.split(".", 2)
        return int(layer), point
    return None, name


def layer_label(name: str) -> str:
    """A short axis or table label: 'blocks.3.resid_post' -> '3', 'embed' -> 'embed'."""
    layer, point = split_name(name)
    return point if layer is None else str(layer)


def layer_words(name: str) -> str:
    """The same in a sentence: 'blocks.3.resid_post' -> 'after block 3', 'embed' -> 'embedding'."""
    layer, point = split_name(name)
    return "embedding" if point == "embed" else f"after block {layer}" if layer is not None else point


@dataclass(frozen=True)
class Patch:
    """Replace or add to one activation at some positions while the model runs.

    `positions` are absolute positions in the sequence (they index the tokens of this forward
    pass, offset by what the cache already holds); None means every position of this pass.
    `value` broadcasts against the activation at those positions ([d] or [n_positions, d]).
    """

    name: str
    value: torch.Tensor
    positions: Sequence[int] | None = None
    mode: Literal["replace", "add"] = "replace"


@dataclass
class Trace:
    """Activations of one run: per name a tensor [batch, position, ...].

    `trace["resid_post"]` stacks a block point over the layers captured -> [layer, position, d]
    (or [layer, batch, position, d] for batches > 1); `trace["blocks.3.resid_post"]` is one layer.
    """

    tensors: dict[str, torch.Tensor]
    token_ids: list[list[int]]
    start: int = 0  # position of the first captured token (non-zero when continuing from a cache)
    metadata: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def layers(self, point: str) -> list[int]:
        return [layer for layer, p in map(split_name, self.tensors) if p == point and layer is not None]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or bool(self.layers(name))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            t = self.tensors[name]
            return t[0] if t.shape[0] == 1 else t
        layers = self.layers(name)
        if not layers:
            raise KeyError(f"{name!r} was not captured (captured: {', '.join(self.tensors)})")
        stacked = torch.stack([self.tensors[act_name(layer, name)] for layer in layers])
        return stacked[:, 0] if stacked.shape[1] == 1 else stacked

    def save(self, path: str | Path, **metadata) -> Path:
        """The trace as safetensors, whole or not at all: a full or read-only disk is one line naming the path,
        and leaves no cut file that `Trace.load` would half read (forethought.paths)."""
        from safetensors.torch import save

        from forethought.paths import atomic_write_bytes, output_file

        path = output_file(path, "--save")
        header = {"token_ids": self.token_ids, "start": self.start, **self.metadata, **metadata}
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors.items()}
        data = save(tensors, metadata={"forethought": json.dumps(header, default=str)})
        return atomic_write_bytes(path, data, "--save")

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("forethought", "{}"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            raise ForethoughtError(f"{path}: not a readable trace file ({e})") from None
        token_ids = header.pop("token_ids", [])
        start = header.pop("start", 0)
        order = {n: i for i, n in enumerate(_natural_order(tensors))}
        tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
        return cls(tensors, token_ids, start, header)


def _natural_order(names: Iterable[str]) -> list[str]:
    rank = {"embed": -1, "memory": 10**9 - 1, "final_norm": 10**9, "logits": 10**9 + 1}

    def key(name: str) -> tuple[int, int]:
        layer, point = split_name(name)
        if layer is None:
            return rank.get(point, 10**9 + 2), 0
        return layer, BLOCK_POINTS.index(point) if point in BLOCK_POINTS else len(BLOCK_POINTS)

    return sorted(names, key=key)


class Recorder:
    """The `Hooks` object the transformer calls: applies patches, keeps the asked-for tensors."""

    def __init__(self, capture: Iterable[str], patches: Sequence[Patch] = (), start: int = 0, to_cpu: bool = False):
        self.capture = frozenset(capture)
        self.patches: dict[str, list[Patch]] = {}
        for p in patches:
            self.patches.setdefault(p.name, []).append(p)
        self.points = self.capture | frozenset(self.patches)
        self.start = start
        self.to_cpu = to_cpu
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        for patch in self.patches.get(name, ()):
            tensor = self._apply(patch, tensor)
        if name in self.capture:
            kept = tensor.detach()
            self.tensors[name] = kept.cpu() if self.to_cpu else kept
        return tensor

    def _apply(self, patch: Patch, tensor: torch.Tensor) -> torch.Tensor:
        # attn_pattern is [batch, head, query, key]; every other activation is [batch, position, ...].
        position_axis = 2 if patch.name.endswith("attn_pattern") else 1
        n = tensor.shape[position_axis]
        if patch.positions is None:
            index = torch.arange(n, device=tensor.device)
        else:
            local = [p - self.start for p in patch.positions]
            if any(not 0 <= i < n for i in local):
                raise ForethoughtError(
                    f"patch positions {list(patch.positions)} fall outside this pass "
                    f"({self.start}..{self.start + n - 1})"
                )
            index = torch.tensor(local, device=tensor.device)
        patched = tensor.clone()
        view = patched.movedim(position_axis, 0)
        value = patch.value.to(device=tensor.device, dtype=tensor.dtype)
        if value.dim() >= 2 and position_axis == 1:
            value = value.unsqueeze(1)  # [n_positions, ...] -> broadcast over batch
        view[index] = value if patch.mode == "replace" else view[index] + value
        return patched


def as_token_tensor(tokens: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], device) -> torch.Tensor:
    t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens)
    if t.dim() == 1:
        t = t[None]
    if t.numel() == 0:
        raise ForethoughtError("nothing to run: the token sequence is empty")
    return t.to(device)


@torch.inference_mode()
def run_with_trace(
    model: Transformer,
    tokens: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    names: str | Iterable[str] = (),
    cache: KVCache | None = None,
    patches: Sequence[Patch] = (),
    causal: bool = True,
    to_cpu: bool = False,
    last_only: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """One forward pass capturing `names` (globs allowed) and applying `patches`.

    Returns (logits [batch, position, vocab], trace). With a cache, `tokens` continue it and the
    trace covers only the new positions (`trace.start` says where they begin). `last_only` unembeds
    only the last position, as generation does (then `final_norm`/`logits` cover that one only).
    """
    ids = as_token_tensor(tokens, model.device)
    chosen = resolve_names(model.config, names) if names else []
    for p in patches:
        resolve_names(model.config, [p.name])  # a typo in a patch name must not pass silently
    start = cache.length if cache is not None else 0
    recorder = Recorder(chosen, patches, start=start, to_cpu=to_cpu)
    logits = model(ids, cache=cache, hooks=recorder, causal=causal, last_only=last_only)
    # Captured in execution order (attn_pattern before resid_post); kept in the same natural order
    # that `Trace.load` restores, so a save/load round trip gives back the same names in the same order.
    tensors = {name: recorder.tensors[name] for name in _natural_order(recorder.tensors)}
    trace = Trace(tensors, ids.tolist(), start)
    return logits, trace


def trace(
    model: Transformer,
    tokens: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    names: str | Iterable[str] = "resid_post",
    **kwargs,
) -> Trace:
    """Shorthand for `run_with_trace(...)[1]`."""
    return run_with_trace(model, tokens, names, **kwargs)[1]

"""Does appending tokens leave the earlier columns unchanged? Run SHORT and LONGER (which extends it)
and compare SHORT's columns inside LONGER at every layer. Causal attention says they must match to
rounding; removing the causal mask (`causal=False`) is the control that must make them differ."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer
from forethought.trace import run_with_trace
from forethought.weights.tokenizer import Tokenizer

# Largest max|diff| / max|value| that still counts as "unchanged", by dtype. float32 GEMMs block
# differently for different sequence lengths, so SHORT's columns come out ~1e-6 relative apart even
# though the network computes the same function of the same inputs; float64 leaves ~1e-16.
REL_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


def extending_ids(tokenizer: Tokenizer, short: str, longer: str) -> tuple[list[int], list[int]]:
    """Token ids of both texts, checking that LONGER's ids start with SHORT's and add at least one."""
    short_ids, longer_ids = tokenizer.encode(short), tokenizer.encode(longer)
    if not short_ids:
        raise ForethoughtError("SHORT is empty: give at least one token of text")
    n = len(short_ids)
    if longer_ids[:n] != short_ids:
        if not longer.startswith(short):
            raise ForethoughtError(f"LONGER must start with SHORT: {longer!r} does not start with {short!r}")
        first = next(i for i, (a, b) in enumerate(zip(short_ids, longer_ids + [-1] * n)) if a != b)
        show = lambda ids: " ".join(repr(tokenizer.token_str(i)) for i in ids[first : first + 4])  # noqa: E731
        raise ForethoughtError(
            f"tokenization merges across the boundary: SHORT ends in tokens {show(short_ids)} but LONGER has "
            f"{show(longer_ids)} there (from token {first}); end SHORT at a word boundary, e.g. before a space"
        )
    if len(longer_ids) == n:
        raise ForethoughtError("LONGER adds no tokens to SHORT")
    return short_ids, longer_ids


@dataclass
class InvarianceResult:
    model: str
    dtype: str
    causal: bool
    short_ids: list[int]
    longer_ids: list[int]
    layers: list[str]  # embed, blocks.0.resid_post, ...
    max_abs: list[float]  # per layer: max |diff| over SHORT's columns, LONGER run vs SHORT run
    max_rel: list[float]  # that divided by max |value| of SHORT's columns at the layer
    value_scale: list[float]  # max |value| of SHORT's columns at the layer
    appended_norm: list[float]  # per layer: largest L2 norm of an appended column
    appended_nearest: list[float]  # per layer: distance from an appended column to the nearest earlier one, min
    rel_tolerance: float

    @property
    def n_shared(self) -> int:
        return len(self.short_ids)

    @property
    def worst_abs(self) -> float:
        return max(self.max_abs)

    @property
    def worst_rel(self) -> float:
        return max(self.max_rel)

    @property
    def unchanged(self) -> bool:
        """SHORT's columns are the same in LONGER at every layer, to this dtype's rounding."""
        return self.worst_rel <= self.rel_tolerance

    def to_dict(self) -> dict:
        return asdict(self) | {
            "worst_abs": self.worst_abs,
            "worst_rel": self.worst_rel,
            "unchanged": self.unchanged,
        }


@torch.inference_mode()
def invariance(
    model: Transformer,
    short_ids: list[int],
    longer_ids: list[int],
    causal: bool = True,
    model_name: str = "",
) -> InvarianceResult:
    """Compare SHORT's columns (embed and every resid_post) when run alone and inside LONGER."""
    n = len(short_ids)
    if not n or longer_ids[:n] != short_ids or len(longer_ids) <= n:
        raise ForethoughtError("LONGER's token ids must start with SHORT's and add at least one token")
    names = ["embed", "resid_post"]
    _, alone = run_with_trace(model, short_ids, names, causal=causal)
    _, inside = run_with_trace(model, longer_ids, names, causal=causal)
    dtype = str(model.dtype).removeprefix("torch.")
    layers = alone.names
    max_abs, max_rel, scale, appended_norm, nearest = [], [], [], [], []
    for name in layers:
        a, b = alone[name].double(), inside[name].double()  # [position, d]
        diff = float((b[:n] - a).abs().max())
        top = float(a.abs().max())
        max_abs.append(diff)
        max_rel.append(diff / top if top else 0.0)
        scale.append(top)
        new = b[n:]
        appended_norm.append(float(new.norm(dim=-1).max()))
        nearest.append(float(torch.cdist(new, b[:n]).min()))
    return InvarianceResult(
        model=model_name or model.config.name,
        dtype=dtype,
        causal=causal,
        short_ids=list(short_ids),
        longer_ids=list(longer_ids),
        layers=layers,
        max_abs=max_abs,
        max_rel=max_rel,
        value_scale=scale,
        appended_norm=appended_norm,
        appended_nearest=nearest,
        rel_tolerance=REL_TOLERANCE.get(dtype, 1e-4),
    )

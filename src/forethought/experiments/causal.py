"""Does the model *use* what h_t holds about later tokens? Knockout, steering, and the model's own k-step ceiling.

For each sampled held-out position t (inside a stored window, its prefix the window's tokens before t), the prefix
runs once into a KV cache; then every condition runs the short suffix x_t .. x_{t+H} as one row of a batch that
shares that cache:

- knockout: the later positions t+1 .. are blocked from reading one key/value, at all layers or only from layer
  l up: key t, and beside it keys t-1 and t-2 (is it t that is read, or just "the recent past"?) and a random
  earlier key s (the control), each at the same layers and with the same readers, so every comparison is
  layer-matched. Implemented on the attention pattern (the softmax weight of the key is removed and the row
  renormalised, which is exactly a -inf mask), through the engine's `attn_pattern` hook point. Position t's own
  prediction cannot move under any of them (it is not a reader).
- the random key avoids attention sinks: s = t - d with d uniform in 3..max_distance, never window position 0
  (the first token, which absorbs attention like a BOS), and never a key with outsized attention mass. Detection:
  on the prefix pass, every key's mean attention weight from the queries at least `SINK_GAP` after it, times
  (query position + 1) (so uniform attention scores 1), averaged over heads and layers; a key scoring above
  `sink_ratio` is a sink. (Blocking a sink costs nats everywhere: it says nothing about t.)
- keeping a key/value at t but computing it from another token's embedding (the token identity is gone, the
  position and everything h_t could read from its past is kept).
- "loss at t+j" is the next-token loss of the prediction made at position t+j; the increase is against the
  unmodified run.
- steering, as a dose-response: add to resid_post at layer l, position t, a vector of norm scale x spread (spread:
  the layer's typical distance from its mean, sqrt(sum std^2); scales `steer_scales`) along the saved probe's
  direction for y = x_{t+k}, or along a random direction of the same norm (Gaussian, whitened like the probe's).
  Measured, teacher-forced: the change of log p(y) at the prediction of x_{t+k} (made at t+k-1) minus its change
  at the prediction of x_{t+1} (made at t) -- a plan read at t+k moves the first more than the second -- and the
  share of positions whose greedy token at t+k flips to y (among those where it was not y).
- ceiling: the model's own marginal over x_{t+k} given x_{..t}: k = 1 its next-token distribution, k = 2 exact
  over the top-M next tokens (renormalised over their mass), k > 2 the mean of the next-token distributions of R
  sampled rollouts. Its top-1 is what the full model works out about t+k by running forward. All the branches of
  all the positions of one window run as one sequence of tree attention over one copy of the window's prefix
  (`Transformer.forward_tree`): a forward per step instead of a batch per position, ~3x faster, so the ceiling can
  be measured on thousands of positions.

Every figure is a mean over positions with a 95% interval from a bootstrap over documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from forethought.data.store import ActivationStore
from forethought.experiments.baselines import Interval, bootstrap_by_document
from forethought.experiments.probe_file import ProbeLayer
from forethought.model.kv_cache import BranchCache
from forethought.model.transformer import Transformer
from forethought.progress import Progress, tell
from forethought.trace import act_name, split_name


@dataclass
class CausalSettings:
    horizon: int = 4  # losses at t+1 .. t+horizon
    from_layers: tuple[int, ...] = (0, 10, 20)  # knockout at layers >= l
    max_distance: int = 16  # the random earlier key is t - d, d in 3..max_distance (t-1, t-2: their own rows)
    sink_ratio: float = 5.0  # a key drawing this many times its uniform share of attention is a sink
    steer_layers: tuple[int, ...] = (10, 20)
    steer_offsets: tuple[int, ...] = (2, 3)
    # added norms, in units of the layer's typical distance from its mean (sqrt(sum std^2)): a dose-response
    steer_scales: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    ceiling_offsets: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
    top_m: int = 32
    rollouts: int = 8
    max_prefix: int = 255  # positions later in their window are skipped (the prefix's cost grows with it)
    ceiling_positions: int | None = None  # the ceiling on the first N positions only (None: all)
    condition_positions: int | None = None  # knockout and steering on the first N positions only (None: all)
    seed: int = 0


@dataclass
class CausalResult:
    model: str
    store: str
    n_positions: int
    n_documents: int
    settings: dict
    knockout: dict[str, list[Interval]]  # condition -> loss increase (nats) at t+1 .. t+H
    knockout_vs_random: dict[str, list[Interval]]  # knockout of t, t-1, t-2 minus a random key's, same layers
    steering: list[dict]
    ceiling: dict[int, Interval]  # offset -> top-1 of the model's own k-step marginal
    n_ceiling_positions: int = 0
    n_ceiling_documents: int = 0
    seconds: float = 0.0
    per_position: dict = field(default_factory=dict, repr=False)
    sinks: dict = field(default_factory=dict)  # how the random key's sinks were detected, how many were avoided

    def to_dict(self) -> dict:
        keep, self.per_position = self.per_position, {}
        try:
            d = asdict(self)
        finally:
            self.per_position = keep
        d.pop("per_position")
        return d


class Interventions:
    """The engine's `Hooks` for one batched suffix pass: per batch row, at most one of a key knockout, an
    embedding swap or a steering vector. Positions are absolute; the pass starts at `start` (= t); a knocked-out
    key is hidden from the positions after t (and after the key)."""

    def __init__(self, n_layers: int, start: int) -> None:
        self.start = start
        self.n_layers = n_layers
        self.knockout: dict[int, tuple[int, int]] = {}  # row -> (key position, from layer)
        self.embed: dict[int, torch.Tensor] = {}  # row -> embedding used at position `start`
        self.steer: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (layer, vector added at `start`)

    @property
    def points(self) -> frozenset[str]:
        names = set()
        if self.knockout:
            low = min(layer for _, layer in self.knockout.values())
            names |= {act_name(i, "attn_pattern") for i in range(low, self.n_layers)}
        if self.embed:
            names.add("embed")
        names |= {act_name(layer, "resid_post") for layer, _ in self.steer.values()}
        return frozenset(names)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        layer, point = split_name(name)
        if point == "embed":
            tensor = tensor.clone()
            for row, vec in self.embed.items():
                tensor[row, 0] = vec
        elif point == "attn_pattern":  # [batch, head, query, key]
            rows = [(r, key) for r, (key, low) in self.knockout.items() if layer >= low]
            if rows:
                tensor = tensor.clone()
                queries = self.start + torch.arange(tensor.shape[2])
                for row, key in rows:
                    later = queries > max(key, self.start)  # the readers: t+1 .. (t itself never)
                    tensor[row, :, later, key] = 0
                    tensor[row] = tensor[row] / tensor[row].sum(-1, keepdim=True)
        elif point == "resid_post":
            rows = [(r, vec) for r, (low, vec) in self.steer.items() if low == layer]
            if rows:
                tensor = tensor.clone()
                for row, vec in rows:
                    tensor[row, 0] += vec.to(tensor.dtype)
        return tensor


SINK_GAP = 8  # a key's attention mass is measured from queries at least this far after it (recency aside)


class SinkMeter:
    """A hook for the prefix pass: per key, attention received x (query position + 1), averaged over heads,
    layers and the queries at least SINK_GAP later. Uniform attention scores 1; a sink scores tens."""

    def __init__(self, n_layers: int) -> None:
        self.points = frozenset(act_name(i, "attn_pattern") for i in range(n_layers))
        self.total: torch.Tensor | None = None
        self.layers = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        a = tensor[0].float().mean(0)  # [query, key], mean over heads
        n = a.shape[-1]
        q = torch.arange(a.shape[0])[:, None] + (n - a.shape[0])
        k = torch.arange(n)[None, :]
        use = q >= k + SINK_GAP
        weighted = (a * (q + 1) * use).sum(0) / use.sum(0).clamp_min(1)
        self.total = weighted if self.total is None else self.total + weighted
        self.layers += 1
        return tensor

    def scores(self) -> torch.Tensor:
        return self.total / max(self.layers, 1)


def attention_sinks(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keys that are sinks: position 0 always (the first token in a window plays the BOS), and any key whose
    attention score (see SinkMeter) exceeds `ratio`. Returns a bool mask over keys."""
    sink = scores > ratio
    sink[0] = True
    return sink


def random_control_key(p: int, sinks: torch.Tensor, max_distance: int, gen: torch.Generator) -> int | None:
    """A key s = p - d, d uniform in 3..max_distance among the non-sinks (None when every candidate is one)."""
    candidates = [p - d for d in range(3, max_distance + 1) if p - d >= 0 and not bool(sinks[p - d])]
    if not candidates:
        return None
    return candidates[int(torch.randint(len(candidates), (1,), generator=gen))]


@torch.inference_mode()
def window_prefix(model: Transformer, tokens: torch.Tensor, settings: CausalSettings):
    """One pass over `tokens` (a window's first positions) into a KV cache, with every key's sink flag and the
    next-token logits at every position: the shared prefix of all positions measured in that window (a position p
    reads the cache's first p entries)."""
    cache = model.new_cache(capacity=len(tokens) + 2)
    meter = SinkMeter(model.config.n_layers)
    logits = model(tokens[None], cache=cache, hooks=meter)[0]
    return cache, attention_sinks(meter.scores(), settings.sink_ratio), logits


def _expand(model: Transformer, cache, rows: int, length: int):
    """A cache of `rows` copies of row 0 of `cache`, its first `length` positions (local layers' rings too)."""
    return cache.repeat_prefix(rows, length)


@torch.inference_mode()
def measure_position(
    model: Transformer,
    window_tokens: torch.Tensor,
    p: int,
    settings: CausalSettings,
    probes: dict[int, ProbeLayer],
    gen: torch.Generator,
    vocab_pool: torch.Tensor,
    prefix: tuple | None = None,
) -> dict[str, np.ndarray | float]:
    """All conditions at local position p of one window: {name: value(s)}; NaN where a condition does not apply.
    `prefix`: `window_prefix(...)` of this window, shared by its positions (its cache must hold at least the first
    p positions). The ceiling is `window_ceiling`'s."""
    c = model.config
    H = settings.horizon
    cache, sinks = (prefix if prefix is not None else window_prefix(model, window_tokens[:p], settings))[:2]
    suffix = window_tokens[p : p + H + 1]
    targets = window_tokens[p + 1 : p + H + 2]

    hooks = Interventions(c.n_layers, p)
    names = ["base"]
    s = random_control_key(p, sinks, settings.max_distance, gen)
    keys = {"t": p, "t-1": p - 1, "t-2": p - 2, "random": s}
    for low in settings.from_layers:
        for label, key in keys.items():
            if key is None or key < 0:
                continue
            hooks.knockout[len(names)] = (key, low)
            names.append(f"knockout_{label}@{low}")
    swap = int(vocab_pool[torch.randint(len(vocab_pool), (1,), generator=gen)])
    hooks.embed[len(names)] = model.embed[swap]
    names.append("embed_swap")
    steer_rows: list[tuple[int, int, str, int, float]] = []  # (row, layer, kind, offset, scale)
    for layer in settings.steer_layers:
        probe = probes.get(layer)
        if probe is None:
            continue
        spread = float(probe.tensors["std"].norm())
        for k in settings.steer_offsets:
            if k > H + 1 or k not in probe.offsets:
                continue
            y = int(window_tokens[p + k])
            direction = probe.direction(y, k)
            if direction is None:
                continue
            noise = torch.randn(direction.shape, generator=gen) / probe.tensors["std"]
            for kind, vec in (("probe", direction), ("random", noise)):
                unit = vec / float(vec.norm())
                for scale in settings.steer_scales:
                    hooks.steer[len(names)] = (layer, unit * (scale * spread))
                    steer_rows.append((len(names), layer, kind, k, scale))
                    names.append(f"steer_{kind}@{layer}k{k}x{scale:g}")

    cache_b = _expand(model, cache, len(names), p)
    logits = model(suffix[None].expand(len(names), -1).contiguous(), cache=cache_b, hooks=hooks)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(2, targets[None, :, None].expand(len(names), -1, 1))[..., 0]  # [rows, H + 1]
    out: dict[str, np.ndarray | float] = {}
    out["sinks_excluded"] = float(sinks[max(0, p - settings.max_distance) : p - 2].sum())
    for row, name in enumerate(names[1:], start=1):
        if name.startswith("steer_"):
            continue
        out[name] = (nll[row] - nll[0]).numpy()  # index j = loss of the prediction made at t + j
    for label in ("t-1", "t-2", "random"):  # absent rows (no such key): NaN, so every row has every condition
        for low in settings.from_layers:
            out.setdefault(f"knockout_{label}@{low}", np.full(H + 1, np.nan))
    greedy = logp.argmax(-1)  # [rows, H + 1]
    for row, layer, kind, k, scale in steer_rows:
        y = int(window_tokens[p + k])
        key = f"steer_{kind}@{layer}k{k}x{scale:g}"
        out[f"{key}:target"] = float(logp[row, k - 1, y] - logp[0, k - 1, y])
        out[f"{key}:next"] = float(logp[row, 0, y] - logp[0, 0, y])
        was = int(greedy[0, k - 1]) == y
        out[f"{key}:flip"] = float("nan") if was else float(int(greedy[row, k - 1]) == y)

    return out


class _TreeBranches:
    """Continuations of several positions of one window as one sequence of tree attention over one copy of the
    window's prefix: every branch of every position costs one forward per step (families with tree attention)."""

    def __init__(self, model: Transformer, cache, positions: Sequence[int]) -> None:
        self.model, self.ps = model, list(positions)
        self.cache = BranchCache(cache, cache.length, room=64 * len(self.ps))
        self.slots: list[list[list[int]]] = []  # per branch of each position: its tokens' slots so far

    def step(self, tokens: torch.Tensor, parents: Sequence[int] | None = None) -> torch.Tensor:
        """tokens [n_positions, r]: new branches (parents None) or one more token on branch parents[j] of the
        previous step for column j. Returns logits [n_positions, r, vocab] at those tokens."""
        n, r = tokens.shape
        start, T = self.cache.length, n * r
        visible = torch.zeros(T, start + T, dtype=torch.bool)
        positions = torch.empty(T, dtype=torch.long)
        slots = []
        for i, p in enumerate(self.ps):
            row_slots = []
            for j in range(r):
                q = i * r + j
                before = [] if parents is None else self.slots[i][parents[j]]
                visible[q, : p + 1] = True
                visible[q, before] = True
                visible[q, start + q] = True
                positions[q] = p + 1 + len(before)
                row_slots.append([*before, start + q])
            slots.append(row_slots)
        self.slots = slots
        return self.model.forward_tree(tokens.reshape(1, T), self.cache, positions, visible)[0].view(n, r, -1)


class _BatchBranches:
    """The same continuations as a batch per position with its own copy of the prefix (families without tree
    attention: slower, one forward per position and step)."""

    def __init__(self, model: Transformer, cache, positions: Sequence[int]) -> None:
        self.model, self.cache, self.ps = model, cache, list(positions)
        self.rows: list = []

    def step(self, tokens: torch.Tensor, parents: Sequence[int] | None = None) -> torch.Tensor:
        out, rows = [], []
        for i, p in enumerate(self.ps):
            if parents is None:
                row = _expand(self.model, self.cache, tokens.shape[1], p + 1)
            else:
                row = self.rows[i]
                row.select(torch.as_tensor(list(parents)))
            out.append(self.model(tokens[i][:, None], cache=row)[:, 0])
            rows.append(row)
        self.rows = rows
        return torch.stack(out)


@torch.inference_mode()
def window_ceiling(
    model: Transformer,
    window_tokens: torch.Tensor,
    positions: Sequence[int],
    settings: CausalSettings,
    gen: torch.Generator,
    prefix: tuple,
    chunk_rows: int = 512,
) -> list[dict[str, float]]:
    """The ceiling at local positions `positions` of one window, branching off its prefix pass (`window_prefix`):
    k = 1 the top-1 of the next-token distribution; k = 2 the top-1 of the exact marginal over the top_m next
    tokens (sum of p(y) p(x | y)); k > 2 the top-1 of the mean next-token distribution of `rollouts` sampled
    continuations. {"ceiling@k": 1.0 hit / 0.0 miss} per position, where x_{t+k} is in the window. Positions go
    `chunk_rows` branch tokens at a time through tree attention (or one batch each without it)."""
    cache, _, logits = prefix
    ks = list(settings.ceiling_offsets)
    far = max([k for k in ks if k > 2], default=0)
    m, R = settings.top_m, settings.rollouts if far else 0
    out: list[dict[str, float]] = [{} for _ in positions]
    per_chunk = max(1, chunk_rows // (m + R))
    # A BranchCache holds one plain copy of the prefix: families whose tree attention is bounded (Gemma's rings)
    # branch as batches.
    unbounded = model.family.tree_attention and model.family.tree_slots(model.config) is None
    branches = _TreeBranches if unbounded else _BatchBranches
    for c0 in range(0, len(positions), per_chunk):
        ps = list(positions[c0 : c0 + per_chunk])
        rows = out[c0 : c0 + per_chunk]
        truth = [{k: int(window_tokens[p + k]) for k in ks if p + k < len(window_tokens)} for p in ps]
        p1 = torch.softmax(logits[ps].float(), dim=-1)  # [n, vocab]
        for row, t, dist in zip(rows, truth, p1):
            if 1 in t:
                row["ceiling@1"] = float(int(dist.argmax()) == t[1])
        if not any(k in t for t in truth for k in ks if k > 1):
            continue
        top = p1.topk(m)
        first = [top.indices]
        if R:
            first.append(torch.multinomial(p1, R, replacement=True, generator=gen))
        tree = branches(model, cache, ps)
        probs = torch.softmax(tree.step(torch.cat(first, 1)).float(), dim=-1)  # [n, m + R, vocab]
        marginal = (top.values[:, :, None] * probs[:, :m]).sum(1)
        for row, t, dist in zip(rows, truth, marginal):
            if 2 in t:
                row["ceiling@2"] = float(int(dist.argmax()) == t[2])
        probs, parents = probs[:, m:], list(range(m, m + R))
        for step in range(3, far + 1):  # probs: each rollout's distribution of x_{t+step-1}
            y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(len(ps), R)
            probs = torch.softmax(tree.step(y, parents).float(), dim=-1)
            parents = list(range(R))
            for row, t, dist in zip(rows, truth, probs.mean(1)):
                if step in t:
                    row[f"ceiling@{step}"] = float(int(dist.argmax()) == t[step])
    return out


def run_causal(
    model: Transformer,
    store: ActivationStore,
    positions: Sequence[int],
    probes: dict[int, ProbeLayer],
    settings: CausalSettings | None = None,
    checkpoint: str | Path | None = None,
    progress: Progress | None = None,
    n_boot: int = 1000,
) -> CausalResult:
    """Measure every condition at each store position (flat index t); resumable through `checkpoint`."""
    import time

    started = time.perf_counter()
    settings = settings or CausalSettings()
    tokens = store.array("token_ids").long()
    doc_of = store.array("doc_ids").long()
    W = store.window
    gen = torch.Generator().manual_seed(settings.seed)
    vocab_pool = torch.unique(tokens)
    last = min(W - settings.horizon - 2, settings.max_prefix)
    usable = [int(t) for t in positions if 3 <= int(t) % W <= last]
    done: list[dict] = []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        # the ceiling's subset may change between runs (rows already measured keep their ceiling); a run cut short
        # is summarized by asking for fewer positions (the first ones of the same list), and a longer list that
        # begins with the saved one goes on from where the checkpoint stopped
        skip = ("ceiling_positions", "condition_positions")
        same = {k: v for k, v in saved.get("settings", {}).items() if k not in skip}
        saved_positions = saved.get("positions", [])
        common = min(len(saved_positions), len(usable))
        if same == {k: v for k, v in asdict(settings).items() if k not in skip} and (
            saved_positions[:common] == usable[:common]
        ):
            done = saved["rows"][: len(usable)]
            gen.set_state(saved["rng"])
    tell(progress, len(done), len(usable))
    shared: tuple[int, tuple] | None = None  # (window, its prefix): positions of one window share one pass
    ceilings: dict[int, dict[str, float]] = {}  # list index -> its ceiling, computed a window at a time
    for i in range(len(done), len(usable)):
        t = usable[i]
        w, p = divmod(t, W)
        window_tokens = tokens[w * W : (w + 1) * W]
        if shared is None or shared[0] != w:
            shared = (w, window_prefix(model, window_tokens, settings))
            mine = [j for j in range(i, len(usable)) if usable[j] // W == w]
            mine = [j for j in mine if settings.ceiling_positions is None or j < settings.ceiling_positions]
            local = [usable[j] % W for j in mine]
            ceilings = dict(zip(mine, window_ceiling(model, window_tokens, local, settings, gen, shared[1])))
        row: dict = {}
        if settings.condition_positions is None or i < settings.condition_positions:
            row = measure_position(model, window_tokens, p, settings, probes, gen, vocab_pool, shared[1])
        row.update(ceilings.get(i, {}))
        done.append(row)
        if ckpt is not None and (len(done) % 25 == 0 or len(done) == len(usable)):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"settings": asdict(settings), "positions": usable, "rows": done, "rng": gen.get_state()}, tmp)
            tmp.replace(ckpt)
        tell(progress, len(done), len(usable))
    return summarize_causal(model, store, usable, done, doc_of, settings, n_boot, time.perf_counter() - started)


def _interval(values, docs: np.ndarray, n_boot: int) -> Interval:
    """Bootstrap over documents of the finite values (a condition that did not apply at a position is NaN)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return Interval(float("nan"), float("nan"), float("nan"))
    return bootstrap_by_document(v[ok], docs[ok], n_boot)


def summarize_causal(model, store, usable, rows, doc_of, settings, n_boot, seconds) -> CausalResult:
    docs = doc_of[torch.tensor(usable, dtype=torch.long)].numpy() if usable else np.zeros(0)
    docs = docs[: len(rows)]
    H = settings.horizon

    measured = [i for i, r in enumerate(rows) if "embed_swap" in r]  # the positions with the conditions
    cdocs = docs[measured]

    def series(name: str) -> np.ndarray:
        return np.stack([rows[i][name] for i in measured])  # [positions, H + 1]

    knock = [n for n in rows[measured[0]] if n.startswith(("knockout", "embed_swap"))] if measured else []
    knockout = {n: [_interval(series(n)[:, j], cdocs, n_boot) for j in range(1, H + 1)] for n in knock}
    vs_random = {}
    for n in knock:
        if n.startswith("knockout_") and not n.startswith("knockout_random"):
            low = n.split("@")[1]
            diff = series(n) - series(f"knockout_random@{low}")  # the same layers, the same readers
            vs_random[n] = [_interval(diff[:, j], cdocs, n_boot) for j in range(1, H + 1)]
    steering = []
    for layer in settings.steer_layers:
        for k in settings.steer_offsets:
            for scale in settings.steer_scales:
                key = f"@{layer}k{k}x{scale:g}"
                have = [i for i, r in enumerate(rows) if f"steer_probe{key}:target" in r]
                if not have:
                    continue
                d = docs[have]

                def col(name: str, have=have) -> np.ndarray:
                    return np.array([rows[i][name] for i in have])

                pt, pn, pf = (col(f"steer_probe{key}:{m}") for m in ("target", "next", "flip"))
                rt, rn, rf = (col(f"steer_random{key}:{m}") for m in ("target", "next", "flip"))
                steering.append(
                    {
                        "layer": layer,
                        "offset": k,
                        "scale": scale,
                        "n": len(have),
                        "probe_at_target": _interval(pt, d, n_boot),
                        "probe_at_next": _interval(pn, d, n_boot),
                        "random_at_target": _interval(rt, d, n_boot),
                        "random_at_next": _interval(rn, d, n_boot),
                        "probe_minus_random_at_target": _interval(pt - rt, d, n_boot),
                        "target_minus_next": _interval(pt - pn, d, n_boot),
                        "random_target_minus_next": _interval(rt - rn, d, n_boot),
                        "probe_flip": _interval(pf, d, n_boot),
                        "random_flip": _interval(rf, d, n_boot),
                        "n_flippable": int(np.isfinite(pf).sum()),
                    }
                )
    ceiling = {}
    for k in settings.ceiling_offsets:
        have = [i for i, r in enumerate(rows) if f"ceiling@{k}" in r]
        if have:
            ceiling[k] = bootstrap_by_document([rows[i][f"ceiling@{k}"] for i in have], docs[have], n_boot)
    per_position = {"positions": np.array(usable[: len(rows)]), "documents": docs}
    for k in ceiling:
        per_position[f"ceiling@{k}"] = np.array([r.get(f"ceiling@{k}", np.nan) for r in rows])
    excluded = np.array([rows[i].get("sinks_excluded", 0.0) for i in measured])
    return CausalResult(
        model=store.manifest["model"]["name"],
        store=str(store.path),
        n_positions=len(measured),
        n_documents=len(np.unique(cdocs)),
        settings=asdict(settings),
        knockout=knockout,
        knockout_vs_random=vs_random,
        steering=steering,
        ceiling=ceiling,
        n_ceiling_positions=len(rows) - int(np.isnan(per_position.get("ceiling@1", np.zeros(0))).sum())
        if "ceiling@1" in per_position
        else 0,
        n_ceiling_documents=len(np.unique(docs[~np.isnan(per_position["ceiling@1"])]))
        if "ceiling@1" in per_position
        else 0,
        seconds=seconds,
        per_position=per_position,
        sinks={
            "rule": f"window position 0, and any key drawing > {settings.sink_ratio:g}x its uniform share of "
            f"attention (mean over heads and layers, from queries >= {SINK_GAP} later)",
            "mean_excluded_per_position": float(excluded.mean()) if len(excluded) else 0.0,
            "positions_with_a_sink_in_range": int((excluded > 0).sum()),
        },
    )

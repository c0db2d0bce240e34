"""Does the model *use* what h_t holds about later tokens? Knockout, steering, and the model's own k-step ceiling.

For each sampled held-out position t (inside a stored window, its prefix the window's tokens before t), the prefix
runs once into a KV cache; then every condition runs the short suffix x_t .. x_{t+H} as one row of a batch that
shares that cache:

- knockout: every later position (t+1 ..) is blocked from reading position t's keys/values, at all layers or only
  from layer l up. Implemented on the attention pattern (the softmax weight of key t is removed and the row
  renormalised, which is exactly a -inf mask), through the engine's `attn_pattern` hook point.
- the controls: the same block on a random earlier key s = t - d (d uniform in 1..max_distance), read by the same
  later positions; and keeping a key/value at t but computing it from another token's embedding (the token
  identity is gone, the position and everything h_t could read from its past is kept).
- "loss at t+j" is the next-token loss of the prediction made at position t+j (the state that reads t's K/V);
  the increase is against the unmodified run. Position t itself can always read itself: its loss must not move.
- steering: add a vector to resid_post at layer l, position t: the saved probe's direction for y = x_{t+k} (the
  token actually k ahead) or a random direction of the same norm (Gaussian, whitened like the probe's). Measured:
  the change of log p(y) at the prediction of x_{t+k} (made at t+k-1, after teacher-forced x_{t+1..t+k-1}) and at
  the prediction of x_{t+1} (made at t). A plan read at t+k would move the first more than the second.
- ceiling: the model's own marginal over x_{t+k} given x_{..t}: k = 1 its next-token distribution, k = 2 exact
  over the top-M next tokens (renormalised over their mass), k > 2 the mean of the next-token distributions of R
  sampled rollouts. Its top-1 is what the full model works out about t+k by running forward.

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
from forethought.model.transformer import Transformer
from forethought.progress import Progress, tell
from forethought.trace import act_name, split_name


@dataclass
class CausalSettings:
    horizon: int = 4  # losses at t+1 .. t+horizon
    from_layers: tuple[int, ...] = (0, 10, 20)  # knockout at layers >= l
    max_distance: int = 16  # the random earlier key is t - d, d in 1..max_distance
    steer_layers: tuple[int, ...] = (10, 20)
    steer_offsets: tuple[int, ...] = (2, 3)
    steer_scale: float = 1.0  # added norm, in units of the layer's typical distance from its mean (sqrt(sum std^2))
    ceiling_offsets: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
    top_m: int = 32
    rollouts: int = 8
    max_prefix: int = 255  # positions later in their window are skipped (the prefix's cost grows with it)
    ceiling_positions: int | None = None  # the ceiling on the first N positions only (None: all)
    seed: int = 0


@dataclass
class CausalResult:
    model: str
    store: str
    n_positions: int
    n_documents: int
    settings: dict
    knockout: dict[str, list[Interval]]  # condition -> loss increase (nats) at t+1 .. t+H
    knockout_vs_random: dict[str, list[Interval]]  # knockout of t minus knockout of a random earlier key
    steering: list[dict]
    ceiling: dict[int, Interval]  # offset -> top-1 of the model's own k-step marginal
    seconds: float = 0.0
    per_position: dict = field(default_factory=dict, repr=False)

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
    embedding swap or a steering vector. Positions are absolute; the pass starts at `start` (= t)."""

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
                    later = queries > key
                    tensor[row, :, later, key] = 0
                    tensor[row] = tensor[row] / tensor[row].sum(-1, keepdim=True)
        elif point == "resid_post":
            rows = [(r, vec) for r, (low, vec) in self.steer.items() if low == layer]
            if rows:
                tensor = tensor.clone()
                for row, vec in rows:
                    tensor[row, 0] += vec.to(tensor.dtype)
        return tensor


def _expand(model: Transformer, cache, rows: int, length: int):
    """A cache of `rows` copies of row 0 of `cache`, its first `length` positions."""
    out = model.new_cache(capacity=length + 32, batch_size=rows)
    out.k[:, :, :, :length] = cache.k[:, :1, :, :length]
    out.v[:, :, :, :length] = cache.v[:, :1, :, :length]
    out.length = length
    return out


@torch.inference_mode()
def measure_position(
    model: Transformer,
    window_tokens: torch.Tensor,
    p: int,
    settings: CausalSettings,
    probes: dict[int, ProbeLayer],
    gen: torch.Generator,
    vocab_pool: torch.Tensor,
    ceiling: bool = True,
) -> dict[str, np.ndarray | float]:
    """All conditions at local position p of one window: {name: value(s)}; NaN where a condition does not apply."""
    c = model.config
    H = settings.horizon
    prefix = window_tokens[:p][None]
    cache = model.new_cache(capacity=p + max(H, max(settings.ceiling_offsets)) + 2)
    model(prefix, cache=cache, last_only=True)
    suffix = window_tokens[p : p + H + 1]
    targets = window_tokens[p + 1 : p + H + 2]

    hooks = Interventions(c.n_layers, p)
    names = ["base"]
    for low in settings.from_layers:
        hooks.knockout[len(names)] = (p, low)
        names.append(f"knockout_t@{low}")
    d = int(torch.randint(1, min(p, settings.max_distance) + 1, (1,), generator=gen))
    hooks.knockout[len(names)] = (p - d, 0)
    names.append("knockout_random@0")
    swap = int(vocab_pool[torch.randint(len(vocab_pool), (1,), generator=gen)])
    hooks.embed[len(names)] = model.embed[swap]
    names.append("embed_swap")
    steer_rows: list[tuple[int, int, str, int]] = []  # (row, layer, kind, offset)
    for layer in settings.steer_layers:
        probe = probes.get(layer)
        if probe is None:
            continue
        norm = settings.steer_scale * float(probe.tensors["std"].norm())
        for k in settings.steer_offsets:
            if k > H + 1 or k not in probe.offsets:
                continue
            y = int(window_tokens[p + k])
            direction = probe.direction(y, k)
            if direction is None:
                continue
            noise = torch.randn(direction.shape, generator=gen) / probe.tensors["std"]
            for kind, vec in (("probe", direction), ("random", noise)):
                hooks.steer[len(names)] = (layer, vec * (norm / float(vec.norm())))
                steer_rows.append((len(names), layer, kind, k))
                names.append(f"steer_{kind}@{layer}k{k}")

    cache_b = _expand(model, cache, len(names), p)
    logits = model(suffix[None].expand(len(names), -1).contiguous(), cache=cache_b, hooks=hooks)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(2, targets[None, :, None].expand(len(names), -1, 1))[..., 0]  # [rows, H + 1]
    out: dict[str, np.ndarray | float] = {}
    for row, name in enumerate(names[1:], start=1):
        if name.startswith("steer_"):
            continue
        out[name] = (nll[row] - nll[0]).numpy()  # index j = loss of the prediction made at t + j
    for row, layer, kind, k in steer_rows:
        y = int(window_tokens[p + k])
        out[f"steer_{kind}@{layer}k{k}:target"] = float(logp[row, k - 1, y] - logp[0, k - 1, y])
        out[f"steer_{kind}@{layer}k{k}:next"] = float(logp[row, 0, y] - logp[0, 0, y])

    # the ceiling: from the unmodified run's cache through x_t
    p1 = logp[0, 0].exp()
    truth = {k: int(window_tokens[p + k]) for k in settings.ceiling_offsets if p + k < len(window_tokens) and ceiling}
    if 1 in truth:
        out["ceiling@1"] = float(int(p1.argmax()) == truth[1])
    if 2 in truth:
        top = p1.topk(settings.top_m)
        branch = _expand(model, cache_b, settings.top_m, p + 1)
        p2 = torch.softmax(model(top.indices[:, None], cache=branch)[:, 0].float(), dim=-1)
        marginal = (top.values[:, None] * p2).sum(0)
        out["ceiling@2"] = float(int(marginal.argmax()) == truth[2])
    far = [k for k in truth if k > 2]
    if far:
        R = settings.rollouts
        roll = _expand(model, cache_b, R, p + 1)
        y = torch.multinomial(p1, R, replacement=True, generator=gen)
        for step in range(2, max(far) + 1):
            probs = torch.softmax(model(y[:, None], cache=roll)[:, 0].float(), dim=-1)
            if step in truth and step > 2:
                out[f"ceiling@{step}"] = float(int(probs.mean(0).argmax()) == truth[step])
            y = torch.multinomial(probs, 1, generator=gen)[:, 0]
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
    usable = [int(t) for t in positions if 2 <= int(t) % W <= last]
    done: list[dict] = []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        # the ceiling's subset may shrink between runs (rows already measured keep their ceiling)
        same = {k: v for k, v in saved.get("settings", {}).items() if k != "ceiling_positions"}
        if same == {k: v for k, v in asdict(settings).items() if k != "ceiling_positions"} and (
            saved.get("positions") == usable
        ):
            done = saved["rows"]
            gen.set_state(saved["rng"])
    tell(progress, len(done), len(usable))
    for i in range(len(done), len(usable)):
        t = usable[i]
        w, p = divmod(t, W)
        with_ceiling = settings.ceiling_positions is None or i < settings.ceiling_positions
        window_tokens = tokens[w * W : (w + 1) * W]
        done.append(measure_position(model, window_tokens, p, settings, probes, gen, vocab_pool, with_ceiling))
        if ckpt is not None and (len(done) % 25 == 0 or len(done) == len(usable)):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"settings": asdict(settings), "positions": usable, "rows": done, "rng": gen.get_state()}, tmp)
            tmp.replace(ckpt)
        tell(progress, len(done), len(usable))
    return summarize_causal(model, store, usable, done, doc_of, settings, n_boot, time.perf_counter() - started)


def summarize_causal(model, store, usable, rows, doc_of, settings, n_boot, seconds) -> CausalResult:
    docs = doc_of[torch.tensor(usable, dtype=torch.long)].numpy() if usable else np.zeros(0)
    H = settings.horizon

    def series(name: str) -> np.ndarray:
        return np.stack([r[name] for r in rows])  # [positions, H + 1]

    knock = [n for n in rows[0] if n.startswith(("knockout", "embed_swap"))] if rows else []
    knockout = {n: [bootstrap_by_document(series(n)[:, j], docs, n_boot) for j in range(1, H + 1)] for n in knock}
    vs_random = {}
    if rows:
        rand = series("knockout_random@0")
        for n in knock:
            if n.startswith("knockout_t@"):
                diff = series(n) - rand
                vs_random[n] = [bootstrap_by_document(diff[:, j], docs, n_boot) for j in range(1, H + 1)]
    steering = []
    for layer in settings.steer_layers:
        for k in settings.steer_offsets:
            key = f"@{layer}k{k}"
            have = [i for i, r in enumerate(rows) if f"steer_probe{key}:target" in r]
            if not have:
                continue
            d = docs[have]

            def col(name: str, have=have) -> np.ndarray:
                return np.array([rows[i][name] for i in have])

            pt, pn = col(f"steer_probe{key}:target"), col(f"steer_probe{key}:next")
            rt, rn = col(f"steer_random{key}:target"), col(f"steer_random{key}:next")
            steering.append(
                {
                    "layer": layer,
                    "offset": k,
                    "n": len(have),
                    "probe_at_target": bootstrap_by_document(pt, d, n_boot),
                    "probe_at_next": bootstrap_by_document(pn, d, n_boot),
                    "random_at_target": bootstrap_by_document(rt, d, n_boot),
                    "random_at_next": bootstrap_by_document(rn, d, n_boot),
                    "probe_minus_random_at_target": bootstrap_by_document(pt - rt, d, n_boot),
                    "target_minus_next": bootstrap_by_document(pt - pn, d, n_boot),
                }
            )
    ceiling = {}
    for k in settings.ceiling_offsets:
        have = [i for i, r in enumerate(rows) if f"ceiling@{k}" in r]
        if have:
            ceiling[k] = bootstrap_by_document([rows[i][f"ceiling@{k}"] for i in have], docs[have], n_boot)
    per_position = {"positions": np.array(usable), "documents": docs}
    for k in ceiling:
        per_position[f"ceiling@{k}"] = np.array([r.get(f"ceiling@{k}", np.nan) for r in rows])
    return CausalResult(
        model=store.manifest["model"]["name"],
        store=str(store.path),
        n_positions=len(rows),
        n_documents=len(np.unique(docs)),
        settings=asdict(settings),
        knockout=knockout,
        knockout_vs_random=vs_random,
        steering=steering,
        ceiling=ceiling,
        seconds=seconds,
        per_position=per_position,
    )

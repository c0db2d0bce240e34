"""Anatomy of a column: is a state a position part that changes a lot plus a memory part that changes slowly?

For N documents' first T tokens we take every layer's residual stream (`embed`, then each block's
`resid_post`) and ask how much of its variance each candidate part explains:

- position: the mean state at each position across documents (the "position part");
- token: the mean state of the current token's id (what the column is "about" right now);
- slow: a low-pass filter of the document's own state sequence (the "evolving memory" part);
- document: the document's mean state (the slowest memory: constant over the window).

Every share is an out-of-sample R^2 = 1 - SSE / SST, so none is trivially 100%:
- position and token means are fit on one half of the documents and evaluated on the other, then the
  halves swap and the sums pool (a token unseen in the fitting half is predicted by the global mean);
- the slow part of position t is the centred moving average of its neighbours t-h..t+h *leaving out
  t itself*. Why this filter: a boxcar of width w = 2h passes changes slower than about w positions
  and removes faster ones (its first zero is at a period of w); centring makes it zero-phase, so the
  slow part does not lag behind the states as a causal or exponential average would; and leaving out
  position t means white noise scores about -1/w instead of the +1/w a filter that includes t gets for
  free, so a positive share is variance that the neighbours really share. The default window is 16
  positions (h = 8); the share is also reported for windows 2..64 and for the whole document, which
  shows on what time scale the shared part lives.

The same states give the cosine similarity of states d positions apart (after removing the mean
state) as a function of d, with a time constant: c(d) = A exp(-d / tau) + B fitted for d >= 1 (B is
the plateau the similarity settles to, the part that does not decay within the window), and d_e, the
first d where c(d) <= 1/e. A 2-D PCA of one document's states shows the trajectory of a few layers.

Controls: positions shuffled within each document (the position share must fall to about 0, and the
slow share to the document share), and the real model with every block weight's entries permuted within its
tensor (`permuted_weights`): the same value distribution and hence about the same activation scales (a freshly
initialised model's states are orders of magnitude smaller), but no learned structure.

Position 0 is left out of everything: in SmolLM2 its residual norm is ~2e4 (an attention sink with
massive activations in two dimensions), against ~100-900 elsewhere, so it alone would be most of the
variance. By default each remaining state is also scaled to unit norm (`normalize="unit"`), because a
few later positions carry secondary sinks (norms 5-10x the median in layers 2-10) that would otherwise
dominate the sums; `normalize="none"` keeps raw states.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer
from forethought.trace import act_name, layer_words, run_with_trace

DEFAULT_WINDOW = 16
WINDOWS = (2, 4, 8, 16, 32, 64)
MAX_DISTANCE = 64
NORMALIZE = ("unit", "none")


@dataclass
class LayerAnatomy:
    layer: str  # "embed" or "blocks.{i}.resid_post"
    position_share: float
    token_share: float  # on evaluated tokens whose id the fitting half saw
    slow_share: float  # leave-self-out centred moving average, `window` positions
    causal_slow_share: float  # the same from the `window` previous positions only (what the past predicts)
    document_share: float  # leave-self-out mean of the whole document
    position_shuffled: float  # control: positions permuted within each document
    slow_shuffled: float
    position_fast: float  # share of the position part's own variance its neighbours do not predict
    memory_slow_share: float  # slow share of what is left after removing the position part
    position_profile: list[float]  # per analysed position, the share of its variance that is the position part
    slow_by_window: dict[int, float]
    cosine: list[float]  # mean cosine of centred states d = 1..len apart
    tau: float  # fitted decay length of c(d) (positions); NaN where the fit's R^2 < 0.9 or the curve is flat
    amplitude: float
    plateau: float
    d_e: int | None  # first d with c(d) <= 1/e, None if not within the measured distances
    decay_fit_r2: float  # how well A exp(-d / tau) + B describes the measured cosines
    mean_norm: float  # of the raw states analysed


@dataclass
class PCAView:
    layer: str
    positions: list[int]
    xy: list[list[float]]  # [position, 2]
    explained: list[float]  # variance ratio of the two components


@dataclass
class AnatomyResult:
    model: str
    n_docs: int
    length: int
    window: int
    normalize: str
    excluded_positions: list[int]
    token_coverage: float  # evaluation tokens whose id was seen in the fitting half
    position0_norm: float  # median raw norm at position 0 over documents, at the layer where it is largest
    other_norm: float  # median raw norm of the other positions at that layer
    layers: list[LayerAnatomy] = field(default_factory=list)
    random: list[LayerAnatomy] = field(default_factory=list)  # the permuted-weight control
    pca: list[PCAView] = field(default_factory=list)
    corpus: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        """The handful of numbers that answer the question, taken over the analysed layers."""
        ls = self.layers
        top_pos = max(ls, key=lambda l: l.position_share)
        top_slow = max(ls, key=lambda l: l.slow_share)
        first_pos = max(ls, key=lambda l: l.position_profile[0] if l.position_profile else 0.0)
        out = {
            "position_share_max": top_pos.position_share,
            "position_share_max_layer": top_pos.layer,
            "position_shuffled_at_that_layer": top_pos.position_shuffled,
            "position_profile_first_max": first_pos.position_profile[0] if first_pos.position_profile else 0.0,
            "position_profile_first_layer": first_pos.layer,
            "position_profile_late_median": max(
                float(torch.tensor(l.position_profile[15:] or [0.0]).median()) for l in ls
            ),
            "token_share_embed": ls[0].token_share,
            "token_share_last": ls[-1].token_share,
            "slow_share_max": top_slow.slow_share,
            "slow_share_max_layer": top_slow.layer,
            "slow_shuffled_at_that_layer": top_slow.slow_shuffled,
            "document_share_at_that_layer": top_slow.document_share,
            "cos1_at_that_layer": top_slow.cosine[0] if top_slow.cosine else 0.0,
            "tau_at_that_layer": top_slow.tau,
            "plateau_at_that_layer": top_slow.plateau,
            "slow_share_last": ls[-1].slow_share,
            "tau_last": ls[-1].tau,
        }
        if self.random:
            by_name = {l.layer: l for l in self.random}
            r = by_name.get(top_slow.layer)
            out["random_slow_share_at_that_layer"] = r.slow_share if r else None
            out["random_position_share_max"] = max(l.position_share for l in self.random)
            out["random_slow_share_max"] = max(l.slow_share for l in self.random)
        return out

    def verdict(self) -> str:
        """A plain-language answer to "a position part that changes a lot plus a memory part that changes slowly?"."""
        s = self.summary()
        where = layer_words(s["position_share_max_layer"])
        pos = (
            f"Position part: at most {s['position_share_max']:.1%} of the variance ({where}; "
            f"{s['position_shuffled_at_that_layer']:.1%} with positions shuffled); per position it is up to "
            f"{s['position_profile_first_max']:.0%} of the variance at position 1 and a median "
            f"{s['position_profile_late_median']:.1%} at positions >= 16."
        )
        slow = (
            f"Slow part: neighbours within ±{self.window // 2} positions explain up to {s['slow_share_max']:.1%} "
            f"({layer_words(s['slow_share_max_layer'])}; shuffled {s['slow_shuffled_at_that_layer']:.1%}, "
            f"whole-document mean {s['document_share_at_that_layer']:.1%}"
            + (
                f", permuted-weight model {s['random_slow_share_at_that_layer']:.1%}"
                if s.get("random_slow_share_at_that_layer") is not None
                else ""
            )
            + f"); cosine of states 1 apart {s['cos1_at_that_layer']:.2f}, decaying with tau ≈ "
            f"{s['tau_at_that_layer']:.0f} positions to a plateau of {s['plateau_at_that_layer']:.2f}."
        )
        token = (
            f"Current token: {s['token_share_embed']:.0%} of the variance at the embedding, "
            f"{s['token_share_last']:.0%} at the last analysed layer."
        )
        return " ".join([pos, slow, token])

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary(), "verdict": self.verdict()}


def permuted_weights(model: Transformer, seed: int = 0) -> Transformer:
    """A copy of `model` whose block weights have their entries permuted within each tensor (per layer).

    Embedding, final norm and unembedding are kept, so tokens enter and leave as in the real model; what is lost
    is every learned arrangement inside the blocks, while each tensor's scale and value distribution stay."""
    import copy

    control = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in control.blocks:
            for param in block.parameters():
                flat = param.data.reshape(-1)
                param.data.copy_(flat[torch.randperm(flat.numel(), generator=g)].reshape(param.shape))
    return control


def layer_names(n_layers: int, layers: Sequence[int] | None = None) -> list[str]:
    """'embed' plus blocks.{i}.resid_post for the chosen block indices (all by default)."""
    chosen = range(n_layers) if layers is None else layers
    for i in chosen:
        if not 0 <= i < n_layers:
            raise ForethoughtError(f"--layers {i} is outside 0..{n_layers - 1}")
    return ["embed"] + [act_name(i, "resid_post") for i in sorted(set(chosen))]


def corpus_documents(tokenizer, spec: str, n_docs: int, length: int) -> tuple[list[list[int]], dict]:
    """The first `length` tokens of the first `n_docs` documents (in the corpus's order) that have that many."""
    from forethought.data.corpus import load_corpus

    corpus = load_corpus(spec)
    docs: list[list[int]] = []
    too_short = 0
    for document in corpus.documents:
        # Tokenize a prefix only: long stdlib files would cost seconds each. ~4 characters a token in code
        # and prose; if the prefix falls short, the whole text decides.
        ids = tokenizer.encode(document.text[: 8 * length])
        if len(ids) < length + 1:
            ids = tokenizer.encode(document.text)
        if len(ids) < length:
            too_short += 1
            continue
        docs.append(ids[:length])
        if len(docs) == n_docs:
            break
    if len(docs) < max(n_docs, 2):
        raise ForethoughtError(
            f"corpus {spec!r} has only {len(docs)} documents of >= {length} tokens (need {max(n_docs, 2)}); "
            f"lower --docs or --length"
        )
    return docs, corpus.describe() | {"too_short": too_short}


@torch.inference_mode()
def collect_states(model: Transformer, docs: list[list[int]], names: list[str], batch_size: int = 8) -> torch.Tensor:
    """States [layer, doc, position, d] in float32 on the CPU, for `names` in order."""
    batches = []
    for i in range(0, len(docs), batch_size):
        _, trace = run_with_trace(model, docs[i : i + batch_size], names, to_cpu=True)
        batches.append(torch.stack([trace.tensors[n].float() for n in names]))
    return torch.cat(batches, dim=1)


def _sse(x: torch.Tensor, pred: torch.Tensor) -> float:
    return float((x - pred).pow(2).sum())


def _sst(x: torch.Tensor) -> float:
    flat = x.reshape(-1, x.shape[-1])
    return float((flat - flat.mean(0)).pow(2).sum())


def _r2(sse: float, sst: float) -> float:
    return 1.0 - sse / sst if sst > 0 else 0.0


def _halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(n)
    return idx[0::2], idx[1::2]


def position_share(x: torch.Tensor) -> float:
    """Adjusted R^2 of the per-position mean state (one-way ANOVA, positions as groups). x: [doc, position, d].

    The plain R^2 of N-document means is biased up by about 1/N (the means also fit noise); dividing the
    sums by their degrees of freedom removes that, so a sequence with no position part scores about 0.
    """
    N, T, _ = x.shape
    sse = _sse(x, x.mean(0, keepdim=True))
    sst = _sst(x)
    if sst <= 0 or N < 2:
        return 0.0
    return 1.0 - (sse / (T * (N - 1))) / (sst / (N * T - 1))


def position_profile(x: torch.Tensor) -> list[float]:
    """Per position t, the share of the states' variance there that is the position part (bias-corrected).

    (|mu_t - mu|^2 - s_t^2 / N) / mean_n |x_nt - mu|^2, with mu_t the mean over documents at t, mu the
    overall mean and s_t^2 the spread of documents around mu_t; about 0 where position carries nothing.
    """
    N = x.shape[0]
    mu = x.reshape(-1, x.shape[-1]).mean(0)
    mu_t = x.mean(0)
    within = (x - mu_t).pow(2).sum(-1).sum(0) / max(N - 1, 1)  # [T]
    between = (mu_t - mu).pow(2).sum(-1) - within / N
    total = (x - mu).pow(2).sum(-1).mean(0).clamp_min(1e-30)
    return (between / total).tolist()


def token_share(x: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """Cross-fitted R^2 of the per-token-id mean state, on evaluated tokens whose id the fitting half saw,
    and that coverage (the share of evaluated tokens seen when fitting)."""
    a, b = _halves(x.shape[0])
    d = x.shape[-1]
    sse = sst = 0.0
    seen = total = 0
    for fit, ev in ((a, b), (b, a)):
        xf, tf = x[fit].reshape(-1, d), tokens[fit].reshape(-1)
        xe, te = x[ev].reshape(-1, d), tokens[ev].reshape(-1)
        ids, inverse = torch.unique(tf, return_inverse=True)
        sums = torch.zeros(len(ids), d, dtype=x.dtype).index_add_(0, inverse, xf)
        means = sums / torch.bincount(inverse, minlength=len(ids)).to(x.dtype)[:, None]
        pos = torch.searchsorted(ids, te).clamp_max(len(ids) - 1)
        hit = ids[pos] == te
        xs = xe[hit]
        sse += _sse(xs, means[pos[hit]])
        sst += float((xs - xe.mean(0)).pow(2).sum())
        seen += int(hit.sum())
        total += len(te)
    return _r2(sse, sst), seen / total if total else 0.0


def neighbour_mean(x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Centred mean of positions t-h..t+h except t itself (h = window // 2), clipped at the edges.

    `window=None` uses the whole document. x: [doc, position, d] -> same shape.
    """
    T = x.shape[1]
    h = T if window is None else max(1, window // 2)
    c = torch.nn.functional.pad(x.cumsum(1), (0, 0, 1, 0))  # c[:, j] = sum of x[:, :j]
    t = torch.arange(T)
    lo, hi = (t - h).clamp_min(0), (t + h + 1).clamp_max(T)
    sums = c[:, hi] - c[:, lo] - x
    counts = (hi - lo - 1).to(x.dtype).clamp_min(1)
    return sums / counts[None, :, None]


def trailing_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of the `window` positions before t (t-window..t-1), fewer at the start; position 0 of the analysed
    states is predicted by nothing (its own value is left out, so it counts as an error of its full size).

    The causal twin of `neighbour_mean`: only what the model could have carried from the past."""
    T = x.shape[1]
    c = torch.nn.functional.pad(x.cumsum(1), (0, 0, 1, 0))
    t = torch.arange(T)
    lo = (t - window).clamp_min(0)
    sums = c[:, t] - c[:, lo]
    counts = (t - lo).to(x.dtype)
    out = sums / counts.clamp_min(1)[None, :, None]
    return out


def slow_share(x: torch.Tensor, window: int | None) -> float:
    """Out-of-sample R^2 of the centred leave-self-out moving average (`neighbour_mean`)."""
    return _r2(_sse(x, neighbour_mean(x, window)), _sst(x))


def causal_slow_share(x: torch.Tensor, window: int) -> float:
    """R^2 of the trailing (past-only) moving average (`trailing_mean`)."""
    return _r2(_sse(x, trailing_mean(x, window)), _sst(x))


def cosine_by_distance(x: torch.Tensor, max_distance: int) -> list[float]:
    """Mean cosine of (state - mean state) at positions t and t+d of the same document, d = 1..max_distance."""
    centred = x - x.reshape(-1, x.shape[-1]).mean(0)
    u = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = torch.bmm(u, u.transpose(1, 2)).mean(0)  # [T, T], averaged over documents
    return [float(torch.diagonal(gram, d).mean()) for d in range(1, max_distance + 1)]


def fit_decay(cos: list[float]) -> tuple[float, float, float]:
    """Least-squares c(d) = A exp(-d / tau) + B over d = 1..D with A >= 0: (tau, A, B).

    tau is searched on a log grid from 0.1 to 2 D: beyond that the exponential is a straight line over the
    measured distances and cannot be told from the plateau. A flat curve gives A ~ 0 (tau then means nothing).
    """
    c = torch.tensor(cos, dtype=torch.float64)
    n = len(c)
    d = torch.arange(1, n + 1, dtype=torch.float64)
    taus = torch.logspace(-1, math.log10(max(2.0 * n, 1.0)), 301, dtype=torch.float64)
    e = torch.exp(-d[None, :] / taus[:, None])  # [tau, d]
    # Normal equations of [e, 1] per tau, solved in closed form; A < 0 falls back to the flat fit A = 0.
    see, se, sc, sec = (e * e).sum(1), e.sum(1), c.sum(), (e * c).sum(1)
    det = (see * n - se * se).clamp_min(1e-30)
    a = (sec * n - se * sc) / det
    b = (see * sc - se * sec) / det
    flat = a < 0
    a = torch.where(flat, torch.zeros_like(a), a)
    b = torch.where(flat, c.mean().expand_as(b), b)
    err = ((a[:, None] * e + b[:, None]) - c).pow(2).sum(1)
    i = int(err.argmin())
    return float(taus[i]), float(a[i]), float(b[i])


DECAY_FIT_MIN_R2 = 0.9  # below it, or with a near-flat curve, no single time constant is reported


def decay_fit_r2(cos: list[float], tau: float, amplitude: float, plateau: float) -> float:
    """R^2 of the fitted A exp(-d / tau) + B against the measured cosines (1 = the exponential describes them)."""
    c = torch.tensor(cos, dtype=torch.float64)
    d = torch.arange(1, len(c) + 1, dtype=torch.float64)
    fit = amplitude * torch.exp(-d / tau) + plateau
    sst = float((c - c.mean()).pow(2).sum())
    return 1.0 - float((fit - c).pow(2).sum()) / sst if sst > 0 else float("nan")


def d_e(cos: list[float]) -> int | None:
    return next((i + 1 for i, c in enumerate(cos) if c <= 1 / math.e), None)


def normalize_states(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "unit":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if how == "none":
        return x
    raise ForethoughtError(f"unknown normalization {how!r} (use {', '.join(NORMALIZE)})")


def analyse_layer(
    name: str, raw: torch.Tensor, tokens: torch.Tensor, window: int, normalize: str, generator: torch.Generator
) -> tuple[LayerAnatomy, float]:
    """All measures for one layer's states `raw` [doc, position, d] (position 0 already dropped)."""
    x = normalize_states(raw, normalize)
    N, T, _ = x.shape
    perm = torch.argsort(torch.rand(N, T, generator=generator), dim=1)
    shuffled = torch.gather(x, 1, perm[:, :, None].expand_as(x))
    tok, coverage = token_share(x, tokens)
    template = x.mean(0, keepdim=True)  # the position part, [1, position, d]
    cos = cosine_by_distance(x, min(MAX_DISTANCE, T - 1))
    tau, amplitude, plateau = fit_decay(cos)
    fit_r2 = decay_fit_r2(cos, tau, amplitude, plateau)
    if not (fit_r2 >= DECAY_FIT_MIN_R2 and amplitude > 0.05):
        tau = float("nan")  # the curve is shown as measured; a time constant only where one exponential fits
    by_window = {w: slow_share(x, w) for w in sorted({*WINDOWS, window}) if w < T}
    layer = LayerAnatomy(
        layer=name,
        position_share=position_share(x),
        token_share=tok,
        slow_share=by_window.get(window, slow_share(x, window)),
        causal_slow_share=causal_slow_share(x, window),
        document_share=slow_share(x, None),
        position_shuffled=position_share(shuffled),
        slow_shuffled=slow_share(shuffled, window),
        position_fast=1.0 - slow_share(template, window),
        memory_slow_share=slow_share(x - template, window),
        position_profile=position_profile(x),
        slow_by_window=by_window,
        cosine=cos,
        tau=tau,
        amplitude=amplitude,
        plateau=plateau,
        d_e=d_e(cos),
        decay_fit_r2=fit_r2,
        mean_norm=float(raw.norm(dim=-1).mean()),
    )
    return layer, coverage


def pca_view(name: str, x: torch.Tensor, first_position: int) -> PCAView:
    """2-D PCA of one document's states x [position, d]."""
    centred = x.double() - x.double().mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ v[:2].T
    var = s.pow(2)
    explained = (var[:2] / var.sum()).tolist() if float(var.sum()) > 0 else [0.0, 0.0]
    positions = list(range(first_position, first_position + x.shape[0]))
    return PCAView(name, positions, xy.tolist(), explained)


def pca_layers(names: list[str], count: int = 5) -> list[str]:
    """About `count` layers spread from embed to the last block."""
    if len(names) <= count:
        return list(names)
    picks = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)})
    return [names[i] for i in picks]


def analyse_states(
    names: list[str],
    states: torch.Tensor,
    docs: list[list[int]],
    window: int,
    normalize: str,
    seed: int = 0,
) -> tuple[list[LayerAnatomy], float]:
    tokens = torch.tensor(docs)[:, 1:]
    generator = torch.Generator().manual_seed(seed)
    out, coverage = [], 0.0
    for i, name in enumerate(names):
        layer, coverage = analyse_layer(name, states[i, :, 1:], tokens, window, normalize, generator)
        out.append(layer)
    return out, coverage


def anatomy(
    model: Transformer,
    docs: list[list[int]],
    layers: Sequence[int] | None = None,
    window: int = DEFAULT_WINDOW,
    normalize: str = "unit",
    random_control: Transformer | None = None,
    pca_doc: int = 0,
    model_name: str = "",
    corpus: dict | None = None,
) -> AnatomyResult:
    """Decompose the states of `docs` (equal-length token lists, >= 4 documents of >= 8 tokens)."""
    started = time.perf_counter()
    if normalize not in NORMALIZE:
        raise ForethoughtError(f"unknown normalization {normalize!r} (use {', '.join(NORMALIZE)})")
    if len(docs) < 4:
        raise ForethoughtError(f"anatomy needs at least 4 documents (two per half), got {len(docs)}")
    length = len(docs[0])
    if any(len(d) != length for d in docs):
        raise ForethoughtError("every document must have the same number of tokens")
    if length < 8:
        raise ForethoughtError(f"--length must be >= 8 tokens, got {length}")
    if length > model.config.context_length:
        raise ForethoughtError(f"--length {length} exceeds the context length {model.config.context_length}")
    if window < 2:
        raise ForethoughtError(f"--window must be >= 2 positions, got {window}")
    names = layer_names(model.config.n_layers, layers)
    states = collect_states(model, docs, names)
    norms = states.norm(dim=-1)  # [layer, doc, position]
    sink_layer = int(norms[:, :, 0].median(dim=1).values.argmax())  # where position 0 stands out most
    result = AnatomyResult(
        model=model_name or model.config.name,
        n_docs=len(docs),
        length=length,
        window=window,
        normalize=normalize,
        excluded_positions=[0],
        token_coverage=0.0,
        position0_norm=float(norms[sink_layer, :, 0].median()),
        other_norm=float(norms[sink_layer, :, 1:].median()),
        corpus=corpus or {},
    )
    result.layers, result.token_coverage = analyse_states(names, states, docs, window, normalize)
    doc = min(max(pca_doc, 0), len(docs) - 1)
    for name in pca_layers(names):
        x = normalize_states(states[names.index(name), doc, 1:], normalize)
        result.pca.append(pca_view(name, x, 1))
    del states, norms
    if random_control is not None:
        random_states = collect_states(random_control, docs, names)
        result.random, _ = analyse_states(names, random_states, docs, window, normalize)
    result.seconds = time.perf_counter() - started
    return result

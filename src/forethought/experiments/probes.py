"""Future-token probes on an activation store: how well does h_t^l predict the token at t+k?

Two readouts per layer l and offset k, both fitted on training documents and scored on held-out ones:
  (a) token probe: a linear map from h_t^l to scores over the tokens seen as targets in training;
  (b) Future Lens linear approximation: a linear map from h_t^l to the final-layer state h_{t+k-1}^L (the last
      resid_post), decoded by the model's own final norm + unembedding (so k = 1 at the last layer is the model).
Beside them: unigram and k-step bigram baselines, the model's own next-token prediction for k = 1, agreement with
the model's greedy token at t+k, and a control: the same probes trained on shuffled targets, which must fall to
the unigram baseline.

Why it is built this way (cost is the crux: 30 layers x 4 offsets on >= 200k tokens, on two CPU cores):
- Closed-form ridge regression, not SGD. A softmax probe 576 -> 49152 trained by SGD costs minutes per cell; the
  least-squares solution needs one Gram matrix G = Z^T Z per layer (577 x 577 with an intercept column), shared by
  every offset and by both readouts, and a right-hand side per target: Z^T Y for one-hot targets is an index_add
  (no dense one-hot), Z^T S_k for the lens is one GEMM. Least squares onto one-hot targets ranks tokens well
  (top-1/top-5); a temperature on the scores, fitted on validation tokens, turns them into probabilities for CE.
- Features are standardized per dimension (training mean and std): the residual stream has a few dimensions
  thousands of times larger than the rest, which would otherwise make one lambda wrong for most directions.
- Lambda is chosen per (layer, offset, readout) on a validation slice of the training documents, from a grid,
  by validation squared error. With an eigendecomposition G_trn = Q diag(e) Q^T, every lambda's validation error
  is a few 577 x 577 operations once P = Q^T B is known, so the whole grid costs about one solve. The lens error
  weights each target dimension by its inverse variance (otherwise the massive dimensions alone pick lambda).
  After selection the map is refitted on train + validation (the statistics simply add).
- Solves are in float64 (G is ill-conditioned for small lambda); the big products are float32.
- Scoring the lens needs full-vocabulary logits: n_eval x 576 x 49152 per cell, the dominant cost; the lens is
  therefore scored on the first `lens_eval_tokens` of the held-out sample (default 2048: top-1 s.e. <= 1.1%).
- The token probe's CE mixes its softmax over the seen vocabulary with the smoothed unigram, weighted by the
  Good-Turing estimate of the unseen mass (training tokens seen once / all), so a held-out token never seen in
  training costs a finite, honest amount instead of infinity.
- The shuffled control permutes the targets over training positions (the token ids for (a), the final states for
  (b)) and runs the same pipeline with the real probe's lambda; it is scored on `control_eval_tokens` (default
  1024), enough to show it sits at the unigram baseline. The lens control is fitted once per layer (a shuffled
  final state carries no offset), and scored against every offset's targets.
- All offsets use the same anchor positions: t with t + K inside its window (K = the largest offset), so the
  Gram matrix is shared exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from forethought.data.corpus import is_validation, near_duplicates
from forethought.data.store import ActivationStore
from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval, bootstrap_by_document, context_baselines
from forethought.experiments.probe_file import probe_metadata, save_probe_layer
from forethought.model.transformer import Transformer
from forethought.progress import Progress, tell

LAMBDA_GRID = tuple(10.0**e for e in range(-6, 1))  # times the number of training tokens (diag of G)
TEMPERATURE_TOKENS = 512  # validation tokens used to fit a readout's temperature (the lens, a quarter of them)
SELECT_TOKENS = 2048  # validation tokens that choose the layer (top-1 of the fit without them)


@dataclass
class Metrics:
    top1: float
    top5: float | None
    ce: float | None  # nats per token
    agreement: float | None = None  # top-1 equals the model's own greedy token at t+k
    n: int = 0


@dataclass
class Cell:
    layer: int
    offset: int
    probe: Metrics
    lens: Metrics
    probe_control: Metrics
    lens_control: Metrics
    probe_lambda: float
    lens_lambda: float
    probe_temperature: float
    lens_temperature: float
    probe_val_top1: float = float("nan")  # on validation positions, by the fit that excluded them
    excess: Interval | None = None  # probe top-1 minus the strongest context baseline's, held out


@dataclass
class ProbeResult:
    model: str
    store: str
    layers: list[int]
    offsets: list[int]
    n_train: int  # training positions (train + validation documents) the probes are fitted on
    n_val: int
    n_eval: int
    n_eval_lens: int
    n_eval_control: int
    probe_vocab: int
    baselines: dict[int, dict[str, Metrics]]  # offset -> unigram | bigram | model
    cells: list[Cell]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    probes_dir: str | None = None
    n_eval_documents: int = 0
    near_duplicates_removed: dict[str, float] = field(default_factory=dict)  # test doc -> shingle overlap
    context: dict[int, dict[str, Interval]] = field(default_factory=dict)  # offset -> baseline -> top-1
    context_settings: dict[int, dict[str, dict]] = field(default_factory=dict)
    headline: dict[int, dict] = field(default_factory=dict)  # offset -> layer chosen on validation, excess
    min_context: int = 0  # held-out positions have at least this many tokens of their document before them
    # the model's own top-1 at k = 1 minus the strongest context baseline's, on the held-out positions: whether the
    # setting can tell the model from the statistics at all
    discriminability: dict = field(default_factory=dict)
    per_position: dict = field(default_factory=dict, repr=False)  # arrays for later analyses; not in to_dict

    def cell(self, layer: int, offset: int) -> Cell:
        for c in self.cells:
            if c.layer == layer and c.offset == offset:
                return c
        raise KeyError((layer, offset))

    def grid(self, readout: str, metric: str = "top1") -> list[list[float | None]]:
        """[layer][offset] of one metric of one readout (probe, lens, probe_control, lens_control)."""
        return [[getattr(getattr(self.cell(lay, k), readout), metric) for k in self.offsets] for lay in self.layers]

    def to_dict(self) -> dict:
        keep, self.per_position = self.per_position, {}
        try:
            d = asdict(self)
        finally:
            self.per_position = keep
        d.pop("per_position")
        d["baselines"] = {str(k): {n: asdict(m) for n, m in v.items()} for k, v in self.baselines.items()}
        return d


# --------------------------------------------------------------------------------------------------- ridge


class Ridge:
    """Ridge regression from standardized features (with an intercept column) on shared Gram statistics."""

    def __init__(self, g_all: torch.Tensor, g_val: torch.Tensor, n_trn: int) -> None:
        self.g_all = g_all
        self.g_val = g_val
        self.n_trn = n_trn
        e, q = torch.linalg.eigh(g_all - g_val)
        self.e, self.q = e.clamp_min(0), q
        self.m = q.T @ g_val @ q  # validation Gram in the eigenbasis
        self._inverse: dict[float, torch.Tensor] = {}
        self._all_eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, b_all: torch.Tensor, b_val: torch.Tensor, weights: torch.Tensor | None = None) -> float:
        """Lambda from the grid with the least (weighted) validation squared error."""
        b_trn = (b_all - b_val).double()
        p = self.q.T @ b_trn
        r = self.q.T @ b_val.double()
        if weights is not None:
            w = weights.double()
            pr = (p * r * w).sum(1)
            k = ((p * w).float() @ p.T.float()).double()
        else:
            pr = (p * r).sum(1)
            k = (p.float() @ p.T.float()).double()
        best, best_err = LAMBDA_GRID[0], math.inf
        for alpha in LAMBDA_GRID:
            lam = alpha * self.n_trn
            d = 1.0 / (self.e + lam)
            # SSE(lambda) = const - 2 sum_i d_i (P*R)_i + sum_ij d_i d_j M_ij K_ij
            err = float(-2 * (d * pr).sum() + (d[:, None] * d[None, :] * self.m * k).sum())
            if err < best_err:
                best, best_err = alpha, err
        return best

    def solve_train(self, b_trn: torch.Tensor, alpha: float) -> torch.Tensor:
        """The fit on the training part alone (validation held out), for fitting temperatures out of sample."""
        d = 1.0 / (self.e + alpha * self.n_trn)
        return (self.q @ (d[:, None] * (self.q.T @ b_trn.double()))).float()

    def solve(self, b_all: torch.Tensor, alpha: float) -> torch.Tensor:
        """W [p, m] = (G_all + lambda I)^-1 B_all, in float32."""
        if alpha not in self._inverse:
            # Through the eigenbasis, not a Cholesky factor: the Gram is summed from float32 chunks, so with few
            # tokens and a tiny lambda it can come out a hair short of positive definite and Cholesky fails.
            if self._all_eigh is None:
                e, q = torch.linalg.eigh(self.g_all)
                self._all_eigh = (e.clamp_min(0), q)
            e, q = self._all_eigh
            self._inverse[alpha] = ((q / (e + alpha * self.n_trn)) @ q.T).float()
        return self._inverse[alpha] @ b_all.float()


def _gram(x: torch.Tensor, y: torch.Tensor | None = None, chunk: int = 65536) -> torch.Tensor:
    """x^T y in float64, accumulated over float32 chunks."""
    y = x if y is None else y
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        out += (x[i : i + chunk].T @ y[i : i + chunk]).double()
    return out


def _augment(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------- scoring


def fit_temperature(scores: torch.Tensor, targets: torch.Tensor, start: float = 1.0) -> float:
    """s minimizing mean CE of softmax(s * scores) at `targets`: Newton steps on a convex 1-D function.

    float32 (the gradient and curvature are means over rows; their rounding is far below the step tolerance):
    over a full vocabulary this is the probe run's costliest loop."""
    s = start
    z = scores.float()
    zy = z.gather(1, targets[:, None])[:, 0].double()
    for _ in range(10):
        p = torch.softmax(s * z, dim=1)
        pz = p * z
        mean = pz.sum(1)
        second = (pz * z).sum(1)
        g, h = float((mean.double() - zy).mean()), float((second.double() - mean.double() ** 2).mean())
        if h <= 1e-12:
            break
        step = g / h
        new = min(max(s - step, s / 4), s * 4)
        if abs(new - s) < 1e-3 * s:
            s = new
            break
        s = new
    return s


def _score(
    scores: torch.Tensor,
    targets: torch.Tensor,
    greedy: torch.Tensor | None,
    temperature: float,
    columns: torch.Tensor | None,
    fallback_logp: torch.Tensor | None,
    unseen_mass: float = 0.0,
) -> dict[str, float]:
    """Sums (not means) of top-1, top-5, CE, agreement over a chunk. `columns` maps score columns to token ids."""
    top5 = scores.topk(5, dim=1).indices
    if columns is not None:
        top5 = columns[top5]
    top1 = top5[:, 0]
    logp = torch.log_softmax(temperature * scores.float(), dim=1)
    if columns is None:
        lp = logp.gather(1, targets[:, None])[:, 0]
    else:
        # position of each target among the columns (-1: never a training target)
        where = torch.full((int(fallback_logp.shape[0]),), -1, dtype=torch.long)
        where[columns] = torch.arange(columns.shape[0])
        col = where[targets]
        seen = col >= 0
        p = torch.zeros(targets.shape[0], dtype=torch.float64)
        p[seen] = logp[seen].gather(1, col[seen, None])[:, 0].double().exp()
        lp = torch.log((1 - unseen_mass) * p + unseen_mass * fallback_logp[targets].double().exp())
    out = {
        "top1": float((top1 == targets).sum()),
        "top5": float((top5 == targets[:, None]).any(1).sum()),
        "ce": float(-lp.double().sum()),
    }
    if greedy is not None:
        out["agreement"] = float((top1 == greedy).sum())
    return out


def _metrics(sums: dict[str, float], n: int) -> Metrics:
    return Metrics(
        top1=sums["top1"] / n,
        top5=sums["top5"] / n,
        ce=sums["ce"] / n,
        agreement=sums["agreement"] / n if "agreement" in sums else None,
        n=n,
    )


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + v for k, v in b.items()}


# --------------------------------------------------------------------------------------------------- baselines


def _unigram(counts: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.log((counts.double() + delta) / (counts.sum() + delta * counts.shape[0]))


def _baselines(
    tokens: torch.Tensor,
    greedy: torch.Tensor,
    next_lp: torch.Tensor,
    trn: torch.Tensor,
    val: torch.Tensor,
    evaluation: torch.Tensor,
    offsets: list[int],
    vocab: int,
) -> tuple[dict[int, dict[str, Metrics]], torch.Tensor]:
    """Unigram, k-step bigram and (k = 1) the model itself, scored on the evaluation positions."""
    train_all = torch.cat([trn, val])
    out: dict[int, dict[str, Metrics]] = {}
    # Unigram over every training target position (the distribution of "a token"), add-delta smoothed.
    counts_trn = torch.bincount(tokens[trn + 1], minlength=vocab)
    delta = min(
        (1e-3, 1e-2, 0.1, 1.0),
        key=lambda d: float(-_unigram(counts_trn, d)[tokens[val + 1]].mean()),
    )
    counts = torch.bincount(tokens[train_all + 1], minlength=vocab)
    uni_logp = _unigram(counts, delta)
    uni_top5 = counts.topk(5).indices
    for k in offsets:
        y = tokens[evaluation + k]
        g = greedy[evaluation + k - 1]
        n = len(evaluation)
        res: dict[str, Metrics] = {}
        res["unigram"] = Metrics(
            top1=float((uni_top5[0] == y).float().mean()),
            top5=float((uni_top5[None, :] == y[:, None]).any(1).float().mean()),
            ce=float(-uni_logp[y].mean()),
            agreement=float((uni_top5[0] == g).float().mean()),
            n=n,
        )
        res["bigram"] = _bigram(tokens, trn, val, train_all, evaluation, k, vocab, uni_logp, uni_top5, g)
        if k == 1:
            lp = next_lp[evaluation]
            res["model"] = Metrics(
                top1=float((greedy[evaluation] == y).float().mean()),
                top5=None,
                ce=float(-lp.double().mean()),
                agreement=1.0,
                n=n,
            )
        out[k] = res
    return out, uni_logp


def _bigram(tokens, trn, val, train_all, evaluation, k, vocab, uni_logp, uni_top5, greedy_at) -> Metrics:
    """p(token at t+k | token at t) from training counts, interpolated with the unigram (beta chosen on validation)."""

    def table(anchors):
        keys = tokens[anchors] * vocab + tokens[anchors + k]
        uniq, cnt = torch.unique(keys, return_counts=True)
        return uniq, cnt

    def logp(uniq, cnt, ctx_counts, a, b, beta):
        keys = a * vocab + b
        pos = torch.searchsorted(uniq, keys).clamp_max(len(uniq) - 1)
        c_ab = torch.where(uniq[pos] == keys, cnt[pos], torch.zeros_like(cnt[pos])).double()
        c_a = ctx_counts[a].double()
        return torch.log((c_ab + beta * uni_logp[b].exp()) / (c_a + beta))

    uniq_t, cnt_t = table(trn)
    ctx_t = torch.bincount(tokens[trn], minlength=vocab)
    a_val, b_val = tokens[val], tokens[val + k]
    beta = min((0.1, 1.0, 10.0, 100.0), key=lambda bt: float(-logp(uniq_t, cnt_t, ctx_t, a_val, b_val, bt).mean()))
    uniq, cnt = table(train_all)
    ctx = torch.bincount(tokens[train_all], minlength=vocab)
    a, y = tokens[evaluation], tokens[evaluation + k]
    ce = float(-logp(uniq, cnt, ctx, a, y, beta).mean())
    # top-5 per context: sort the pairs by (context, -count) and take the first five of each context
    ctx_of, next_of = uniq // vocab, uniq % vocab
    order = torch.argsort(-cnt, stable=True)
    order = order[torch.argsort(ctx_of[order], stable=True)]
    ctx_sorted, next_sorted = ctx_of[order], next_of[order]
    start = torch.searchsorted(ctx_sorted, a)
    preds = []
    for j in range(5):
        pos = (start + j).clamp_max(len(ctx_sorted) - 1)
        ok = ctx_sorted[pos] == a
        preds.append(torch.where(ok, next_sorted[pos], torch.full_like(a, -1)))
    top5 = torch.stack(preds, 1)
    # contexts never seen (or with fewer than five successors): fill from the unigram's top tokens
    for j in range(5):
        missing = top5[:, j] < 0
        top5[missing, j] = uni_top5[j]
    top1 = top5[:, 0]
    return Metrics(
        top1=float((top1 == y).float().mean()),
        top5=float((top5 == y[:, None]).any(1).float().mean()),
        ce=ce,
        agreement=float((top1 == greedy_at).float().mean()),
        n=len(evaluation),
    )


# --------------------------------------------------------------------------------------------------- driver


class Timings(dict):
    """Seconds per named step, accumulated over the layers."""

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Positions:
    """Which store positions (anchor t) each role uses. Every array holds flat store indices."""

    trn: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    evaluation: torch.Tensor  # random held-out sample, near-duplicates of training documents removed
    lens_eval: torch.Tensor
    ctrl_eval: torch.Tensor
    select: torch.Tensor  # validation sample used to pick lambda-free choices: the layer, temperatures
    n_test_documents: int
    near_duplicates: dict[str, float]

    @property
    def train_all(self) -> torch.Tensor:
        return torch.cat([self.trn, self.val])  # validation rows last: stats of the first len(trn) rows are "train"


def split_positions(
    store: ActivationStore,
    max_offset: int,
    eval_tokens: int,
    lens_eval_tokens: int,
    control_eval_tokens: int,
    val_fraction: float,
    seed: int,
    dedup_threshold: float | None = 0.5,
    min_context: int = 0,
) -> Positions:
    """Anchors t with t + max_offset inside the window; train / validation / test by document; the held-out
    sample drops test documents whose 8-token shingles mostly occur in the training documents. `min_context`:
    held-out positions only where the model has read at least that many tokens of t's own document in its window
    (deep in a window, where the model can use its context; training positions are all kept)."""
    tokens = store.array("token_ids").long()
    doc_of = store.array("doc_ids").long()
    split = store.array("split").long().repeat_interleave(store.window)
    n = tokens.shape[0]
    anchor = torch.arange(n) % store.window < store.window - max_offset
    documents = store.documents
    doc_val = torch.tensor([is_validation(d[0], val_fraction) for d in documents], dtype=torch.bool)
    val_mask = anchor & (split == 0) & doc_val[doc_of]
    if not val_mask.any():  # a store of a few documents: hold back every 10th training window instead
        val_mask = anchor & (split == 0) & (torch.arange(n) // store.window % 10 == 9)
    trn = torch.nonzero(anchor & (split == 0) & ~val_mask)[:, 0]
    val = torch.nonzero(val_mask)[:, 0]
    test_mask = anchor & (split == 1)
    deep = torch.ones(n, dtype=torch.bool)
    if min_context:
        local = torch.arange(n) % store.window
        back = (torch.arange(n) - min_context).clamp_min(0)
        deep = (local >= min_context) & (doc_of[back] == doc_of)
        test_mask &= deep
    removed = {}
    if dedup_threshold is not None:
        removed = _near_duplicate_documents(tokens, doc_of, split, documents, dedup_threshold)
    if removed:
        bad = torch.zeros(len(documents), dtype=torch.bool)
        bad[list(removed)] = True
        test_mask &= ~bad[doc_of]
    test = torch.nonzero(test_mask)[:, 0]
    if len(test) == 0 or len(trn) == 0 or len(val) == 0:
        raise ForethoughtError(
            f"the store has {len(trn)} train, {len(val)} validation and {len(test)} test positions"
            + (f" ({min_context}+ tokens into their document)" if min_context else "")
            + "; every one must be non-empty (extract more --tokens)"
        )
    gen = torch.Generator().manual_seed(seed)
    evaluation = test[torch.randperm(len(test), generator=gen)[: min(eval_tokens, len(test))]].sort().values
    n_lens = min(lens_eval_tokens, len(evaluation))
    n_ctrl = min(control_eval_tokens, len(evaluation))
    # the lens and the control score subsets of the same random held-out sample
    lens_eval = evaluation[torch.randperm(len(evaluation), generator=gen)[:n_lens]].sort().values
    ctrl_eval = evaluation[torch.randperm(len(evaluation), generator=gen)[:n_ctrl]].sort().values
    # the validation rows that choose the layer, fit temperatures and weigh the stacked readout: as deep in their
    # window as the held-out ones (where there are enough of them)
    val_deep = val[deep[val]]
    pool = val_deep if len(val_deep) >= min(SELECT_TOKENS // 4, len(val)) else val
    select = pool[torch.randperm(len(pool), generator=gen)[:SELECT_TOKENS]]
    return Positions(
        trn,
        val,
        test,
        evaluation,
        lens_eval,
        ctrl_eval,
        select,
        n_test_documents=len(torch.unique(doc_of[evaluation])),
        near_duplicates={documents[i][0]: share for i, share in removed.items()},
    )


def _near_duplicate_documents(tokens, doc_of, split, documents, threshold: float) -> dict[int, float]:
    """Store document index -> shingle overlap share, for test documents that near-copy training ones."""
    order = torch.argsort(doc_of, stable=True)
    ids_sorted, docs_sorted = tokens[order].numpy(), doc_of[order].numpy()
    side = split[order].numpy()
    bounds = np.flatnonzero(np.diff(docs_sorted)) + 1
    train, test = {}, {}
    for chunk, sides, docs in zip(
        np.split(ids_sorted, bounds), np.split(side, bounds), np.split(docs_sorted, bounds), strict=True
    ):
        (test if sides[0] == 1 else train)[int(docs[0])] = chunk
    return near_duplicates(train, test, threshold=threshold)


def run_probes(
    store: ActivationStore,
    model: Transformer,
    offsets: list[int],
    layers: list[int] | None = None,
    eval_tokens: int = 4096,
    lens_eval_tokens: int = 2048,
    control_eval_tokens: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    save_dir: str | Path | None = "default",
    progress: Progress | None = None,
    n_boot: int = 1000,
    dedup_threshold: float | None = 0.5,
    min_context: int = 0,
    stacked: bool = True,
) -> ProbeResult:
    """Fit and score both readouts for every (layer, offset) beside context-matched baselines; save the fitted
    maps under `save_dir`. `dedup_threshold`: drop held-out documents whose 8-token shingles occur in training
    documents above this share (None: keep all, for synthetic data whose sequences repeat by construction).
    The headline per offset is the probe at the layer chosen on validation, minus the
    strongest context baseline, with a 95% interval from a bootstrap over held-out documents."""
    started = time.perf_counter()
    layers = list(store.layers if layers is None else layers)
    setup = prepare_probes(
        store,
        model,
        offsets,
        eval_tokens,
        lens_eval_tokens,
        control_eval_tokens,
        val_fraction,
        seed,
        dedup_threshold,
        min_context,
        stacked,
    )
    with setup.timings.timed("load"):
        s_final = store.layer(model.config.n_layers - 1)
    save_path = None
    if save_dir is not None:
        save_path = Path(store.path / "probes" if save_dir == "default" else save_dir)
        save_path.mkdir(parents=True, exist_ok=True)

    fitter = layer_fitter(setup, model, s_final, seed)
    cells: list[Cell] = []
    correct: dict[tuple[int, int], torch.Tensor] = {}
    tell(progress, 0, len(layers))
    for done, layer in enumerate(layers, start=1):
        layer_cells, layer_correct = fit_probe_layer(fitter, store, layer, save_path)
        cells += layer_cells
        correct.update(layer_correct)
        tell(progress, done, len(layers))
    return summarize_probes(setup, store, layers, cells, correct, n_boot, save_path, started)


@dataclass
class ProbeSetup:
    """What every layer's fit shares and the summary reads: positions, baselines, probe vocabulary. Deterministic
    in (store, offsets, options), so a Ray worker that prepares its own copy gets the driver's exactly."""

    offsets: list[int]
    tokens: torch.Tensor
    greedy: torch.Tensor
    doc_of: torch.Tensor
    pos: Positions
    baselines: dict[int, dict[str, Metrics]]
    uni_logp: torch.Tensor
    vocab_info: ProbeVocabulary
    context: dict
    timings: Timings
    min_context: int = 0
    stack: dict | None = None  # offset -> StackBaselines: B and B_long, and what B + h needs (None: not asked)


def prepare_probes(
    store: ActivationStore,
    model: Transformer,
    offsets: list[int],
    eval_tokens: int = 4096,
    lens_eval_tokens: int = 2048,
    control_eval_tokens: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    dedup_threshold: float | None = 0.5,
    min_context: int = 0,
    stacked: bool = True,
) -> ProbeSetup:
    """`run_probes`' first phase: check the request, split positions, fit the baselines (once per run)."""
    timings = Timings()
    offsets = sorted(offsets)
    if min(offsets) < 1 or max(offsets) >= store.window:
        raise ForethoughtError(f"offsets must lie in 1..{store.window - 1}")
    final = model.config.n_layers - 1
    if final not in store.layers:
        raise ForethoughtError(f"the store lacks the final layer {final}, which the Future Lens targets")
    vocab = model.config.vocab_size

    with timings.timed("prepare"):
        tokens = store.array("token_ids").long()
        greedy = store.array("greedy_ids").long()
        next_lp = store.array("next_logprob")
        doc_of = store.array("doc_ids").long()
        pos = split_positions(
            store,
            max(offsets),
            eval_tokens,
            lens_eval_tokens,
            control_eval_tokens,
            val_fraction,
            seed,
            dedup_threshold,
            min_context,
        )
        baselines, uni_logp = _baselines(tokens, greedy, next_lp, pos.trn, pos.val, pos.evaluation, offsets, vocab)
        vocab_info = ProbeVocabulary.build(tokens, pos.train_all, offsets, vocab)
    with timings.timed("context_baselines"):
        context = {
            k: context_baselines(tokens, pos.trn, pos.val, pos.evaluation, k, store.window, vocab) for k in offsets
        }
    stack = None
    if stacked:
        from forethought.experiments.stacked import StackedInputs, stack_baselines

        with timings.timed("stacked_baselines"):
            inputs = StackedInputs(
                tokens=tokens.numpy().astype(np.int64),
                greedy=greedy.numpy().astype(np.int64),
                doc_of=doc_of.numpy(),
                train_all=pos.train_all.numpy(),
                evaluation=pos.evaluation.numpy(),
                window=store.window,
                vocab=vocab,
                columns=vocab_info.columns,
            )
            select = pos.select.numpy()
            stack = {k: stack_baselines(inputs, k, context[k], select, uni_logp.float()) for k in offsets}
    return ProbeSetup(
        offsets, tokens, greedy, doc_of, pos, baselines, uni_logp, vocab_info, context, timings, min_context, stack
    )


def layer_fitter(setup: ProbeSetup, model: Transformer, s_final: torch.Tensor, seed: int) -> LayerFitter:
    return LayerFitter(
        model,
        setup.tokens,
        setup.greedy,
        setup.pos,
        setup.offsets,
        setup.vocab_info,
        setup.uni_logp,
        s_final,
        setup.timings,
        seed,
        setup.stack,
    )


def fit_probe_layer(fitter: LayerFitter, store: ActivationStore, layer: int, save_path: Path | None):
    """`run_probes`' second phase for one layer: its cells and per-position hits, its maps saved."""
    timings = fitter.timings
    with timings.timed("load"):
        final = fitter.model.config.n_layers - 1
        h = fitter.s_final if layer == final else store.layer(layer)
    layer_cells, saved, layer_correct = fitter.fit(layer, h)
    if save_path is not None:
        with timings.timed("save"):
            meta = probe_metadata(layer, layer_cells, store.manifest["model"]["name"], str(store.path))
            save_probe_layer(save_path, layer, saved, meta)
    return layer_cells, layer_correct


def summarize_probes(
    setup: ProbeSetup,
    store: ActivationStore,
    layers: list[int],
    cells: list[Cell],
    correct: dict[tuple[int, int], torch.Tensor],
    n_boot: int,
    save_path: Path | None,
    started: float,
) -> ProbeResult:
    """`run_probes`' last phase, over all layers together: intervals, the layer chosen on validation."""
    pos, offsets, timings = setup.pos, setup.offsets, setup.timings
    with timings.timed("intervals"):
        summary = _summarize(
            setup.tokens, setup.doc_of, pos.evaluation, offsets, layers, cells, correct, setup.context, n_boot
        )
        discriminability = _discriminability(setup, summary, n_boot) if 1 in offsets else {}
    if setup.stack is not None:
        with timings.timed("stacked"):
            _stacked(setup, store.window, correct, summary, n_boot)
    return ProbeResult(
        model=store.manifest["model"]["name"],
        store=str(store.path),
        layers=layers,
        offsets=offsets,
        n_train=len(pos.train_all),
        n_val=len(pos.val),
        n_eval=len(pos.evaluation),
        n_eval_lens=len(pos.lens_eval),
        n_eval_control=len(pos.ctrl_eval),
        probe_vocab=len(setup.vocab_info.columns),
        baselines=setup.baselines,
        cells=cells,
        seconds=time.perf_counter() - started,
        timings=dict(timings),
        probes_dir=str(save_path) if save_path is not None else None,
        n_eval_documents=pos.n_test_documents,
        near_duplicates_removed=pos.near_duplicates,
        context=summary["context"],
        context_settings={k: setup.context[k].chosen for k in offsets},
        headline=summary["headline"],
        per_position=summary["per_position"],
        min_context=setup.min_context,
        discriminability=discriminability,
    )


@dataclass
class ProbeVocabulary:
    """The token probe's output columns: every token that is a target at some offset in training."""

    columns: torch.Tensor
    column_of: torch.Tensor  # token id -> column, -1 for tokens never a training target
    unseen_mass: float  # Good-Turing estimate of the probability of a never-seen target

    @classmethod
    def build(cls, tokens: torch.Tensor, train_all: torch.Tensor, offsets: list[int], vocab: int) -> ProbeVocabulary:
        targets_all = torch.cat([tokens[train_all + k] for k in offsets])
        columns = torch.unique(targets_all)
        column_of = torch.full((vocab,), -1, dtype=torch.long)
        column_of[columns] = torch.arange(len(columns))
        singletons = int((torch.bincount(targets_all, minlength=vocab) == 1).sum())
        return cls(columns, column_of, min(max(singletons / len(targets_all), 1e-4), 0.5))


class LayerFitter:
    """Both readouts and their shuffled controls for every offset at one layer, on one set of Gram statistics."""

    def __init__(
        self, model, tokens, greedy, pos: Positions, offsets, vocab_info, uni_logp, s_final, timings, seed, stack=None
    ):
        self.model, self.tokens, self.greedy, self.pos = model, tokens, greedy, pos
        self.offsets, self.v, self.uni_logp, self.s_final, self.timings = (
            offsets,
            vocab_info,
            uni_logp,
            s_final,
            timings,
        )
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.train_all = pos.train_all
        self.perm = torch.randperm(len(self.train_all), generator=self.gen)  # the control's shuffle of positions
        self.stack = stack  # offset -> StackBaselines (None: no stacked readout)
        self.stack_hits: dict[int, dict[str, torch.Tensor]] = {}
        self.stack_weights: dict[int, dict] = {}

    @torch.inference_mode()
    def decode(self, states: torch.Tensor) -> torch.Tensor:
        """The model's own final norm + unembedding, logits on the CPU."""
        return self.model.lens_logits(states).cpu()

    def fit(self, layer: int, h: torch.Tensor):
        pos, timings = self.pos, self.timings
        with timings.timed("gram"):
            h_train = h[self.train_all]
            mean = h_train.mean(0)
            std = h_train.std(0).clamp_min(1e-6)
            z_train = _augment((h_train - mean) / std)
            del h_train
            n_trn = len(pos.trn)
            g_val = _gram(z_train[n_trn:])
            ridge = Ridge(_gram(z_train[:n_trn]) + g_val, g_val, n_trn)
            z_eval = _augment((h[pos.evaluation] - mean) / std)
            z_sel = _augment((h[pos.select] - mean) / std)
        # drawn from (seed, layer), not from a generator shared across the loop over layers: a layer fitted alone
        # (one Ray task per layer) gets the rows a sequential run gives it
        layer_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, layer]).generate_state(1)[0]))
        val_rows = n_trn + torch.randperm(len(pos.val), generator=layer_gen)[:TEMPERATURE_TOKENS]
        saved: dict[str, torch.Tensor] = {"mean": mean, "std": std, "columns": self.v.columns.to(torch.int32)}
        cells, correct = [], {}
        self._lens_ctrl = None
        for k in self.offsets:
            with timings.timed("probe"):
                probe_m, ctrl_m, alpha_p, temp_p, w_probe, val_top1, ok = self._token_probe(
                    k, ridge, z_train, z_eval, z_sel, val_rows, n_trn
                )
            with timings.timed("lens"):
                lens_m, lens_ctrl_m, alpha_l, temp_l, w_lens = self._lens(k, ridge, z_train, z_eval, z_sel, val_rows)
            cells.append(
                Cell(layer, k, probe_m, lens_m, ctrl_m, lens_ctrl_m, alpha_p, alpha_l, temp_p, temp_l, val_top1)
            )
            correct[(layer, k)] = ok
            for name, hits in self.stack_hits.pop(k, {}).items():  # B + h, B_long + h at this layer
                correct[(layer, k, name)] = hits
            saved[f"probe.{k}"] = w_probe.to(torch.float16)
            saved[f"lens.{k}"] = w_lens
        return cells, saved, correct

    def _token_probe(self, k, ridge, z_train, z_eval, z_sel, val_rows, n_trn):
        tokens, pos, v = self.tokens, self.pos, self.v
        y_eval = tokens[pos.evaluation + k]
        g_eval = self.greedy[pos.evaluation + k - 1]
        col = v.column_of[tokens[self.train_all + k]]
        d = z_train.shape[1]
        b_all = torch.zeros(len(v.columns), d).index_add_(0, col, z_train).T
        b_val = torch.zeros(len(v.columns), d).index_add_(0, col[n_trn:], z_train[n_trn:]).T
        alpha = ridge.select(b_all, b_val)
        w_probe = ridge.solve(b_all, alpha)
        # the layer is chosen, and the temperature fitted, on validation rows by the fit that never saw them
        sel_scores = z_sel @ ridge.solve_train(b_all - b_val, alpha)
        val_top1 = float((v.columns[sel_scores.argmax(1)] == tokens[pos.select + k]).float().mean())
        n_t = min(TEMPERATURE_TOKENS, len(pos.select))
        temp = fit_temperature(sel_scores[:n_t], v.column_of[tokens[pos.select[:n_t] + k]].clamp_min(0), 10.0)
        scores = z_eval @ w_probe
        ok = v.columns[scores.argmax(1)] == y_eval
        probe_m = _metrics(
            _score(scores, y_eval, g_eval, temp, v.columns, self.uni_logp, v.unseen_mass), len(pos.evaluation)
        )
        if self.stack is not None:  # what h_t adds to the baseline features: B + h at this (layer, k)
            from forethought.experiments.stacked import stack_with_h

            hits, weights = stack_with_h(
                self.stack[k],
                self.uni_logp.float(),
                torch.log_softmax(temp * sel_scores, dim=1),
                torch.log_softmax(temp * scores, dim=1),
                v.columns,
                v.column_of,
                v.unseen_mass,
            )
            self.stack_hits[k] = {name: torch.from_numpy(h) for name, h in hits.items()}
            self.stack_weights[k] = weights
        # control: the same pipeline on shuffled targets (temperature on shuffled validation targets)
        col_shuf = col[self.perm]
        b_ctrl_trn = torch.zeros(len(v.columns), d).index_add_(0, col_shuf[:n_trn], z_train[:n_trn])
        b_ctrl = b_ctrl_trn.index_add(0, col_shuf[n_trn:], z_train[n_trn:]).T
        w_ctrl = ridge.solve(b_ctrl, alpha)
        temp_c = fit_temperature(z_train[val_rows] @ ridge.solve_train(b_ctrl_trn.T, alpha), col_shuf[val_rows], 10.0)
        at = torch.searchsorted(pos.evaluation, pos.ctrl_eval)
        ctrl_m = _metrics(
            _score(z_eval[at] @ w_ctrl, y_eval[at], g_eval[at], temp_c, v.columns, self.uni_logp, v.unseen_mass),
            len(at),
        )
        return probe_m, ctrl_m, alpha, temp, w_probe, val_top1, ok

    def _lens(self, k, ridge, z_train, z_eval, z_sel, val_rows):
        """Future Lens: h_t^l -> h_{t+k-1}^L, decoded by the model."""
        tokens, pos, n_trn = self.tokens, self.pos, len(self.pos.trn)
        y_eval = tokens[pos.evaluation + k]
        g_eval = self.greedy[pos.evaluation + k - 1]
        s_train = self.s_final[self.train_all + k - 1]
        b_val = _gram(z_train[n_trn:], s_train[n_trn:])
        b_all = _gram(z_train[:n_trn], s_train[:n_trn]) + b_val
        weights = 1.0 / s_train[:n_trn].var(0).clamp_min(1e-6)
        alpha = ridge.select(b_all, b_val, weights)
        w_lens = ridge.solve(b_all, alpha)
        w_lens_trn = ridge.solve_train(b_all - b_val, alpha)
        at_ctrl = torch.searchsorted(pos.evaluation, pos.ctrl_eval)
        if self._lens_ctrl is None:  # shuffled final states carry no offset: one control per layer
            s_shuf = self.s_final[self.train_all[self.perm]]
            b_ctrl_trn = _gram(z_train[:n_trn], s_shuf[:n_trn])
            w_ctrl = ridge.solve(b_ctrl_trn + _gram(z_train[n_trn:], s_shuf[n_trn:]), alpha)
            rows = val_rows[: TEMPERATURE_TOKENS // 4]
            temp_ctrl = fit_temperature(
                self.decode(z_train[rows] @ ridge.solve_train(b_ctrl_trn, alpha)),
                tokens[self.train_all[self.perm][rows] + 1],
            )
            # the control's predictions do not depend on k: decode them once
            logits = [self.decode(z_eval[at_ctrl[i : i + 1024]] @ w_ctrl) for i in range(0, len(at_ctrl), 1024)]
            self._lens_ctrl = (temp_ctrl, logits)
        n_t = min(TEMPERATURE_TOKENS // 4, len(pos.select))
        temp = fit_temperature(self.decode(z_sel[:n_t] @ w_lens_trn), tokens[pos.select[:n_t] + k])
        sums: dict[str, float] = {}
        at = torch.searchsorted(pos.evaluation, pos.lens_eval)
        for i in range(0, len(at), 1024):
            p = at[i : i + 1024]
            sums = _add(sums, _score(self.decode(z_eval[p] @ w_lens), y_eval[p], g_eval[p], temp, None, None))
        lens_m = _metrics(sums, len(at))
        temp_ctrl, ctrl_logits = self._lens_ctrl
        ctrl_sums: dict[str, float] = {}
        for i, logits in zip(range(0, len(at_ctrl), 1024), ctrl_logits, strict=True):
            p = at_ctrl[i : i + 1024]
            ctrl_sums = _add(ctrl_sums, _score(logits, y_eval[p], g_eval[p], temp_ctrl, None, None))
        return lens_m, _metrics(ctrl_sums, len(at_ctrl)), alpha, temp, w_lens


def _summarize(tokens, doc_of, evaluation, offsets, layers, cells, correct, context, n_boot) -> dict:
    """Intervals: every context baseline, every cell's excess over the strongest baseline, and the headline
    (the layer chosen on validation)."""
    docs = doc_of[evaluation].numpy()
    out_context: dict[int, dict[str, Interval]] = {}
    headline: dict[int, dict] = {}
    per_position: dict[str, object] = {"evaluation": evaluation.numpy(), "documents": docs}
    for k in offsets:
        y = tokens[evaluation + k].numpy()
        hits = {name: (p == y).astype(np.float64) for name, p in context[k].predictions.items()}
        out_context[k] = {name: bootstrap_by_document(v, docs, n_boot) for name, v in hits.items()}
        strongest = max(
            (n for n in hits if n != "unigram"), key=lambda n: (out_context[k][n].estimate, n == "copy+ngram")
        )
        base = hits[strongest]
        for c in (c for c in cells if c.offset == k):
            ok = correct[(c.layer, k)].numpy().astype(np.float64)
            c.excess = bootstrap_by_document(ok - base, docs, n_boot)
        chosen = max((c for c in cells if c.offset == k), key=lambda c: (c.probe_val_top1, -c.layer))
        ok = correct[(chosen.layer, k)].numpy().astype(np.float64)
        headline[k] = {
            "layer": chosen.layer,
            "probe_val_top1": chosen.probe_val_top1,
            "probe": bootstrap_by_document(ok, docs, n_boot),
            "strongest": strongest,
            "strongest_top1": out_context[k][strongest],
            "excess": chosen.excess,
        }
        per_position[f"probe@{k}"] = ok
        per_position[f"{strongest}@{k}"] = base
        per_position[f"strongest@{k}"] = strongest
    return {"context": out_context, "headline": headline, "per_position": per_position}


FEW_DOCUMENTS = 30  # below this many held-out documents a bootstrap over documents says little
SEPARABLE_POINTS = 5.0  # the model must beat the strongest baseline at k = 1 by this much for a verdict to mean much


def _discriminability(setup: ProbeSetup, summary: dict, n_boot: int) -> dict:
    """Model top-1 at k = 1 minus the strongest context baseline's, same held-out positions, bootstrap over
    documents; and the plain words a run prints about it."""
    ev = setup.pos.evaluation
    docs = setup.doc_of[ev].numpy()
    y = setup.tokens[ev + 1].numpy()
    model_hit = (setup.greedy[ev].numpy() == y).astype(np.float64)
    strongest = summary["headline"][1]["strongest"]
    base_hit = (setup.context[1].predictions[strongest] == y).astype(np.float64)
    diff = bootstrap_by_document(model_hit - base_hit, docs, n_boot)
    n_docs = len(np.unique(docs))
    if n_docs < FEW_DOCUMENTS:
        words = (
            f"only {n_docs} held-out documents: too few for a 95% interval over documents to mean much "
            f"(want >= {FEW_DOCUMENTS}; extract more --tokens)"
        )
    elif diff.low <= 0:
        words = "this setting cannot separate the model from the context statistics: no verdict on planning here"
    elif diff.estimate * 100 < SEPARABLE_POINTS:
        words = "the model is barely ahead of the context statistics here: small excesses say little"
    else:
        words = "the setting separates the model from the context statistics"
    return {
        "model_top1": bootstrap_by_document(model_hit, docs, n_boot),
        "strongest": strongest,
        "strongest_top1": bootstrap_by_document(base_hit, docs, n_boot),
        "model_minus_strongest": diff,
        "n_documents": n_docs,
        "min_context": setup.min_context,
        "words": words,
    }


def _stacked(setup: ProbeSetup, window: int, correct: dict, summary: dict, n_boot: int) -> None:
    """Per offset, at the layer chosen on validation: B vs B + h_t (and B_long vs B_long + h_t), with the excess
    and its strata into the headline, the per-position hits into per_position."""
    from forethought.experiments.stacked import StackedInputs, seen_stratum

    pos = setup.pos
    docs = setup.doc_of[pos.evaluation].numpy()
    seen = seen_stratum(
        StackedInputs(
            setup.tokens.numpy().astype(np.int64),
            setup.greedy.numpy().astype(np.int64),
            setup.doc_of.numpy(),
            pos.train_all.numpy(),
            pos.evaluation.numpy(),
            window,
            len(setup.vocab_info.column_of),
            setup.vocab_info.columns,
        )
    )
    headline, per_position = summary["headline"], summary["per_position"]
    for k in setup.offsets:
        layer = headline[k]["layer"]
        hits = dict(setup.stack[k].hits)
        for name in ("B+h", "Blong+h"):
            hits[name] = correct[(layer, k, name)].numpy().astype(np.float64)
        hits["seen4"] = seen
        headline[k]["stacked"] = _stacked_intervals(hits, per_position, k, docs, n_boot)
        headline[k]["stacked"]["weights"] = setup.stack[k].weights
        for name in ("B", "B+h", "Blong", "Blong+h", "seen4"):
            per_position[f"{name}@{k}"] = hits[name]


def _stacked_intervals(hits: dict, per_position: dict, k: int, docs: np.ndarray, n_boot: int) -> dict:
    probe_minus = per_position[f"probe@{k}"] - per_position[f"{per_position[f'strongest@{k}']}@{k}"]
    seen = hits["seen4"] > 0
    out: dict = {
        "B": bootstrap_by_document(hits["B"], docs, n_boot),
        "B+h": bootstrap_by_document(hits["B+h"], docs, n_boot),
        "excess": bootstrap_by_document(hits["B+h"] - hits["B"], docs, n_boot),
        "Blong": bootstrap_by_document(hits["Blong"], docs, n_boot),
        "Blong+h": bootstrap_by_document(hits["Blong+h"], docs, n_boot),
        "excess_long": bootstrap_by_document(hits["Blong+h"] - hits["Blong"], docs, n_boot),
        "strata": {},
    }
    for name, mask in (("seen", seen), ("unseen", ~seen)):
        if mask.sum() == 0:
            continue
        out["strata"][name] = {
            "share": float(mask.mean()),
            "excess": bootstrap_by_document((hits["B+h"] - hits["B"])[mask], docs[mask], n_boot),
            "probe_minus_strongest": bootstrap_by_document(probe_minus[mask], docs[mask], n_boot),
        }
    return out

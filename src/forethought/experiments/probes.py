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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forethought.data.corpus import is_validation
from forethought.data.store import ActivationStore
from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer

LAMBDA_GRID = tuple(10.0**e for e in range(-6, 1))  # times the number of training tokens (diag of G)
TEMPERATURE_TOKENS = 512  # validation tokens used to fit a readout's temperature


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

    def cell(self, layer: int, offset: int) -> Cell:
        for c in self.cells:
            if c.layer == layer and c.offset == offset:
                return c
        raise KeyError((layer, offset))

    def grid(self, readout: str, metric: str = "top1") -> list[list[float | None]]:
        """[layer][offset] of one metric of one readout (probe, lens, probe_control, lens_control)."""
        return [[getattr(getattr(self.cell(lay, k), readout), metric) for k in self.offsets] for lay in self.layers]

    def to_dict(self) -> dict:
        d = asdict(self)
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
            p = self.g_all.shape[0]
            lam = alpha * self.n_trn
            chol = torch.linalg.cholesky(self.g_all + lam * torch.eye(p, dtype=torch.float64))
            self._inverse[alpha] = torch.cholesky_inverse(chol).float()
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
    """s minimizing mean CE of softmax(s * scores) at `targets`: Newton steps on a convex 1-D function."""
    s = start
    z = scores.double()
    zy = z.gather(1, targets[:, None])[:, 0]
    for _ in range(12):
        p = torch.softmax(s * z, dim=1)
        mean = (p * z).sum(1)
        var = (p * z * z).sum(1) - mean**2
        g, h = float((mean - zy).mean()), float(var.mean())
        if h <= 1e-12:
            break
        step = g / h
        new = min(max(s - step, s / 4), s * 4)
        if abs(new - s) < 1e-4 * s:
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
    progress: bool = True,
) -> ProbeResult:
    """Fit and score both readouts for every (layer, offset); save the fitted maps under `save_dir`."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    layers = list(store.layers if layers is None else layers)
    offsets = sorted(offsets)
    K = max(offsets)
    if min(offsets) < 1 or K >= store.window:
        raise ForethoughtError(f"offsets must lie in 1..{store.window - 1}")
    final = model.config.n_layers - 1
    if final not in store.layers:
        raise ForethoughtError(f"the store lacks the final layer {final}, which the Future Lens targets")
    vocab = model.config.vocab_size

    t0 = time.perf_counter()
    tokens = store.array("token_ids").long()
    greedy = store.array("greedy_ids").long()
    next_lp = store.array("next_logprob")
    doc_of = store.array("doc_ids").long()
    split = store.array("split").long().repeat_interleave(store.window)
    n = tokens.shape[0]
    position = torch.arange(n) % store.window
    anchor = position < store.window - K
    documents = store.documents
    doc_val = torch.tensor([is_validation(d[0], val_fraction) for d in documents], dtype=torch.bool)
    val_mask = anchor & (split == 0) & doc_val[doc_of]
    if not val_mask.any():  # a store of a few documents: hold back every 10th training window instead
        val_mask = anchor & (split == 0) & (torch.arange(n) // store.window % 10 == 9)
    trn = torch.nonzero(anchor & (split == 0) & ~val_mask)[:, 0]
    val = torch.nonzero(val_mask)[:, 0]
    test = torch.nonzero(anchor & (split == 1))[:, 0]
    if len(test) == 0 or len(trn) == 0 or len(val) == 0:
        raise ForethoughtError(
            f"the store has {len(trn)} train, {len(val)} validation and {len(test)} test positions; "
            "every one must be non-empty (extract more --tokens)"
        )
    gen = torch.Generator().manual_seed(seed)
    evaluation = test[torch.randperm(len(test), generator=gen)[: min(eval_tokens, len(test))]].sort().values
    n_lens = min(lens_eval_tokens, len(evaluation))
    n_ctrl = min(control_eval_tokens, len(evaluation))
    # the lens and the control score subsets of the same random held-out sample
    lens_eval = evaluation[torch.randperm(len(evaluation), generator=gen)[:n_lens]].sort().values
    ctrl_eval = evaluation[torch.randperm(len(evaluation), generator=gen)[:n_ctrl]].sort().values
    train_all = torch.cat([trn, val])  # validation rows last: stats of the first len(trn) rows are "train"
    temp_rows = val[torch.randperm(len(val), generator=gen)[:TEMPERATURE_TOKENS]]
    baselines, uni_logp = _baselines(tokens, greedy, next_lp, trn, val, evaluation, offsets, vocab)

    # The token probe's columns: every token that is a target at some offset in training.
    targets_all = torch.cat([tokens[train_all + k] for k in offsets])
    columns = torch.unique(targets_all)
    column_of = torch.full((vocab,), -1, dtype=torch.long)
    column_of[columns] = torch.arange(len(columns))
    singletons = int((torch.bincount(targets_all, minlength=vocab) == 1).sum())
    unseen_mass = min(max(singletons / len(targets_all), 1e-4), 0.5)  # Good-Turing
    perm = torch.randperm(len(train_all), generator=gen)  # the control's shuffle of training positions
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    s_final = store.layer(final)
    timings["load"] = time.perf_counter() - t0
    norm, unembed = model.final_norm, model.unembed

    @torch.inference_mode()
    def decode(states: torch.Tensor) -> torch.Tensor:
        """The model's own final norm + unembedding, float32 on the model's device, logits on the CPU."""
        device, dtype = model.device, model.dtype
        return unembed(norm(states.to(device=device, dtype=dtype))).float().cpu()

    save_path = None
    if save_dir is not None:
        save_path = Path(store.path / "probes" if save_dir == "default" else save_dir)
        save_path.mkdir(parents=True, exist_ok=True)

    cells: list[Cell] = []
    bar = _bar(progress, len(layers))
    task = bar.add_task("probe", total=len(layers)) if bar else None
    if bar:
        bar.start()
    try:
        for layer in layers:
            t0 = time.perf_counter()
            h = s_final if layer == final else store.layer(layer)
            timings["load"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            h_train = h[train_all]
            mean = h_train.mean(0)
            std = h_train.std(0).clamp_min(1e-6)
            z_train = _augment((h_train - mean) / std)
            del h_train
            n_trn = len(trn)
            g_val = _gram(z_train[n_trn:])
            ridge = Ridge(_gram(z_train[:n_trn]) + g_val, g_val, n_trn)
            z_eval = _augment((h[evaluation] - mean) / std)
            z_temp = _augment((h[temp_rows] - mean) / std)
            timings["gram"] = timings.get("gram", 0.0) + time.perf_counter() - t0

            val_rows = n_trn + torch.randperm(len(val), generator=gen)[:TEMPERATURE_TOKENS]
            saved: dict[str, torch.Tensor] = {"mean": mean, "std": std, "columns": columns.to(torch.int32)}
            lens_ctrl_w = lens_ctrl_logits = None
            for k in offsets:
                y_train = tokens[train_all + k]
                y_eval = tokens[evaluation + k]
                g_eval = greedy[evaluation + k - 1]

                # (a) token probe
                t0 = time.perf_counter()
                col = column_of[y_train]
                b_all = torch.zeros(len(columns), z_train.shape[1]).index_add_(0, col, z_train).T
                b_val = torch.zeros(len(columns), z_train.shape[1]).index_add_(0, col[n_trn:], z_train[n_trn:]).T
                alpha_p = ridge.select(b_all, b_val)
                w_probe = ridge.solve(b_all, alpha_p)
                # temperatures come from the fit without the validation rows, scored on them
                w_trn = ridge.solve_train(b_all - b_val, alpha_p)
                temp_p = fit_temperature(z_temp @ w_trn, column_of[tokens[temp_rows + k]], 10.0)
                probe_m = _metrics(
                    _score(z_eval @ w_probe, y_eval, g_eval, temp_p, columns, uni_logp, unseen_mass), len(evaluation)
                )
                # control: the same pipeline on shuffled targets (temperature on shuffled validation targets)
                col_shuf = col[perm]
                b_ctrl_trn = torch.zeros(len(columns), z_train.shape[1]).index_add_(
                    0, col_shuf[:n_trn], z_train[:n_trn]
                )
                b_ctrl = b_ctrl_trn.index_add(0, col_shuf[n_trn:], z_train[n_trn:]).T
                w_ctrl = ridge.solve(b_ctrl, alpha_p)
                temp_c = fit_temperature(
                    z_train[val_rows] @ ridge.solve_train(b_ctrl_trn.T, alpha_p), col_shuf[val_rows], 10.0
                )
                pos = torch.searchsorted(evaluation, ctrl_eval)
                ctrl_m = _metrics(
                    _score(z_eval[pos] @ w_ctrl, y_eval[pos], g_eval[pos], temp_c, columns, uni_logp, unseen_mass),
                    n_ctrl,
                )
                timings["probe"] = timings.get("probe", 0.0) + time.perf_counter() - t0

                # (b) Future Lens: h_t^l -> h_{t+k-1}^L, decoded by the model
                t0 = time.perf_counter()
                s_train = s_final[train_all + k - 1]
                b_val_l = _gram(z_train[n_trn:], s_train[n_trn:])
                b_all_l = _gram(z_train[:n_trn], s_train[:n_trn]) + b_val_l
                weights = 1.0 / s_train[:n_trn].var(0).clamp_min(1e-6)
                alpha_l = ridge.select(b_all_l, b_val_l, weights)
                w_lens = ridge.solve(b_all_l, alpha_l)
                w_lens_trn = ridge.solve_train(b_all_l - b_val_l, alpha_l)
                if lens_ctrl_w is None:  # shuffled final states carry no offset: one control per layer
                    s_shuf = s_final[train_all[perm]]
                    b_ctrl_trn = _gram(z_train[:n_trn], s_shuf[:n_trn])
                    lens_ctrl_w = ridge.solve(b_ctrl_trn + _gram(z_train[n_trn:], s_shuf[n_trn:]), alpha_l)
                    rows = val_rows[: TEMPERATURE_TOKENS // 2]
                    lens_ctrl_temp = fit_temperature(
                        decode(z_train[rows] @ ridge.solve_train(b_ctrl_trn, alpha_l)),
                        tokens[train_all[perm][rows] + 1],
                    )
                timings["lens_fit"] = timings.get("lens_fit", 0.0) + time.perf_counter() - t0

                t0 = time.perf_counter()
                temp_l = fit_temperature(
                    decode(z_temp[: TEMPERATURE_TOKENS // 2] @ w_lens_trn),
                    tokens[temp_rows[: TEMPERATURE_TOKENS // 2] + k],
                )
                lens_sums: dict[str, float] = {}
                pos_l = torch.searchsorted(evaluation, lens_eval)
                for i in range(0, n_lens, 1024):
                    p = pos_l[i : i + 1024]
                    lens_sums = _add(
                        lens_sums, _score(decode(z_eval[p] @ w_lens), y_eval[p], g_eval[p], temp_l, None, None)
                    )
                lens_m = _metrics(lens_sums, n_lens)
                if lens_ctrl_logits is None:  # the control's predictions do not depend on k: decode them once
                    lens_ctrl_logits = [decode(z_eval[pos[i : i + 1024]] @ lens_ctrl_w) for i in range(0, n_ctrl, 1024)]
                lens_ctrl_sums: dict[str, float] = {}
                for i, logits in zip(range(0, n_ctrl, 1024), lens_ctrl_logits, strict=True):
                    p = pos[i : i + 1024]
                    lens_ctrl_sums = _add(
                        lens_ctrl_sums, _score(logits, y_eval[p], g_eval[p], lens_ctrl_temp, None, None)
                    )
                lens_ctrl_m = _metrics(lens_ctrl_sums, n_ctrl)
                timings["lens_eval"] = timings.get("lens_eval", 0.0) + time.perf_counter() - t0

                cells.append(Cell(layer, k, probe_m, lens_m, ctrl_m, lens_ctrl_m, alpha_p, alpha_l, temp_p, temp_l))
                saved[f"probe.{k}"] = w_probe.to(torch.float16)
                saved[f"lens.{k}"] = w_lens
            if save_path is not None:
                t0 = time.perf_counter()
                _save_layer(save_path, layer, saved, [c for c in cells if c.layer == layer], store)
                timings["save"] = timings.get("save", 0.0) + time.perf_counter() - t0
            del h, z_train
            if bar:
                bar.update(task, advance=1)
    finally:
        if bar:
            bar.stop()

    return ProbeResult(
        model=store.manifest["model"]["name"],
        store=str(store.path),
        layers=layers,
        offsets=offsets,
        n_train=len(train_all),
        n_val=len(val),
        n_eval=len(evaluation),
        n_eval_lens=n_lens,
        n_eval_control=n_ctrl,
        probe_vocab=len(columns),
        baselines=baselines,
        cells=cells,
        seconds=time.perf_counter() - started,
        timings=timings,
        probes_dir=str(save_path) if save_path is not None else None,
    )


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("probe layers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)
    )


def _save_layer(path: Path, layer: int, tensors: dict[str, torch.Tensor], cells: list[Cell], store) -> None:
    """probe-layer{l}.safetensors: mean/std (standardization), columns (token ids of the probe's outputs),
    probe.{k} [d+1, n_columns] and lens.{k} [d+1, d] (last row = intercept); a JSON sidecar with lambdas and
    temperatures. Apply as z = [(h - mean) / std, 1]; probe scores = z @ probe.k; lens state = z @ lens.k."""
    from safetensors.torch import save_file

    meta = {
        "layer": layer,
        "store": str(store.path),
        "model": store.manifest["model"]["name"],
        "point": f"blocks.{layer}.resid_post",
        "lens_target": "final-layer resid_post at t+k-1, decode with the model's final_norm + unembed",
        "cells": [
            {
                "offset": c.offset,
                "probe_lambda_per_token": c.probe_lambda,
                "lens_lambda_per_token": c.lens_lambda,
                "probe_temperature": c.probe_temperature,
                "lens_temperature": c.lens_temperature,
            }
            for c in cells
        ],
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path / f"probe-layer{layer:02d}.safetensors"), metadata={"forethought": json.dumps(meta)})
    (path / f"probe-layer{layer:02d}.json").write_text(json.dumps(meta, indent=1))

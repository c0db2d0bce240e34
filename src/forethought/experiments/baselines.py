"""Context-matched baselines for "what is the token k ahead?", and a bootstrap over documents.

A probe on h_t sees everything the model has read up to t. To claim that h_t holds more than cheap statistics of
that same context, the probe must beat predictors that see the same tokens:

- backoff n-grams: x_{t+k} from the last `order` tokens (x_{t-order+1} .. x_t), order 1..4, counted on the
  training split; the longest context seen at least `min_count` times answers, shorter ones back off, the unigram
  is the last resort. `min_count` (the smoothing) is chosen on validation positions, per order and offset.
- in-window copy / induction: find the latest earlier place in the same window whose last `match` tokens equal
  the tokens ending at t, and predict the token that followed it k steps later (it must already have been read,
  so j + k <= t). The match length (1..3) is chosen on validation; where no match exists it makes no prediction.
- the combination: the copy's prediction where it has one, else the best n-gram (its order chosen on validation).

All predictors here are top-1 (a token id per position); scoring is exact-match top-1, the cells' headline metric.
Every position is inside one packed window, and contexts never cross a window's start (the model never saw
anything before it either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_COUNTS = (1, 2, 3, 5, 10)
ORDERS = (1, 2, 3, 4)
MATCH_LENGTHS = (1, 2, 3)
NO_PREDICTION = -1


def context_keys(tokens: np.ndarray, positions: np.ndarray, order: int, window: int, vocab: int) -> np.ndarray:
    """One int64 key per position for (x_{t-order+1} .. x_t); -1 where the context would leave the window.

    vocab**4 < 2**63 for vocabularies below 55,000 tokens, so a 4-token context packs exactly.
    """
    key = np.zeros(len(positions), dtype=np.int64)
    for back in range(order):
        key = key * vocab + tokens[positions - back]
    key[positions % window < order - 1] = -1
    return key


@dataclass
class NgramTable:
    """Per context key: how often it was seen and its most frequent next-k token."""

    keys: np.ndarray  # sorted context keys
    totals: np.ndarray
    best: np.ndarray

    @classmethod
    def fit(cls, ctx: np.ndarray, target: np.ndarray) -> NgramTable:
        ok = ctx >= 0
        ctx, target = ctx[ok], target[ok]
        order = np.lexsort((target, ctx))
        ctx, target = ctx[order], target[order]
        # runs of equal (context, target) pairs
        new_pair = np.ones(len(ctx), dtype=bool)
        new_pair[1:] = (ctx[1:] != ctx[:-1]) | (target[1:] != target[:-1])
        starts = np.flatnonzero(new_pair)
        counts = np.diff(np.append(starts, len(ctx)))
        pair_ctx, pair_target = ctx[starts], target[starts]
        # per context: the pair with the largest count (ties: the smaller token id, deterministically)
        by = np.lexsort((pair_target, -counts, pair_ctx))
        pair_ctx, pair_target, counts = pair_ctx[by], pair_target[by], counts[by]
        first = np.ones(len(pair_ctx), dtype=bool)
        first[1:] = pair_ctx[1:] != pair_ctx[:-1]
        keys = pair_ctx[first]
        totals = np.add.reduceat(counts, np.flatnonzero(first)) if len(counts) else counts
        return cls(keys, totals, pair_target[first])

    def lookup(self, ctx: np.ndarray, min_count: int) -> np.ndarray:
        """The most frequent successor where the context was seen >= min_count times, else NO_PREDICTION."""
        out = np.full(len(ctx), NO_PREDICTION, dtype=np.int64)
        if len(self.keys) == 0:
            return out
        pos = np.searchsorted(self.keys, ctx).clip(max=len(self.keys) - 1)
        hit = (self.keys[pos] == ctx) & (ctx >= 0) & (self.totals[pos] >= min_count)
        out[hit] = self.best[pos[hit]]
        return out


def backoff_predict(tables: list[NgramTable], ctx: list[np.ndarray], min_count: int, unigram_best: int) -> np.ndarray:
    """Longest context first; tables[i] / ctx[i] are order i + 1."""
    out = np.full(len(ctx[0]), unigram_best, dtype=np.int64)
    for table, keys in zip(tables, ctx, strict=True):  # shorter orders first, longer ones overwrite
        pred = table.lookup(keys, min_count)
        out = np.where(pred >= 0, pred, out)
    return out


def copy_predict(tokens: np.ndarray, positions: np.ndarray, offset: int, match: int, window: int) -> np.ndarray:
    """In-window induction: the token `offset` after the latest earlier match of the `match` tokens ending at t."""
    out = np.full(len(positions), NO_PREDICTION, dtype=np.int64)
    by_window: dict[int, list[int]] = {}
    for i, t in enumerate(positions.tolist()):
        by_window.setdefault(t // window, []).append(i)
    for w, rows in by_window.items():
        start = w * window
        seq = tokens[start : start + window].tolist()
        wanted = {int(positions[i]) - start: i for i in rows}
        last_end = max(wanted)
        latest: dict[tuple[int, ...], int] = {}
        for t in range(last_end + 1):
            j = t - offset  # a match ending at j is usable from t on: its follower x_{j+offset} has been read
            if j >= match - 1:
                latest[tuple(seq[j - match + 1 : j + 1])] = j
            i = wanted.get(t)
            if i is not None and t >= match - 1:
                found = latest.get(tuple(seq[t - match + 1 : t + 1]))
                if found is not None:
                    out[i] = seq[found + offset]
    return out


@dataclass
class BaselinePredictions:
    """Top-1 predictions on the evaluation positions, one array per baseline, and what validation chose."""

    predictions: dict[str, np.ndarray]
    chosen: dict[str, dict]  # baseline -> its validation-chosen settings and validation top-1


def context_baselines(
    tokens: torch.Tensor,
    trn: torch.Tensor,
    val: torch.Tensor,
    evaluation: torch.Tensor,
    offset: int,
    window: int,
    vocab: int,
    copy_rows: int = 4096,
) -> BaselinePredictions:
    """Fit on train positions, choose settings on validation ones, predict x_{t+offset} at `evaluation`.

    The final tables are refitted on train + validation, as the probes are.
    """
    x = tokens.numpy().astype(np.int64)
    trn_np, val_np, ev_np = trn.numpy(), val.numpy(), evaluation.numpy()
    train_all = np.concatenate([trn_np, val_np])
    y_val = x[val_np + offset]
    unigram_trn = int(np.bincount(x[trn_np + offset], minlength=vocab).argmax())
    unigram_all = int(np.bincount(x[train_all + offset], minlength=vocab).argmax())

    def keys(pos: np.ndarray) -> list[np.ndarray]:
        return [context_keys(x, pos, o, window, vocab) for o in ORDERS]

    k_trn, k_val, k_all, k_ev = keys(trn_np), keys(val_np), keys(train_all), keys(ev_np)
    tables_trn = [NgramTable.fit(k, x[trn_np + offset]) for k in k_trn]
    tables_all = [NgramTable.fit(k, x[train_all + offset]) for k in k_all]

    preds: dict[str, np.ndarray] = {"unigram": np.full(len(ev_np), unigram_all, dtype=np.int64)}
    chosen: dict[str, dict] = {"unigram": {"val_top1": float((y_val == unigram_trn).mean())}}
    best_order, best_order_score = 1, -1.0
    ngram_setting: dict[int, int] = {}
    for o in ORDERS:
        scores = {
            m: float((backoff_predict(tables_trn[:o], k_val[:o], m, unigram_trn) == y_val).mean()) for m in MIN_COUNTS
        }
        m = max(scores, key=lambda c: (scores[c], -c))
        ngram_setting[o] = m
        preds[f"ngram{o}"] = backoff_predict(tables_all[:o], k_ev[:o], m, unigram_all)
        chosen[f"ngram{o}"] = {"min_count": m, "val_top1": scores[m]}
        if scores[m] > best_order_score:
            best_order, best_order_score = o, scores[m]

    # copy: validation on at most `copy_rows` positions (a Python loop per window)
    rng = np.random.default_rng(offset)
    val_rows = np.sort(rng.permutation(len(val_np))[:copy_rows])
    vpos, vy = val_np[val_rows], y_val[val_rows]
    fallback_val = backoff_predict(
        tables_trn[:best_order], [k[val_rows] for k in k_val[:best_order]], ngram_setting[best_order], unigram_trn
    )
    copy_scores, combo_scores = {}, {}
    for match in MATCH_LENGTHS:
        c = copy_predict(x, vpos, offset, match, window)
        copy_scores[match] = float((c == vy).mean())
        combo_scores[match] = float((np.where(c >= 0, c, fallback_val) == vy).mean())
    m_copy = max(copy_scores, key=lambda m: (copy_scores[m], m))
    m_combo = max(combo_scores, key=lambda m: (combo_scores[m], m))
    copy_ev = copy_predict(x, ev_np, offset, m_copy, window)
    preds["copy"] = copy_ev
    chosen["copy"] = {"match": m_copy, "val_top1": copy_scores[m_copy], "coverage": float((copy_ev >= 0).mean())}
    combo_copy = copy_ev if m_combo == m_copy else copy_predict(x, ev_np, offset, m_combo, window)
    fallback = preds[f"ngram{best_order}"]
    preds["copy+ngram"] = np.where(combo_copy >= 0, combo_copy, fallback)
    chosen["copy+ngram"] = {"match": m_combo, "ngram_order": best_order, "val_top1": combo_scores[m_combo]}
    return BaselinePredictions(preds, chosen)


# --------------------------------------------------------------------------------------------------- intervals


@dataclass
class Interval:
    estimate: float
    low: float
    high: float


# The smallest true effect a two-sided 5% test detects with 80% power: (z_0.975 + z_0.8) standard errors.
MDE_IN_SE = 1.96 + 0.84


def minimum_detectable_effect(low: float, high: float) -> float:
    """From a 95% interval (its half-width / 1.96 is the standard error). A zero-width interval measured no spread
    at all (every resample gave the same value), so it cannot say what was detectable: NaN, never 0."""
    if not high > low:
        return float("nan")
    return MDE_IN_SE * (high - low) / (2 * 1.96)


def bootstrap_by_document(
    values: torch.Tensor | np.ndarray,
    documents: torch.Tensor | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean of `values` (one per position) with a percentile interval from resampling whole documents.

    Positions of one document are correlated (one file can hold 7% of a test set), so documents, not tokens, are
    the unit of resampling; the estimate is the plain mean over positions.
    """
    v = np.asarray(values, dtype=np.float64)
    d = np.asarray(documents)
    _, doc_index = np.unique(d, return_inverse=True)
    n_docs = int(doc_index.max()) + 1 if len(doc_index) else 0
    if n_docs == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    sums = np.bincount(doc_index, weights=v, minlength=n_docs)
    sizes = np.bincount(doc_index, minlength=n_docs).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_docs, size=(n_boot, n_docs))
    counts = np.zeros((n_boot, n_docs))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_docs), picks.ravel()), 1.0)
    means = (counts @ sums) / np.maximum(counts @ sizes, 1.0)
    alpha = (1 - level) / 2
    return Interval(float(v.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))

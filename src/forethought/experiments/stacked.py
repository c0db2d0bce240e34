"""What does h_t add beyond its context? A stacked readout: the baseline features B against B + h_t.

"Probe on h_t vs the best n-gram, which wins" hides information that only one of them has: a probe can lose to a
lookup table where the context was seen in training and still know things the table cannot. So per offset k two
readouts of x_{t+k} are fitted the same way and compared on the same held-out positions:

- B: a conditional logit over candidate tokens (every token a baseline names, and the unigram's top tokens),
  one weight per feature: x_t's k-step successor distribution (its most frequent successors with their training
  frequencies: what a readout of one-hot x_t learns), the backoff 4-gram's answer split by the level it answered
  from (4, 3, 2, 1 tokens of context, or the unigram: the levels differ in how far to trust them), the in-window
  copy, copy-else-n-gram, and the token's log unigram probability.
- B + h: the same plus one feature, the ridge probe on h_t's log-probability of the candidate (and the probe's top
  tokens among the candidates).
- B_long and B_long + h: both with longer context too: the model's own greedy next token at t, and the 4-gram read
  one step further through it ("what h_t adds" beyond what the model's next-token belief already says).

Stacking, cross-fitted: the weights are fitted on validation documents, where every level-0 predictor is out of
sample (n-gram tables and the probe fitted on the training documents without them); held-out documents are then
scored with level-0 predictors refitted on all training documents, exactly as the baselines and the probe are
scored alone. The same small L2 for every readout. B + h can only gain where the probe's belief adds to the
baselines'; it is conservative (the probe was fitted to the targets, not to B's residual).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forethought.experiments.baselines import (
    NO_PREDICTION,
    ORDERS,
    BaselinePredictions,
    NgramTable,
    backoff_predict,
    context_keys,
    copy_predict,
)

SUCCESSORS = 8  # the k-step successor distribution of x_t: its most frequent successors


@dataclass
class SuccessorTable:
    """Per context key, its `m` most frequent targets and their relative frequencies."""

    keys: np.ndarray
    ids: np.ndarray  # [keys, m], NO_PREDICTION padded
    probs: np.ndarray  # [keys, m]

    @classmethod
    def fit(cls, ctx: np.ndarray, target: np.ndarray, m: int) -> SuccessorTable:
        ok = ctx >= 0
        ctx, target = ctx[ok], target[ok]
        pairs, counts = np.unique(np.stack([ctx, target], 1), axis=0, return_counts=True)
        order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
        pairs, counts = pairs[order], counts[order]
        keys, first = np.unique(pairs[:, 0], return_index=True)
        totals = np.add.reduceat(counts, first) if len(counts) else counts
        ids = np.full((len(keys), m), NO_PREDICTION, dtype=np.int64)
        probs = np.zeros((len(keys), m))
        rank = np.arange(len(pairs)) - np.repeat(first, np.diff(np.append(first, len(pairs))))
        keep = rank < m
        row = np.repeat(np.arange(len(keys)), np.diff(np.append(first, len(pairs))))[keep]
        ids[row, rank[keep]] = pairs[keep, 1]
        probs[row, rank[keep]] = counts[keep] / totals[row]
        return cls(keys, ids, probs)

    def lookup(self, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.ids.shape[1]
        ids = np.full((len(ctx), m), NO_PREDICTION, dtype=np.int64)
        probs = np.zeros((len(ctx), m))
        if len(self.keys):
            pos = np.searchsorted(self.keys, ctx).clip(max=len(self.keys) - 1)
            hit = (self.keys[pos] == ctx) & (ctx >= 0)
            ids[hit], probs[hit] = self.ids[pos[hit]], self.probs[pos[hit]]
        return ids, probs


@dataclass
class Features:
    """Sparse baseline features: per group, candidate ids [n, m_j] (NO_PREDICTION: none) and values [n, m_j]."""

    names: list[str]
    ids: list[np.ndarray]
    values: list[np.ndarray]

    def rows(self, index: np.ndarray) -> Features:
        return Features(self.names, [a[index] for a in self.ids], [a[index] for a in self.values])

    def extend(self, other: Features) -> Features:
        return Features(self.names + other.names, self.ids + other.ids, self.values + other.values)

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n, M] ids, values and the group index of every slot."""
        ids = np.concatenate(self.ids, 1)
        values = np.concatenate(self.values, 1)
        group = np.concatenate([np.full(a.shape[1], j) for j, a in enumerate(self.ids)])
        return ids, values * (ids >= 0), group


def _indicator(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pred[:, None].astype(np.int64), (pred >= 0).astype(np.float64)[:, None]


def baseline_features(
    tokens: np.ndarray,
    train_all: np.ndarray,
    train_docs: np.ndarray,
    rows: np.ndarray,
    offset: int,
    window: int,
    vocab: int,
    chosen: dict[str, dict],
    fitted_on: np.ndarray | None = None,
) -> Features:
    """The baseline feature groups at `rows`, from tables fitted on `fitted_on` (default: every training row).

    `chosen` is `BaselinePredictions.chosen` (validation-chosen min counts and match lengths)."""
    fit_rows = train_all if fitted_on is None else fitted_on
    y_fit = tokens[fit_rows + offset]
    unigram = int(np.bincount(y_fit, minlength=vocab).argmax())
    names, ids, values = [], [], []
    keys_fit = [context_keys(tokens, fit_rows, o, window, vocab) for o in ORDERS]
    keys_rows = [context_keys(tokens, rows, o, window, vocab) for o in ORDERS]
    succ = SuccessorTable.fit(keys_fit[0], y_fit, SUCCESSORS).lookup(keys_rows[0])
    names.append("successors of x_t")
    ids.append(succ[0])
    values.append(succ[1])
    tables = [NgramTable.fit(k, y_fit) for k in keys_fit]
    ngram = {o: backoff_predict(tables[:o], keys_rows[:o], chosen[f"ngram{o}"]["min_count"], unigram) for o in ORDERS}
    # the 4-gram backoff's answer, one group per level it answered from (4 .. 1, or the unigram): the levels differ
    # in how far to trust them, and nested n-gram indicators would be collinear
    m4 = chosen["ngram4"]["min_count"]
    level = np.zeros(len(rows), dtype=np.int64)
    for o in ORDERS:
        level = np.where(tables[o - 1].lookup(keys_rows[o - 1], m4) >= 0, o, level)
    for o in (4, 3, 2, 1, 0):
        names.append(f"ngram4 answered at order {o}" if o else "ngram4 fell back to the unigram")
        a, v = _indicator(np.where(level == o, ngram[4], NO_PREDICTION))
        ids.append(a)
        values.append(v)
    copy = copy_predict(tokens, rows, offset, chosen["copy"]["match"], window)
    combo_match = chosen["copy+ngram"]["match"]
    combo_copy = (
        copy if combo_match == chosen["copy"]["match"] else copy_predict(tokens, rows, offset, combo_match, window)
    )
    combo = np.where(combo_copy >= 0, combo_copy, ngram[chosen["copy+ngram"]["ngram_order"]])
    for name, pred in (("copy", copy), ("copy+ngram", combo)):
        names.append(name)
        a, v = _indicator(pred)
        ids.append(a)
        values.append(v)
    return Features(names, ids, values)


def long_context_features(
    tokens: np.ndarray,
    greedy: np.ndarray,
    train_all: np.ndarray,
    rows: np.ndarray,
    offset: int,
    window: int,
    vocab: int,
    min_count: int,
    fitted_on: np.ndarray | None = None,
) -> Features:
    """The model's own belief about x_{t+1} as context: its greedy next token g, and (k >= 2) the backoff 4-gram's
    x_{t+k} given (x_{t-2}, x_{t-1}, x_t, g), i.e. the n-gram read one step further along the model's belief.
    Everything the model's next-token distribution at t says that a context statistic can use."""
    fit_rows = train_all if fitted_on is None else fitted_on
    g = greedy[rows].astype(np.int64)
    names, ids, values = ["model's next token"], [], []
    a, v = _indicator(g)
    ids.append(a)
    values.append(v)
    if offset >= 2:
        # tables of x_{s+offset-1} given the context ending at s (= t + 1), fitted on real tokens
        y_fit = tokens[fit_rows + offset]
        s_fit = fit_rows + 1
        keys_fit = [context_keys(tokens, s_fit, o, window, vocab) for o in ORDERS]
        tables = [NgramTable.fit(k, y_fit) for k in keys_fit]
        # the context keys ending at t + 1 with the model's token in place of the real x_{t+1} (packed as
        # `context_keys` packs them)
        s_rows = rows + 1
        keys_rows = []
        for o in ORDERS:
            key = g.copy()
            for back in range(1, o):
                key = key * vocab + tokens[s_rows - back]
            key[s_rows % window < o - 1] = -1
            keys_rows.append(key)
        unigram = int(np.bincount(y_fit, minlength=vocab).argmax())
        pred = backoff_predict(tables, keys_rows, min_count, unigram)
        names.append("ngram4 through the model's next token")
        a, v = _indicator(pred)
        ids.append(a)
        values.append(v)
    return Features(names, ids, values)


@dataclass
class StackedInputs:
    """What the stacked readouts of one store share (flat store indices; numpy)."""

    tokens: np.ndarray
    greedy: np.ndarray
    doc_of: np.ndarray
    train_all: np.ndarray  # fit rows: training then validation documents
    evaluation: np.ndarray
    window: int
    vocab: int
    columns: torch.Tensor  # the probe's output columns


# --------------------------------------------------------------------------------------------------- the readout

CANDIDATES = 64  # per row: the unigram's and (B + h) the probe's top tokens, beside every token a feature names


def candidate_set(named: Features, *tops: np.ndarray) -> np.ndarray:
    """[n, M] candidate token ids per row (NO_PREDICTION padded, no repeats): every token a feature names and the
    rows of `tops` ([n, m] or [m], e.g. the unigram's top tokens)."""
    n = len(named.ids[0])
    parts = list(named.ids) + [np.broadcast_to(t, (n, t.shape[-1])) for t in tops]
    ids = np.sort(np.concatenate(parts, 1), 1)
    ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = NO_PREDICTION
    return ids


def candidate_features(named: Features, candidates: np.ndarray, dense: list[np.ndarray]) -> np.ndarray:
    """[n, M, J + len(dense)]: per candidate, each group's value at it (summed over the group's slots naming it),
    then the dense features (already gathered at the candidates)."""
    cols = []
    for ids, values in zip(named.ids, named.values, strict=True):
        same = (candidates[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
        cols.append((same * values[:, None, :]).sum(2))
    return np.stack(cols + list(dense), 2)


@dataclass
class LogLinearStack:
    """A conditional logit over each row's candidates: p(c) proportional to exp(theta . x(t, c)), one weight per
    feature, fitted by maximum likelihood with the same small L2 whatever the features (the same regularisation for
    B and B + h)."""

    theta: np.ndarray
    names: list[str]

    L2 = 1e-3

    @classmethod
    def fit(cls, x: np.ndarray, candidates: np.ndarray, y: np.ndarray, names: list[str]) -> LogLinearStack:
        """x [n, M, F] at `candidates` [n, M]; rows whose target is no candidate cannot be fitted and are left out."""
        hit = candidates == y[:, None]
        keep = hit.any(1)
        xt = torch.from_numpy(x[keep]).double()
        mask = torch.from_numpy(candidates[keep] >= 0)
        target = torch.from_numpy(hit[keep].argmax(1))
        theta = torch.zeros(x.shape[2], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        n = max(int(keep.sum()), 1)

        def closure():
            opt.zero_grad()
            scores = (xt @ theta).masked_fill(~mask, -torch.inf)
            loss = torch.nn.functional.cross_entropy(scores, target, reduction="sum") / n + cls.L2 * (theta**2).sum()
            loss.backward()
            return loss

        if n > 1:
            opt.step(closure)
        return cls(theta.detach().numpy(), names)

    def predict(self, x: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        scores = np.where(candidates >= 0, x @ self.theta, -np.inf)
        return candidates[np.arange(len(candidates)), scores.argmax(1)]


def unigram_top(log_unigram: torch.Tensor, m: int = CANDIDATES) -> np.ndarray:
    return log_unigram.topk(min(m, len(log_unigram))).indices.numpy().astype(np.int64)


def _at(log_unigram: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
    return log_unigram.numpy()[np.maximum(candidates, 0)].astype(np.float64)


@dataclass
class StackRows:
    """One side (validation or evaluation rows) of one offset: B's named features, B_long's extra ones, targets."""

    base: Features
    long: Features
    y: np.ndarray

    def features(self, long: bool) -> Features:
        return self.base.extend(self.long) if long else self.base


@dataclass
class StackBaselines:
    """Per offset: both sides' rows, and B's and B_long's hits on the evaluation rows (no layer in them)."""

    val: StackRows
    ev: StackRows
    hits: dict[str, np.ndarray]
    weights: dict[str, dict[str, float]]


def stack_baselines(
    inputs: StackedInputs, offset: int, context: BaselinePredictions, val: np.ndarray, log_unigram: torch.Tensor
) -> StackBaselines:
    """Level 0 out of sample: features on validation rows come from tables fitted on the training rows without
    them, on evaluation rows from every training row. B and B_long are then fitted on the validation rows."""
    x, tr = inputs.tokens, inputs.train_all
    trn = np.setdiff1d(tr, val)
    m4 = context.chosen["ngram4"]["min_count"]
    sides = {}
    for side, rows, fit_on in (("val", val, trn), ("ev", inputs.evaluation, tr)):
        base = baseline_features(x, tr, None, rows, offset, inputs.window, inputs.vocab, context.chosen, fit_on)
        long = long_context_features(x, inputs.greedy, tr, rows, offset, inputs.window, inputs.vocab, m4, fit_on)
        sides[side] = StackRows(base, long, x[rows + offset])
    top = unigram_top(log_unigram)
    hits, weights = {}, {}
    for name, long in (("B", False), ("Blong", True)):
        feats = sides["val"].features(long)
        cand = candidate_set(feats, top)
        fitted = LogLinearStack.fit(
            candidate_features(feats, cand, [_at(log_unigram, cand)]),
            cand,
            sides["val"].y,
            feats.names + ["log unigram"],
        )
        feats = sides["ev"].features(long)
        cand = candidate_set(feats, top)
        pred = fitted.predict(candidate_features(feats, cand, [_at(log_unigram, cand)]), cand)
        hits[name] = (pred == sides["ev"].y).astype(np.float64)
        weights[name] = dict(zip(fitted.names, map(float, fitted.theta), strict=True))
    return StackBaselines(sides["val"], sides["ev"], hits, weights)


def stack_with_h(
    baselines: StackBaselines,
    log_unigram: torch.Tensor,
    probe_val: torch.Tensor,
    probe_ev: torch.Tensor,
    columns: torch.Tensor,
    column_of: torch.Tensor,
    unseen_mass: float,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """B + h and B_long + h: the same conditional logit plus one feature, the probe's log-probability of each
    candidate (its temperature-scaled softmax over the columns; a token that is no column at the probe's own
    Good-Turing floor), with the probe's top tokens among the candidates. `probe_val`: log-probs [n_val, C] of
    the fit without the validation rows; `probe_ev`: [n_eval, C] of the fit on every training row."""
    top_u = unigram_top(log_unigram)
    floor = float(np.log(unseen_mass))
    hits, weights = {}, {}
    for name, long in (("B+h", False), ("Blong+h", True)):
        fitted = None
        for rows, lp in ((baselines.val, probe_val), (baselines.ev, probe_ev)):
            feats = rows.features(long)
            top_h = columns[lp.topk(min(CANDIDATES, lp.shape[1]), dim=1).indices].numpy().astype(np.int64)
            cand = candidate_set(feats, top_u, top_h)
            col = column_of[torch.from_numpy(np.maximum(cand, 0))]
            inside = ((col >= 0) & torch.from_numpy(cand >= 0)).numpy()
            h_lp = np.where(inside, lp.gather(1, col.clamp_min(0)).double().numpy(), floor + _at(log_unigram, cand))
            xs = candidate_features(feats, cand, [_at(log_unigram, cand), h_lp])
            if fitted is None:
                fitted = LogLinearStack.fit(xs, cand, rows.y, feats.names + ["log unigram", "probe log-prob"])
            else:
                hits[name] = (fitted.predict(xs, cand) == rows.y).astype(np.float64)
        weights[name] = dict(zip(fitted.names, map(float, fitted.theta), strict=True))
    return hits, weights


def seen_stratum(inputs: StackedInputs) -> np.ndarray:
    """1 where x_t's 4-token context occurs among the training rows (the backoff n-gram answers from order 4)."""
    keys_fit = context_keys(inputs.tokens, inputs.train_all, 4, inputs.window, inputs.vocab)
    keys_ev = context_keys(inputs.tokens, inputs.evaluation, 4, inputs.window, inputs.vocab)
    return (np.isin(keys_ev, keys_fit[keys_fit >= 0]) & (keys_ev >= 0)).astype(np.float64)

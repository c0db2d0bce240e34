"""What does h_t add beyond its context? A stacked readout: baseline features B against B + h_t, cross-fitted.

"Probe on h_t vs the best n-gram, which wins" hides information that only one of them has: a probe can lose to a
lookup table where the context was seen in training and still know things the table cannot. So per offset k this
module fits two readouts of x_{t+k} by least squares onto one-hot targets, with the same machinery:

- B: per-column intercepts + a weight per *baseline feature group*. A group names candidate tokens with values:
  the k-step successor distribution of x_t (top `SUCCESSORS` tokens with their training frequencies: what a ridge
  readout of one-hot x_t learns), and each context baseline's top-1 (backoff n-grams of order 1..4, in-window copy,
  copy else n-gram) as an indicator. Score(t, v) = b_v + sum_j alpha_j * value_j(t, v).
- B + h: the same, plus a ridge map W from standardized h_t (the probe's features, its lambda chosen on validation
  by the probe's own search) to the columns.
Both are fitted by backfitting (W given alpha is one ridge solve on shared Gram statistics; alpha given W is a
J x J least squares on the sparse features), a fixed number of rounds from the same start, so B + h can only use
h_t for what B does not already say.

Cross-fitting: a baseline feature of a *training* row comes from tables fitted on the other folds of training
documents (out of fold), so the readout learns how much to trust each baseline out of sample; evaluation rows get
tables fitted on every training document, as the baselines themselves are scored. The copy baseline fits nothing.

The top-1 of a readout is the argmax over the probe's columns and every token a feature names (a copied identifier
never seen in training can still win).
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
FOLDS = 5
ROUNDS = 4  # backfitting rounds (from the h-only ridge; the group weights settle in two or three)
ALPHA_RIDGE = 1e-3  # a whisper of shrinkage on the few group weights (times the rows)


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
    ngram = {}
    for o in ORDERS:
        ngram[o] = backoff_predict(tables[:o], keys_rows[:o], chosen[f"ngram{o}"]["min_count"], unigram)
        names.append(f"ngram{o}")
        a, v = _indicator(ngram[o])
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


def cross_fitted_features(
    tokens: np.ndarray,
    train_all: np.ndarray,
    doc_of: np.ndarray,
    offset: int,
    window: int,
    vocab: int,
    chosen: dict[str, dict],
    folds: int = FOLDS,
) -> Features:
    """Out-of-fold baseline features for every training row: fold = hash of the document, tables from the rest."""
    fold = doc_of[train_all] % folds
    parts: list[tuple[np.ndarray, Features]] = []
    for f in range(folds):
        inside = np.flatnonzero(fold == f)
        if len(inside) == 0:
            continue
        rest = train_all[fold != f]
        if len(rest) == 0:
            rest = train_all
        parts.append(
            (inside, baseline_features(tokens, train_all, None, train_all[inside], offset, window, vocab, chosen, rest))
        )
    names = parts[0][1].names
    out_ids = [np.full((len(train_all), a.shape[1]), NO_PREDICTION, dtype=np.int64) for a in parts[0][1].ids]
    out_values = [np.zeros((len(train_all), a.shape[1])) for a in parts[0][1].ids]
    for inside, feats in parts:
        for j in range(len(names)):
            out_ids[j][inside] = feats.ids[j]
            out_values[j][inside] = feats.values[j]
    return Features(names, out_ids, out_values)


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


# --------------------------------------------------------------------------------------------------- the readout


class StackedReadout:
    """Least squares onto one-hot targets over `columns` (+ any token a feature names), from sparse baseline
    features (one weight per group) and, optionally, a ridge block on features z (with an intercept column)."""

    def __init__(self, columns: torch.Tensor, vocab: int) -> None:
        self.columns = columns
        self.column_of = torch.full((vocab,), -1, dtype=torch.long)
        self.column_of[columns] = torch.arange(len(columns))

    def fit(
        self,
        z: torch.Tensor,
        feats: Features,
        y: torch.Tensor,
        inverse: torch.Tensor,
        rounds: int = ROUNDS,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """W [p, C] and alpha [J]. `inverse` = (Z^T Z + lambda I)^-1 (Z's last column the intercept)."""
        ids, values, group = feats.flat()
        n, J = len(y), len(feats.names)
        ids_t = torch.from_numpy(ids)
        vals_t = torch.from_numpy(values).float()
        col = self.column_of[ids_t.clamp_min(0)]
        col = torch.where(ids_t >= 0, col, torch.full_like(col, -1))
        in_c = col >= 0
        y_np = y.numpy()
        # sparse Gram of the groups and their correlation with the targets (exact, over the whole vocabulary)
        hit = (ids == y_np[:, None]) * values  # value at the target
        fy = np.bincount(np.repeat(group[None], n, 0).ravel(), weights=hit.ravel(), minlength=J)
        gf = np.zeros((J, J))
        M = ids.shape[1]
        for a in range(M):
            for b in range(M):
                same = (ids[:, a] == ids[:, b]) & (ids[:, a] >= 0)
                gf[group[a], group[b]] += float((values[:, a] * values[:, b] * same).sum())
        gf += ALPHA_RIDGE * n * np.eye(J)
        target_col = self.column_of[y]
        seen = target_col >= 0  # targets never a column: only the features can name them
        zy = torch.zeros(len(self.columns), z.shape[1]).index_add_(0, target_col[seen], z[seen]).T  # [p, C]
        alpha = np.zeros(J)
        w = inverse @ zy
        for _ in range(rounds):
            # alpha given W: the residual's correlation with each group at the features' own slots
            zw = self._zw_at(z, w, col, in_c)  # [n, M]
            fzw = np.bincount(
                np.repeat(group[None], n, 0).ravel(),
                weights=(zw * vals_t).numpy().ravel().astype(np.float64),
                minlength=J,
            )
            alpha = np.linalg.solve(gf, fy - fzw)
            # W given alpha: ridge onto Y - F alpha
            slot_w = vals_t * torch.from_numpy(alpha[group]).float()[None, :]
            zf = torch.zeros(len(self.columns), z.shape[1])
            for i in range(0, n, 8192):
                keep = in_c[i : i + 8192]
                rows = torch.arange(i, min(i + 8192, n))[:, None].expand(-1, ids.shape[1])[keep]
                zf.index_add_(0, col[i : i + 8192][keep], z[rows] * slot_w[i : i + 8192][keep][:, None])
            w = inverse @ (zy - zf.T)
        return w, alpha

    @staticmethod
    def _zw_at(z: torch.Tensor, w: torch.Tensor, col: torch.Tensor, in_c: torch.Tensor, chunk: int = 2048):
        out = torch.zeros(col.shape, dtype=torch.float32)
        wt = w.T.contiguous()  # [C, p]
        for i in range(0, len(z), chunk):
            c = col[i : i + chunk].clamp_min(0)
            part = torch.einsum("np,nmp->nm", z[i : i + chunk], wt[c])
            out[i : i + chunk] = part * in_c[i : i + chunk]
        return out

    def predict(self, z: torch.Tensor, feats: Features, w: torch.Tensor, alpha: np.ndarray, chunk: int = 2048):
        """Top-1 token per row: argmax over the columns and the features' candidates."""
        ids, values, group = feats.flat()
        slot = torch.from_numpy(values * alpha[group]).float()
        ids_t = torch.from_numpy(ids)
        out = torch.empty(len(z), dtype=torch.long)
        for i in range(0, len(z), chunk):
            s = z[i : i + chunk] @ w  # [r, C]
            cid = ids_t[i : i + chunk]
            col = self.column_of[cid.clamp_min(0)]
            col = torch.where(cid >= 0, col, torch.full_like(col, -1))
            sl = slot[i : i + chunk]
            rows = torch.arange(len(s))[:, None].expand_as(col)
            inside = col >= 0
            s.index_put_((rows[inside], col[inside]), sl[inside], accumulate=True)
            best_val, best_col = s.max(1)
            best = self.columns[best_col]
            # candidates outside the columns: their score is the features' alone (summed over slots naming them)
            outside = (cid >= 0) & ~inside
            if outside.any():
                r_out, tok_out, v_out = rows[outside], cid[outside], sl[outside]
                pair, inverse = torch.unique(r_out * len(self.column_of) + tok_out, return_inverse=True)
                score = torch.zeros(len(pair)).index_add_(0, inverse, v_out)  # summed over the slots naming it
                pair_row, pair_tok = pair // len(self.column_of), pair % len(self.column_of)
                # the best outside candidate of each row, where it beats the row's best column
                top = torch.full((len(s),), -torch.inf).scatter_reduce(0, pair_row, score, "amax")
                wins = score > best_val[pair_row]
                wins &= score == top[pair_row]
                best[pair_row[wins]] = pair_tok[wins]
            out[i : i + chunk] = best
        return out


def intercept_only(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B's design: one intercept column over n rows, and its (unshrunk) inverse Gram."""
    return torch.ones(n, 1), torch.tensor([[1.0 / n]])


# --------------------------------------------------------------------------------------------------- per offset


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


def stacked_offset(
    inputs: StackedInputs,
    offset: int,
    context: BaselinePredictions,
    z_train: torch.Tensor,
    z_eval: torch.Tensor,
    alpha: float,
) -> dict[str, np.ndarray]:
    """Per evaluation row, the top-1 hit (0/1) of B, B + h, B_long, B_long + h, and the 4-gram stratum.

    `z_train` / `z_eval`: standardized h_t with an intercept column at the train_all / evaluation rows of the
    chosen layer; `alpha`: its ridge lambda per training row (the probe's validation choice)."""
    x, tr, ev = inputs.tokens, inputs.train_all, inputs.evaluation
    chosen = context.chosen
    f_train = cross_fitted_features(x, tr, inputs.doc_of, offset, inputs.window, inputs.vocab, chosen)
    f_eval = baseline_features(x, tr, None, ev, offset, inputs.window, inputs.vocab, chosen)
    m4 = chosen["ngram4"]["min_count"]
    l_train = _cross_fit_long(inputs, offset, m4)
    l_eval = long_context_features(x, inputs.greedy, tr, ev, offset, inputs.window, inputs.vocab, m4)
    y_train = torch.from_numpy(x[tr + offset])
    y_eval = x[ev + offset]
    readout = StackedReadout(inputs.columns, inputs.vocab)
    n = len(tr)
    ones_train, ones_inv = intercept_only(n)
    ones_eval = torch.ones(len(ev), 1)
    e, q = torch.linalg.eigh(z_train.T.double() @ z_train.double())
    inverse = ((q / (e.clamp_min(0) + alpha * n)) @ q.T).float()
    out: dict[str, np.ndarray] = {}
    for name, ft, fe in (("B", f_train, f_eval), ("Blong", f_train.extend(l_train), f_eval.extend(l_eval))):
        w, a = readout.fit(ones_train, ft, y_train, ones_inv)
        out[name] = (readout.predict(ones_eval, fe, w, a).numpy() == y_eval).astype(np.float64)
        w, a = readout.fit(z_train, ft, y_train, inverse)
        out[f"{name}+h"] = (readout.predict(z_eval, fe, w, a).numpy() == y_eval).astype(np.float64)
        out[f"{name}:alpha"] = a
    # the stratum: was x_t's 4-token context seen in training (the backoff n-gram answers from order 4)?
    keys_fit = context_keys(x, tr, 4, inputs.window, inputs.vocab)
    keys_ev = context_keys(x, ev, 4, inputs.window, inputs.vocab)
    out["seen4"] = (np.isin(keys_ev, keys_fit[keys_fit >= 0]) & (keys_ev >= 0)).astype(np.float64)
    return out


def _cross_fit_long(inputs: StackedInputs, offset: int, min_count: int, folds: int = FOLDS) -> Features:
    x, tr = inputs.tokens, inputs.train_all
    fold = inputs.doc_of[tr] % folds
    parts = []
    for f in range(folds):
        inside = np.flatnonzero(fold == f)
        if len(inside) == 0:
            continue
        rest = tr[fold != f] if (fold != f).any() else tr
        parts.append(
            (
                inside,
                long_context_features(
                    x, inputs.greedy, tr, tr[inside], offset, inputs.window, inputs.vocab, min_count, rest
                ),
            )
        )
    names = parts[0][1].names
    ids = [np.full((len(tr), a.shape[1]), NO_PREDICTION, dtype=np.int64) for a in parts[0][1].ids]
    values = [np.zeros((len(tr), a.shape[1])) for a in parts[0][1].ids]
    for inside, feats in parts:
        for j in range(len(names)):
            ids[j][inside] = feats.ids[j]
            values[j][inside] = feats.values[j]
    return Features(names, ids, values)

"""The plan-tasks method on cases whose answer is known: a tiny engine model trained here on a task where the
output is decided at the site and the prompt-text baseline cannot read it (the pipeline must say "planned"), a
target the baseline reads (it must not), shuffled labels (the control must contain 0), power that grows with the
prompts, and a planted leak that layer selection on the test fold would have fallen for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from forethought.arch.config import ArchConfig
from forethought.arch.models import build_model
from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval
from forethought.experiments.plan_tasks import analysis as A
from forethought.experiments.plan_tasks.generate import completion_texts, greedy_completions
from forethought.experiments.plan_tasks.types import Patching, Steering, TaskPrompt, TaskRun
from forethought.weights.registry import LoadedModel
from forethought.weights.tokenizer import Tokenizer

# The synthetic grammar: "<s> x1 r1 r2 x2 r3 SEP" -> "ARTICLE NOUN ECHO". Tokens t0..t15 have a parity bit. The noun
# is vowel-initial (apple / egg, article "an") when parity(x1) XOR parity(x2), else pear / fig ("a"); parity(r3)
# picks which of the two. The echo is e{x1 mod 4}, a function of the first token alone. An XOR of two tokens at
# positions 1 and 4 is not a linear function of the prompt's unigram and bigram counts (no bigram holds both), so
# the baseline reads at most the noun's r3 half -- while the model must work the XOR out by the site to write the
# article. The echo the baseline reads exactly (the bigram "<s> x1").
SYMBOLS = [f"t{i}" for i in range(16)]
NAMES = ["<s>", *SYMBOLS, "SEP", "a", "an", "apple", "egg", "pear", "fig", "e0", "e1", "e2", "e3"]
TOKEN = {name: i for i, name in enumerate(NAMES)}
NOUNS = ("apple", "egg", "pear", "fig")


def example(x1: int, r1: int, r2: int, x2: int, r3: int) -> tuple[list[str], list[str]]:
    vowel = (x1 % 2) ^ (x2 % 2)
    noun = (("pear", "fig"), ("apple", "egg"))[vowel][r3 % 2]
    prompt = ["<s>", f"t{x1}", f"t{r1}", f"t{r2}", f"t{x2}", f"t{r3}", "SEP"]
    return prompt, ["an" if vowel else "a", noun, f"e{x1 % 4}"]


def examples(rng: np.random.Generator, n: int) -> list[tuple[list[str], list[str]]]:
    return [example(*(int(v) for v in rng.integers(0, 16, 5))) for _ in range(n)]


class SyntheticTask:
    """The PlanTask the analysis reads, for the synthetic grammar."""

    name = "synthetic"
    targets = ("article", "noun", "echo")
    max_new_tokens = 3
    stop_texts = ()

    def labels(self, prompt: TaskPrompt, completion: str) -> dict[str, str | None]:
        w = completion.split() + [""] * 3
        return {
            "article": w[0] if w[0] in ("a", "an") else None,
            "noun": w[1] if w[1] in NOUNS else None,
            "echo": w[2] if w[2].startswith("e") else None,
        }

    def baseline_hints(self, prompt: TaskPrompt) -> dict[str, str]:
        return {}


def train_tiny(steps: int = 300, seed: int = 0) -> LoadedModel:
    """A 3-layer engine Transformer (the arch lab's StandardLM) trained on the grammar's completions."""
    torch.manual_seed(seed)
    net = build_model(ArchConfig("standard", len(NAMES), d_model=64, n_layers=3, n_heads=4, d_ff=128), seed=seed).net
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = torch.tensor([[TOKEN[w] for w in p + c] for p, c in examples(rng, 128)])
        logits = net(x[:, :-1])[:, 6:]  # the site and the completion's positions predict the completion
        loss = F.cross_entropy(logits.reshape(-1, len(NAMES)), x[:, 7:].reshape(-1))
        for group in opt.param_groups:  # warmup, then cosine
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.requires_grad_(False).eval()
    backend = HFTokenizer(models.WordLevel(vocab=TOKEN, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return LoadedModel(net, Tokenizer(backend, None, None), "tiny-synthetic", ".")


def collect_run(lm: LoadedModel, task: SyntheticTask, n: int, seed: int) -> TaskRun:
    data = examples(np.random.default_rng(seed), n)
    prompts = [TaskPrompt(task.name, i, " ".join(p), f"g{i}", {"gold": c}) for i, (p, c) in enumerate(data)]
    ids = [lm.tokenizer.encode(p.text) for p in prompts]
    layers = list(range(lm.config.n_layers))
    out = greedy_completions(lm.model, ids, task.max_new_tokens, (), layers=layers, batch_size=64)
    texts = completion_texts(lm.tokenizer, out.ids)
    labels = {t: [task.labels(p, c)[t] for p, c in zip(prompts, texts, strict=True)] for t in task.targets}
    behaved = np.array([c.split() == gold for c, (_, gold) in zip(texts, data, strict=True)])
    return TaskRun(task.name, lm.name, prompts, ids, out.ids, texts, labels, behaved, layers, out.states)


@pytest.fixture(scope="module")
def known() -> dict:
    lm = train_tiny()
    task = SyntheticTask()
    run = collect_run(lm, task, 300, seed=123)
    settings = A.AnalysisSettings(causal_prompts=48, n_boot=500, doses=(0.125, 0.25, 0.5, 1.0))
    return {"lm": lm, "run": run, "results": {r.target: r for r in A.analyze_run(lm, run, task, settings)}}


def contains_zero(i: Interval) -> bool:
    return i.low <= 0 <= i.high


def test_the_tiny_model_does_the_task(known):
    assert known["run"].behaved.mean() > 0.95


def test_known_positive_is_planned(known):
    """The article is decided at the site from an XOR the baseline cannot read: the probe's excess is above 0,
    and steering and patching move the output, each beyond its control."""
    r = known["results"]["article"]
    assert r.baseline_acc.high < 0.65  # the baseline is at chance on the XOR
    assert r.excess.low > 0.3, r.excess
    assert r.steering.effect.low > 0 and r.patching.effect.low > 0, (r.steering, r.patching)
    assert r.verdict == "planned", r.why
    # the dose-response: nothing at the smallest dose, and the random direction never writes the steered article
    assert r.steering.probe_share[0].estimate < r.steering.probe_share[-1].estimate
    assert max(s.estimate for s in r.steering.random_share) < 0.1
    assert r.patching.control.estimate < 0.1
    assert r.steering.kl_jump_position == 0  # the edit moves the article, the very next token
    assert r.steering.effect_dose in r.steering.doses


def test_noun_two_tokens_ahead_is_in_the_state(known):
    """The noun comes after the article: its vowel half is the XOR (not in B), its other half r3's parity is."""
    r = known["results"]["noun"]
    assert r.baseline_acc.estimate < 0.6 and r.excess.low > 0.2, (r.baseline_acc, r.excess)
    assert r.verdict in ("planned", "encoded, not shown used")


def test_a_copied_prompt_token_is_not_planned(known):
    """The echo is a function of the prompt's first token: the baseline reads it, nothing is left to add."""
    r = known["results"]["echo"]
    assert r.baseline_acc.low > 0.9
    assert contains_zero(r.excess)
    assert r.verdict == "not found", r.why
    assert "prompt text alone reads" in r.why


def test_shuffled_labels_add_nothing(known):
    for target, r in known["results"].items():
        assert contains_zero(r.control_excess), (target, r.control_excess)


def test_shared_prefix_decoding_is_the_plain_one(known):
    """The causal tests decode each edited prompt from its shared prefix's keys/values: the same tokens as
    decoding the repeated prompts whole (greedy_completions), for adds and replacements alike."""
    from forethought.experiments.plan_tasks.causal import edited_completions
    from forethought.experiments.plan_tasks.generate import SiteEdit

    run, lm = known["run"], known["lm"]
    rows = np.array([0, 1, 2, 0, 1, 2, 5, 7])
    vectors = torch.from_numpy(np.random.default_rng(0).standard_normal((len(rows), 64)) * 3).float()
    plain = [run.completion_ids[i] for i in rows]
    for edit in (SiteEdit(1, vectors, "add"), SiteEdit(2, torch.from_numpy(run.states[rows, 2]), "replace")):
        shared = edited_completions(lm.model, run.prompt_ids, rows, edit, 3, (), batch_size=3)
        whole = greedy_completions(lm.model, [run.prompt_ids[i] for i in rows], 3, (), edit=edit, batch_size=3)
        assert shared == whole.ids
        # the add moves some completions; each prompt's own state put back gives its own completion
        assert (shared != plain) if edit.mode == "add" else (shared == plain)


def test_results_are_filled(known):
    r = known["results"]["article"]
    d = r.to_dict()
    assert d["n_usable"] == 300 and d["n_classes"] == 2 and d["layer"] in known["run"].layers
    assert len(r.steering.probe_share) == len(r.steering.doses) == 4 and r.steering.n == 48
    assert r.mde > 0 and "MDE" in r.why


# -------------------------------------------------------------------------------------- without a model


def planted(n: int, signal: float, n_layers: int = 3, d: int = 32, seed: int = 0):
    """Random prompts, binary labels, states with the label added along one direction at layer 1."""
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(0, 40, 12)) for _ in range(n)]
    y = rng.integers(0, 2, n)
    states = rng.standard_normal((n, n_layers, d)).astype(np.float32)
    states[:, 1, 0] += signal * (2 * y - 1)
    return ids, y, states


def test_kernel_ridge_is_the_primal_ridge():
    """The readouts solve ridge in the training rows' kernel; the same fit in the primal (numpy's solve of
    (X^T X + lambda I) W = X^T (Y - mean) on the scaled, centred features) must give the same scores."""
    ids, y, states = planted(90, 1.0, n_layers=2, d=16)
    text = A.ngram_features(ids)
    train, rows = np.arange(60), np.arange(60, 90)
    kernels = A.Kernels(text, states, train)
    got = A.ridge_scores(kernels.of("stacked", 1), train, y, rows, [0.01, 1.0]).numpy()

    def block(x, standardise):
        x = x.astype(np.float64) - x[train].mean(0)
        if standardise:
            x = x / np.maximum(x[train].std(0, ddof=1), 1e-6)
        return x / np.sqrt((x[train] ** 2).sum(1).mean())

    x = np.concatenate([block(text, False), block(states[:, 1], True)], 1)
    onehot = np.eye(2)[y[train]]
    for k, p in enumerate([0.01, 1.0]):
        w = np.linalg.solve(
            x[train].T @ x[train] + p * len(train) * np.eye(x.shape[1]), x[train].T @ (onehot - onehot.mean(0))
        )
        np.testing.assert_allclose(got[k], x[rows] @ w + onehot.mean(0), atol=1e-8)


def test_mde_shrinks_with_more_prompts():
    settings = A.AnalysisSettings(n_boot=500)
    mdes = []
    for n in (80, 320):
        ids, y, states = planted(n, 1.5)
        folds = A.assign_folds([str(i) for i in range(n)], 5, 0, y)
        fit = A.cross_fit(A.ngram_features(ids), states, y, folds, settings)
        excess = A.bootstrap_by_document(fit.correct["stacked"] - fit.correct["baseline"], np.arange(n), 500)
        mdes.append(A.mde(excess))
    assert mdes[1] < 0.7 * mdes[0], mdes  # ~1/sqrt(4) in theory


def test_layer_choice_never_sees_the_test_fold():
    """Layer 2 holds the label strongly on folds 1-4 but is noise on fold 0; layer 1 holds it weakly everywhere.
    Chosen on the training folds, layer 2 wins and fold 0 is scored at chance; a choice that peeked at fold 0 --
    the leak, done here on purpose -- would take layer 1 and score fold 0 well above chance."""
    n = 300
    ids, y, states = planted(n, 0.0, n_layers=4)
    folds = A.assign_folds([str(i) for i in range(n)], 5, 0, y)
    test = folds == 0
    sign = 2 * y - 1
    states[:, 1, 0] += 1.0 * sign
    states[~test, 2, :4] += 3.0 * sign[~test, None]
    settings = A.AnalysisSettings()
    fit = A.cross_fit(A.ngram_features(ids), states, y, folds, settings, ("probe",))
    assert fit.chosen["probe"][0][0] == 2
    honest = fit.correct["probe"][test].mean()
    train, rows = np.flatnonzero(~test), np.flatnonzero(test)
    kernels = A.Kernels(A.ngram_features(ids), states, train)
    leaky = max(
        float((A.ridge_scores(kernels.of("probe", j), train, y, rows, [p])[0].argmax(-1).numpy() == y[rows]).mean())
        for j in range(4)
        for p in settings.penalties
    )
    assert honest < 0.65 < 0.7 < leaky, (honest, leaky)


def test_the_baseline_reads_what_the_prompt_says():
    """A label that is a token's presence in the prompt: B alone gets it, and h (noise) adds nothing."""
    n = 200
    ids, _, states = planted(n, 0.0)
    y = np.array([int(7 in x) for x in ids])
    folds = A.assign_folds([str(i) for i in range(n)], 5, 0, y)
    fit = A.cross_fit(A.ngram_features(ids), states, y, folds, A.AnalysisSettings())
    assert fit.correct["baseline"].mean() > 0.95
    assert fit.correct["probe"].mean() < 0.75
    # a fact the prompt states that no n-gram shows (a hint, e.g. line 1's rhyme family): B reads it too
    rng = np.random.default_rng(1)
    fact = rng.integers(0, 3, n)
    hints = A.hint_features([{"family": f"f{v}"} for v in fact])
    folds = A.assign_folds([str(i) for i in range(n)], 5, 0, fact)
    fit = A.cross_fit([A.ngram_features(ids), hints], states, fact, folds, A.AnalysisSettings(), ("baseline",))
    assert fit.correct["baseline"].mean() > 0.95


def test_folds_keep_groups_whole():
    groups = [f"g{i // 3}" for i in range(60)]
    folds = A.assign_folds(groups, 5, 0)
    for g in set(groups):
        assert len({folds[i] for i, x in enumerate(groups) if x == g}) == 1
    assert sorted(np.bincount(folds)) == [12] * 5
    labels = [i % 2 for i in range(100)]  # given labels, each fold gets its even share of every class
    folds = A.assign_folds([str(i) for i in range(100)], 5, 0, labels)
    assert all(np.bincount(folds[np.array(labels) == c]).tolist() == [10] * 5 for c in (0, 1))
    with pytest.raises(ForethoughtError, match="cannot fill"):
        A.assign_folds(["a", "b"], 5, 0)


def test_rare_classes_merge_into_other():
    labels, classes = A.merge_rare(["x"] * 12 + ["y"] * 3 + ["z"] * 2 + [None], 10)
    assert classes == ["other", "x"] and labels.count("other") == 5 and labels[-1] is None


def iv(e: float, lo: float, hi: float) -> Interval:
    return Interval(e, lo, hi)


@pytest.mark.parametrize(
    ("behaviour", "n", "classes", "excess", "steer", "patch", "expected"),
    [
        (0.9, 200, 2, iv(0.2, 0.1, 0.3), iv(0.3, 0.1, 0.5), None, "planned"),
        (0.9, 200, 2, iv(0.2, 0.1, 0.3), iv(0.0, -0.1, 0.1), iv(0.2, 0.05, 0.3), "planned"),
        (0.9, 200, 2, iv(0.2, 0.1, 0.3), iv(0.0, -0.1, 0.1), iv(0.0, -0.1, 0.1), "encoded, not shown used"),
        (0.9, 200, 2, iv(0.05, -0.01, 0.1), iv(0.3, 0.1, 0.5), None, "not found"),
        (0.1, 200, 2, iv(0.2, 0.1, 0.3), iv(0.3, 0.1, 0.5), None, "task not done"),
        (0.9, 20, 2, iv(0.2, 0.1, 0.3), None, None, "task not done"),
        (0.9, 200, 1, iv(0.2, 0.1, 0.3), None, None, "task not done"),
    ],
)
def test_verdict(behaviour, n, classes, excess, steer, patch, expected):
    s = Steering(3, [1.0], [steer], [steer], steer) if steer else None
    p = Patching(3, patch, patch, patch) if patch else None
    verdict, why = A.verdict(iv(behaviour, behaviour, behaviour), n, classes, excess, 0.1, s, p, A.AnalysisSettings())
    assert verdict == expected, why
    assert why


def test_a_causal_null_without_events_says_what_it_rules_out():
    """No prompt moved in either arm: the bootstrap interval is [0, 0] and means nothing; the text says instead
    how large an effect the n prompts rule out (rule of three), and the map's cell says the same."""
    from forethought.viz.plan_map import table_rows

    zero = iv(0.0, 0.0, 0.0)
    s = Steering(25, [1.0], [zero], [zero], zero, n=64)
    p = Patching(25, iv(1 / 64, 0, 0.05), iv(1 / 64, 0, 0.05), zero, n=64)
    verdict, why = A.verdict(iv(0.9, 0.8, 1.0), 200, 4, iv(0.05, 0.01, 0.1), 0.07, s, p, A.AnalysisSettings())
    assert verdict == "encoded, not shown used"
    assert "[+0.0, +0.0]" not in why and why.count("no prompt of 64 differed") == 2 and "< 4.7 points" in why
    moved = Steering(25, [1.0], [iv(0.1, 0.02, 0.2)], [zero], iv(0.1, 0.02, 0.2), n=64)
    assert "+10.0 [+2.0, +20.0]" in A.verdict(iv(0.9, 0.8, 1.0), 200, 4, iv(0.05, 0.01, 0.1), 0.07, moved, None,
                                              A.AnalysisSettings())[1]  # fmt: skip
    d = {"estimate": 0.0, "low": 0.0, "high": 0.0}
    row = {"target": "first_call", "behaviour_rate": {"estimate": 0.8, "low": 0.7, "high": 0.9},
           "excess": {"estimate": 0.05, "low": 0.01, "high": 0.1}, "mde": 0.07, "verdict": "encoded, not shown used",
           "steering": {"effect": d, "n": 64}, "patching": {"effect": {"estimate": 0.02, "low": -0.01, "high": 0.05},
                                                            "n": 64}}  # fmt: skip
    summary = {"tasks": ["code"], "models": [{"model": "m", "n_params": 1}],
               "outcomes": [{"model": "m", "task": "code", "results": [row]}]}  # fmt: skip
    cells = table_rows(summary)[0]
    assert cells[5].startswith("+0.0: no prompt of 64 differed") and cells[6] == "+2.0 [-1.0, +5.0]"
    # the same for the excess: B and B + h agreeing on every prompt bound it by the prompts' number
    verdict, why = A.verdict(iv(0.9, 0.8, 1.0), 200, 3, zero, float("nan"), None, None, A.AnalysisSettings())
    assert verdict == "not found" and "no prompt of 200 differed between B and B + h (effect < 1.5" in why
    row |= {"excess": d, "mde": float("nan"), "n_usable": 200, "steering": None, "patching": None}
    assert table_rows(summary)[0][8] == "< 1.5 (no prompt differed)"
    # where the prompt text alone reads the target, "not found" only says the setting cannot discriminate
    row |= {"verdict": "not found", "baseline_acc": {"estimate": 0.99, "low": 0.97, "high": 1.0}}
    assert table_rows(summary)[0][7] == "not found: the text decides (B 99%)"
    row["baseline_acc"] = {"estimate": 0.9, "low": 0.85, "high": 0.95}
    assert table_rows(summary)[0][7] == "not found"


def test_settings_and_runs_that_cannot_be_read():
    with pytest.raises(ForethoughtError, match="folds"):
        A.AnalysisSettings(folds=1)
    with pytest.raises(ForethoughtError, match="doses"):
        A.AnalysisSettings(doses=(0.0,))
    ids, y, states = planted(60, 1.0)
    prompts = [TaskPrompt("t", i, "", f"g{i}") for i in range(60)]
    run = TaskRun("t", "m", prompts, ids, [[]] * 60, [""] * 60, {"article": [str(v) for v in y]}, np.ones(60, bool),
                  [0, 1, 2], states)  # fmt: skip
    task = SyntheticTask()
    task.targets = ("article",)
    with pytest.raises(ForethoughtError, match="not captured"):
        A.analyze_run(None, run, task, A.AnalysisSettings(layers=(5,)))
    r = A.analyze_run(None, run, task, A.AnalysisSettings(min_prompts=100))[0]
    assert r.verdict == "task not done" and "too few" in r.why
    run.prompts = [TaskPrompt("t", i, "", f"g{i % 3}") for i in range(60)]  # three groups cannot fill five folds
    r = A.analyze_run(None, run, task, A.AnalysisSettings())[0]
    assert r.verdict == "task not done" and "3 groups" in r.why

"""plan-tasks: the five task families (prompts, labels, behaviour), batched greedy collection against one prompt at
a time on the real model, the run folder, the cache, and the command's errors and end-to-end output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.experiments.plan_tasks.collect import collect, spread_layers
from forethought.experiments.plan_tasks.generate import (
    SiteEdit,
    greedy_completions,
    ragged_batches,
    shared_prefix_length,
)
from forethought.experiments.plan_tasks.rhymes import rhyme_family, rhymes
from forethought.experiments.plan_tasks.tasks import TASKS, body_of, task_names, words
from forethought.experiments.plan_tasks.types import TaskPrompt, TaskRun


class ChatStub:
    """Only what `prompts` reads of a tokenizer for chat tasks: the template, here a visible wrapper."""

    chat_template = "<user>{text}</user><assistant>"

    def apply_chat_template(self, text: str) -> str:
        return f"<user>{text}</user><assistant>"


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_builds_200_distinct_prompts_the_same_for_a_seed(name):
    task = TASKS[name]
    assert task.pool_size() >= 200
    first = task.prompts(ChatStub(), 200, seed=3)
    again = task.prompts(ChatStub(), 200, seed=3)
    other = task.prompts(ChatStub(), 200, seed=4)
    assert [p.text for p in first] == [p.text for p in again]
    assert [p.text for p in first] != [p.text for p in other]
    assert len({p.text for p in first}) == 200
    assert [p.index for p in first] == list(range(200))
    assert all(p.task == name and p.group for p in first)
    assert len({p.group for p in first}) > 20  # cross-fitting has groups to split
    assert all(isinstance(v, str) for p in first for v in task.baseline_hints(p).values())
    if task.chat:
        assert all(p.text.startswith("<user>") for p in first)
    with pytest.raises(ForethoughtError, match="prompts"):
        task.prompts(ChatStub(), task.pool_size() + 1)


def test_rhyme_families_come_from_cmudict():
    for family in words("rhyme")["families"]:
        assert len({rhyme_family(w) for w in family}) == 1, family  # each shipped list is one family
    assert rhyme_family("tree") == "IY" and rhyme_family("night") == "AY-T"
    assert rhymes("cat", "hat") and not rhymes("cat", "cat") and not rhymes("cat", "dog")
    assert rhyme_family("zzqx") is None


def _prompt(name: str, **meta) -> TaskPrompt:
    return TaskPrompt(name, 0, "", "g", meta)


def test_rhyme_labels():
    task, p = TASKS["rhyme"], _prompt("rhyme", end_word="tree")
    labels = task.labels(p, "And watched the bees fly by the sea.\n")
    assert labels == {"rhyme_family": "IY", "last_word": "sea"} and task.behaved(p, "", labels)
    labels = task.labels(p, "And the sun was shining bright.\n")
    assert labels["last_word"] == "bright" and not task.behaved(p, "", labels)
    assert task.labels(p, "And then the little bird began to sing and") == {"rhyme_family": None, "last_word": None}
    assert not task.behaved(p, "", task.labels(p, "And I climbed the tree.\n"))  # the same word is no rhyme


def test_answer_labels():
    task, p = TASKS["answer"], _prompt("answer", gold="horse", first="horse", second="drum")
    labels = task.labels(p, " horse.")
    assert labels == {"answer": "horse", "answer_slot": "first"} and task.behaved(p, "", labels)
    labels = task.labels(p, " Drum")
    assert labels == {"answer": "drum", "answer_slot": "second"} and not task.behaved(p, "", labels)
    assert task.labels(p, " mouse") == {"answer": "mouse", "answer_slot": None}
    assert task.labels(p, " ...") == {"answer": None, "answer_slot": None}


def test_answer_later_reads_the_word_after_the_preamble():
    task, p = TASKS["answer_later"], _prompt("answer_later", gold="horse", first="drum", second="horse")
    assert task.word_list() is words("answer")
    labels = task.labels(p, " Let me think about it. The answer is: the horse.\n")
    assert labels == {"answer": "horse", "answer_slot": "second"} and task.behaved(p, "", labels)
    assert task.labels(p, " The drum, of course.\n") == {"answer": None, "answer_slot": None}  # no preamble
    prompt = task.prompts(None, 1)[0]
    assert prompt.text.endswith("\nAnswer:") and "The answer is" in prompt.text  # the preamble only in the shots


def test_article_labels():
    task, p = TASKS["article"], _prompt("article", noun="apple", article="an")
    labels = task.labels(p, " an apple.")
    assert labels == {"article": "an", "noun": "apple"} and task.behaved(p, "", labels)
    labels = task.labels(p, " a pear.")
    assert labels == {"article": "a", "noun": "pear"} and not task.behaved(p, "", labels)
    assert task.labels(p, " the apple.") == {"article": None, "noun": "apple"}
    assert task.labels(p, " apples.") == {"article": None, "noun": None}


def test_code_labels():
    task, p = TASKS["code"], _prompt("code")
    done = '    """Load it."""\n    with open(path) as f:\n        data = json.load(f)\n    return data\n\ndef other():'
    assert body_of(done)[1] and len(body_of(done)[0]) == 4
    labels = task.labels(p, done)
    assert labels == {"has_return": "yes", "body_lines": "3-4", "first_call": "open"}
    assert task.behaved(p, done, labels)
    printed = "    print(user)\n\n"
    assert task.labels(p, printed) == {"has_return": "no", "body_lines": "1", "first_call": "print"}
    cut = "    x = 1\n    y = 2\n    if x:"  # the budget ended it: nothing certain but what it has shown
    assert task.labels(p, cut) == {"has_return": None, "body_lines": None, "first_call": None}
    long_cut = "".join(f"    v{i} = os.path.join(a, b)\n" for i in range(5)) + "    return"
    assert task.labels(p, long_cut) == {"has_return": "yes", "body_lines": "5+", "first_call": "os.path.join"}
    assert not task.behaved(p, "# no body\n", task.labels(p, "# no body\n"))


def test_response_labels():
    task = TASKS["response"]
    listed = _prompt("response", kind="list", requested="3")
    text = "Here are three:\n1. Apple\n2. Pear\n3. Plum"
    labels = task.labels(listed, text)
    assert labels == {"length_bucket": "short", "item_count": "3", "code_block": "no"}
    assert task.behaved(listed, text, labels)
    bullets = "- a\n- b\n* c\n- d\n- e\n- f\n- g"
    assert task.labels(listed, bullets)["item_count"] == "6+"
    code = _prompt("response", kind="code", requested="yes")
    text = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert task.labels(code, text)["code_block"] == "yes" and task.behaved(code, text, task.labels(code, text))
    long = _prompt("response", kind="long", requested="long")
    text = " ".join(["word"] * 50)
    assert task.labels(long, text)["length_bucket"] == "long" and task.behaved(long, text, task.labels(long, text))
    assert task.labels(long, " ".join(["w"] * 20))["length_bucket"] == "medium"


def test_task_names():
    assert task_names("all") == list(TASKS)
    assert task_names("article,rhyme") == ["rhyme", "article"]
    with pytest.raises(ForethoughtError, match="unknown task 'poem'"):
        task_names("rhyme,poem")


def test_spread_layers():
    assert spread_layers(30) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert spread_layers(5) == [0, 1, 2, 3, 4]
    assert spread_layers(28)[-1] == 27 and len(spread_layers(28)) == 8


@pytest.mark.slow
def test_batched_greedy_is_one_at_a_time_on_the_real_model(real_lm):
    task = TASKS["rhyme"]
    prompts = task.prompts(None, 10, seed=0)
    ids = [real_lm.tokenizer.encode(p.text) for p in prompts]
    # rows of different lengths really share a (ragged) batch
    assert any(len({len(ids[i]) for i in b}) > 1 for b in ragged_batches(ids, 8))
    layers = [0, 15, 29]
    kw = dict(max_new_tokens=6, stop_ids=[], layers=layers)
    batched = greedy_completions(real_lm.model, ids, batch_size=8, **kw)
    single = greedy_completions(real_lm.model, ids, batch_size=1, **kw)
    assert batched.ids == single.ids
    assert all(len(x) == 6 for x in batched.ids)
    np.testing.assert_allclose(batched.states, single.states, rtol=1e-4, atol=1e-4)
    assert np.abs(batched.states).max() > 1  # real states, not zeros
    # the control: an edit at the site changes what is written, so the comparison above could fail
    push = torch.from_numpy(single.states[0, 1] * -8.0)
    edited = greedy_completions(real_lm.model, ids, batch_size=8, edit=SiteEdit(15, push, "add"), **kw)
    assert edited.ids != batched.ids


@pytest.mark.slow
def test_collect_and_the_run_folder(real_lm, tmp_path):
    task = TASKS["article"]
    prompts = task.prompts(None, 8, seed=1)
    run = collect(real_lm, task, prompts, layers=[3, 29], batch_size=8)
    assert run.states.shape == (8, 2, 576) and len(run.completions) == 8
    assert set(run.labels) == {"article", "noun"}
    assert run.behaved.mean() >= 0.5  # the 135M model continues the analogy with the right article and noun
    assert run.settings["stop_ids"] and run.settings["new_tokens"] > 0
    run.save(tmp_path / "run")
    back = TaskRun.load(tmp_path / "run")
    assert back.completions == run.completions and back.labels == run.labels and back.prompts == run.prompts
    np.testing.assert_array_equal(back.states, run.states)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"task": "article"}))
    with pytest.raises(ForethoughtError, match="not a readable plan-tasks run"):
        TaskRun.load(tmp_path / "run")
    run.save(tmp_path / "cut")
    np.save(tmp_path / "cut" / "states.npy", run.states[:3])
    with pytest.raises(ForethoughtError, match="inconsistent"):
        TaskRun.load(tmp_path / "cut")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "poem"], "unknown task 'poem'"),
        (["--model", "no-such-model"], "model 'no-such-model' is neither"),
        (["--prompts", "0"], "--prompts must lie in 1.."),
        (["--prompts", "100000"], "--prompts must lie in 1.."),
        (["--dtype", "int4"], "--dtype 'int4'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--ray", "local:0"], "--ray 'local:0'"),
        (["--causal", "some"], "--causal 'some': use one of all, where-excess, none"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert main(["plan-tasks", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plan-tasks", "--out", str(blocker / "sub"), "--tasks", "article"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_end_to_end_writes_the_map_caches_and_resumes(llama_dir, tmp_path, capsys):
    out = tmp_path / "map"
    args = ["plan-tasks", "--model", str(llama_dir), "--tasks", "article", "--prompts", "12", "--quick"]
    args += ["--out", str(out), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    md = (out / "plan_map.md").read_text()
    assert "| article | article |" in md and "| article | noun |" in md
    assert (out / "plan_scale.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "plan_map.json").read_text())
    assert summary["tasks"] == ["article"] and summary["models"][0]["n_params"] > 0
    folder = out / llama_dir.name / "article"
    run = TaskRun.load(folder / "run")
    assert len(run) == 12 and (folder / "result.json").is_file()
    assert [o["cached"] for o in first["outcomes"]] == [False]
    assert all(r["verdict"] for r in first["outcomes"][0]["results"])

    assert main(args) == 0  # the same settings: read back, nothing recomputed
    assert [o["cached"] for o in json.loads(capsys.readouterr().out)["outcomes"]] == [True]

    (folder / "result.json").unlink()  # cut after the collection: the saved run is analysed again, not collected
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)["outcomes"][0]
    assert not resumed["cached"] and resumed["collect_seconds"] == pytest.approx(run.seconds)

    assert main([*args, "--seed", "1"]) == 0  # a changed setting redoes it
    redone = json.loads(capsys.readouterr().out)["outcomes"][0]
    assert not redone["cached"] and TaskRun.load(folder / "run").prompts != run.prompts

    # --saved-only: the map from what is saved; a task never run says so instead of running
    assert main([*args, "--seed", "1", "--tasks", "article,answer", "--saved-only"]) == 0
    partial = json.loads(capsys.readouterr().out)
    assert [o["cached"] for o in partial["outcomes"]] == [True]
    assert "not run yet" in (out / "plan_map.md").read_text() and not (out / llama_dir.name / "answer").exists()

    # --causal: asking for --quick's own choice keeps the saved results; none skips every causal test
    assert main([*args, "--seed", "1", "--causal", "where-excess"]) == 0
    assert [o["cached"] for o in json.loads(capsys.readouterr().out)["outcomes"]] == [True]
    assert main([*args, "--seed", "1", "--causal", "none"]) == 0
    skipped = json.loads(capsys.readouterr().out)["outcomes"][0]
    assert not skipped["cached"]
    assert all(r.get("steering") is None and r.get("patching") is None for r in skipped["results"])

    # a task the model cannot run (the tiny model has no chat template) is said in the map, not a crash
    chat = ["plan-tasks", "--model", str(llama_dir), "--tasks", "response", "--prompts", "12", "--quick"]
    assert main([*chat, "--out", str(tmp_path / "chat")]) == 0
    assert "speaks to a chat model" in (tmp_path / "chat" / "plan_map.md").read_text()
    capsys.readouterr()

    from forethought.report.context import ReportContext
    from forethought.report.finding import Unavailable
    from forethought.report.plan_tasks import where_it_plans

    shown = tmp_path / "section"
    shown.mkdir()
    finding = where_it_plans(ReportContext(model=str(llama_dir), results_dir=out), shown)
    assert "article:" in finding.verdict and (shown / "plan_scale.png").is_file()
    assert f"article_article_{llama_dir.name}_verdict" in finding.numbers
    with pytest.raises(Unavailable, match="no plan map"):
        where_it_plans(ReportContext(results_dir=tmp_path), shown)


def test_a_saved_outcome_reads_back_whole_and_a_changed_key_does_not(tmp_path):
    from forethought.experiments.baselines import Interval
    from forethought.experiments.plan_tasks.pipeline import TaskOutcome, read_outcome, save_outcome
    from forethought.experiments.plan_tasks.types import Patching, Steering, TargetResult

    iv = Interval(0.1, 0.05, 0.2)
    steering = Steering(3, [1.0, 4.0], [iv, iv], [iv, iv], iv, kl_jump_position=2.0, n=16)
    result = TargetResult(
        "answer", "m", "answer", 120, iv, 118, 7, 3, iv, iv, iv, iv, 0.07, iv,
        steering=steering, patching=Patching(3, iv, iv, iv, n=16), verdict="planned", why="because",
    )  # fmt: skip
    outcome = TaskOutcome("m", "answer", [result], 134_000_000, 30, 0.62, 60.0, 100.0, 720, key="k1")
    save_outcome(outcome, tmp_path)
    back = read_outcome(tmp_path, "k1")
    assert back.cached and back.results == [result] and back.n_params == outcome.n_params
    assert read_outcome(tmp_path, "k2") is None  # other settings: redone, never shown
    (tmp_path / "result.json").write_text("{")
    assert read_outcome(tmp_path, "k1") is None


def test_gemma_decodes_and_edits_in_ragged_batches_as_by_exact_length(monkeypatch):
    """Gemma's tree attention (bounded by its window) lets plan-tasks batch prompts of any lengths after the
    prefix they all share (run once): the same completions and site states as batching by exact length, and the
    causal tests' shared-prefix edits the same tokens as decoding the repeated prompts whole."""
    from forethought.experiments.plan_tasks.causal import edited_completions
    from forethought.model.random_init import random_model, tiny_config

    config = tiny_config("gemma3", n_layers=3, vocab_size=384, sliding_window=64, sliding_layers=(0, 2))
    model = random_model(config, seed=5)
    rng = np.random.default_rng(0)
    instruction = rng.integers(3, 380, 7).tolist()  # shared by every prompt: run once, copied into each row
    prompts = [instruction + rng.integers(3, 380, n).tolist() for n in (5, 9, 9, 14, 3, 20)]
    assert shared_prefix_length(prompts) == 7 and shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    ragged = greedy_completions(model, prompts, 6, (), layers=[1, 2], batch_size=4)
    rows = np.array([0, 3, 5, 0, 3])
    vectors = torch.from_numpy(rng.standard_normal((len(rows), 64)) * 4).float()
    shared = edited_completions(model, prompts, rows, SiteEdit(1, vectors, "add"), 6, (), batch_size=4)
    monkeypatch.setattr(type(model.family), "tree_attention", False)
    exact = greedy_completions(model, prompts, 6, (), layers=[1, 2], batch_size=4)
    whole = greedy_completions(model, [prompts[i] for i in rows], 6, (), edit=SiteEdit(1, vectors, "add"))
    assert ragged.ids == exact.ids and np.allclose(ragged.states, exact.states, atol=1e-5)
    assert shared == whole.ids and shared != [ragged.ids[i] for i in rows]

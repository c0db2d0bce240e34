"""The five planning tasks: prompts built offline from the word lists in `forethought/data/plan_words/`, and how to
read the targets from what the model wrote.

Each task's future is fixed (or strongly constrained) at the prompt's last token, the planning site: the rhyme of a
couplet's second line, the answer word after a fixed preamble, the shape of a chat response, the structure of a
function body, the article and noun an analogy calls for. A `TaskSpec` says how to build `n` prompts (a seeded
draw from every combination of its templates and words), how to label a completion (None where the completion does
not say), whether the model did the task at all, and which task facts a text-only baseline may use
(`baseline_hints`: facts any reader of the prompt has, e.g. line 1's rhyme family).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import numpy as np

from forethought.errors import ForethoughtError
from forethought.experiments.plan_tasks.rhymes import rhyme_family, rhymes
from forethought.experiments.plan_tasks.types import TaskPrompt

Labels = dict[str, str | None]


@cache
def words(name: str) -> dict:
    """One of the shipped word lists (`forethought/data/plan_words/<name>.json`)."""
    return json.loads(resources.files("forethought.data").joinpath("plan_words", f"{name}.json").read_text())


def _words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


@dataclass(frozen=True)
class TaskSpec:
    """One task family. Subclasses give `_pool` (every prompt the templates make, in a fixed order), `labels`
    and `behaved`; `prompts` draws from the pool and, for chat tasks, renders the model's chat template."""

    name: str
    targets: tuple[str, ...]
    max_new_tokens: int
    stop_texts: tuple[str, ...]  # a generated token containing one of these ends the completion (EOS always does)
    chat: bool = False  # prompts go through the model's chat template
    source: str = ""  # the word list's name, when not the task's own

    def word_list(self) -> dict:
        return words(self.source or self.name)

    def _pool(self) -> list[TaskPrompt]:
        raise NotImplementedError

    def pool_size(self) -> int:
        return len(self._pool())

    def prompts(self, tokenizer, n: int, seed: int = 0) -> list[TaskPrompt]:
        """`n` distinct prompts, the same for the same seed (a permutation of the pool, cut to n)."""
        pool = self._pool()
        if not 1 <= n <= len(pool):
            raise ForethoughtError(f"task {self.name!r} has {len(pool)} prompts; ask for 1..{len(pool)}, not {n}")
        order = np.random.default_rng(seed).permutation(len(pool))[:n]
        chosen = [replace(pool[int(i)], index=j) for j, i in enumerate(order)]
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ForethoughtError(f"task {self.name!r} speaks to a chat model; this model has no chat template")
            chosen = [replace(p, text=tokenizer.apply_chat_template(p.text)) for p in chosen]
        return chosen

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        raise NotImplementedError

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        raise NotImplementedError

    def baseline_hints(self, prompt: TaskPrompt) -> dict[str, str]:
        """Task facts a reader of the prompt text has (kept in the prompt's meta, so a saved run carries them)."""
        return dict(prompt.meta.get("hints", {}))


class RhymeTask(TaskSpec):
    """A couplet's first line after two example couplets; the site is the line break. Targets: the rhyme family
    and the last word of the model's own greedy second line."""

    def _pool(self) -> list[TaskPrompt]:
        w = words("rhyme")
        out = []
        for family_words, line in itertools.product(w["families"], w["lines"]):
            for end in family_words:
                family = rhyme_family(end)
                text = w["preamble"] + line.format(w=end) + "\n"
                hints = {"family": family, "end_word": end}
                out.append(TaskPrompt(self.name, -1, text, group=end, meta={"end_word": end, "hints": hints}))
        return out

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        line = completion.split("\n", 1)[0]
        finished = "\n" in completion or line.rstrip().endswith((".", "!", "?", ",", ";"))
        found = _words_of(line)
        if not finished or not found:  # the line was cut by the token budget: its last word is not known
            return {"rhyme_family": None, "last_word": None}
        return {"rhyme_family": rhyme_family(found[-1]), "last_word": found[-1]}

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        last = labels.get("last_word")
        return last is not None and rhymes(last, prompt.meta["end_word"])


class AnswerTask(TaskSpec):
    """A two-choice question answered after a fixed preamble ("... The answer is: the"); the site is the last
    prompt token, right before the answer word. Targets: the answer word, and which of the two offered words it is
    (`answer_slot`: first / second; None for a word not offered), two classes at any sample size."""

    ask = "ask"  # the prompt's last line, from the word list: it ends right before the answer word

    def _pool(self) -> list[TaskPrompt]:
        w = words("answer")
        categories = w["categories"]
        out = []
        for category, members in categories.items():
            others = [x for c, m in categories.items() if c != category for x in m if x not in members]
            for member, other in itertools.product(members, others):
                for x, y in ((member, other), (other, member)):
                    question = w["category_question"].format(a_category=category, x=x, y=y)
                    text = w["preamble"] + w[self.ask].format(question=question)
                    hints = {"category": category, "first": x, "second": y}
                    group = "|".join(sorted((x, y)))  # the same pair asked either way round goes to one side
                    meta = {"gold": member, "first": x, "second": y, "hints": hints}
                    out.append(TaskPrompt(self.name, -1, text, group, meta=meta))
        return out

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        found = _words_of(completion)
        answer = found[0] if found else None
        slots = {prompt.meta.get("first"): "first", prompt.meta.get("second"): "second"}
        return {"answer": answer, "answer_slot": slots.get(answer) if answer else None}

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        return labels.get("answer") == prompt.meta["gold"]


class AnswerLaterTask(AnswerTask):
    """The same questions with the prompt ending at "Answer:": the model writes the fixed preamble ("Let me think
    about it. The answer is: the") itself, so the answer word is decided, if at all, a dozen tokens before it is
    written (the "whale" case). The site is "Answer:"; the targets are read after the preamble (None when the
    model did not write it)."""

    ask = "ask_early"

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        m = re.search(r"answer is:?\s*(?:the\s+)?([a-z]+)", completion.lower())
        return super().labels(prompt, m.group(1) if m else "")


class ArticleTask(TaskSpec):
    """An analogy that fixes the next noun ("I climbed up the apple tree and picked"); the site is the token
    before the article. Targets: the article (a / an) and the noun after it."""

    def _pool(self) -> list[TaskPrompt]:
        w = words("article")
        article_of = {noun: article for article, nouns in w["nouns"].items() for noun in nouns}
        nouns = sorted(article_of)
        out = []
        for template, x, y in itertools.product(w["templates"], nouns, nouns):
            if x == y:
                continue
            text = template.format(x=x, ax=f"{article_of[x]} {x}", y=y)
            hints = {"cue": y, "cue_initial": "vowel" if y[0] in "aeiou" else "consonant"}
            meta = {"noun": y, "article": article_of[y], "hints": hints}
            out.append(TaskPrompt(self.name, -1, text, group=f"{x}|{y}", meta=meta))
        return out

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        found = _words_of(completion)
        article = found[0] if found and found[0] in ("a", "an") else None
        determined = found and found[0] in ("a", "an", "the", "one", "some")
        noun = found[1] if determined and len(found) > 1 else None
        return {"article": article, "noun": noun}

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        return labels.get("article") == prompt.meta["article"] and labels.get("noun") == prompt.meta["noun"]


_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
_NOT_CALLS = {"if", "elif", "while", "for", "return", "and", "or", "not", "in", "with", "def", "lambda", "assert"}


def body_of(completion: str) -> tuple[list[str], bool]:
    """The function body's lines (indented lines until the first blank or unindented one) and whether the body
    visibly ended (False: the token budget cut it)."""
    body: list[str] = []
    for line in completion.split("\n"):
        if not line.strip():
            if body:
                return body, True
            continue
        if line[:1] not in (" ", "\t"):
            return body, True
        body.append(line)
    return body, False


def body_bucket(n: int) -> str:
    return "1" if n <= 1 else "2" if n == 2 else "3-4" if n <= 4 else "5+"


class CodeTask(TaskSpec):
    """A `def` line after two imports; the site is the end of the def line. Targets: whether the body returns,
    its number of lines (bucketed) and the first name it calls."""

    def _pool(self) -> list[TaskPrompt]:
        w = words("code")
        out = []
        for verb, noun, signature in itertools.product(w["verbs"], w["nouns"], w["signatures"]):
            name = f"{verb}_{noun}"
            text = w["preamble"] + f"def {name}{signature.format(noun=noun)}:\n"
            hints = {"verb": verb, "noun": noun, "signature": signature}
            out.append(TaskPrompt(self.name, -1, text, group=name, meta={"hints": hints}))
        return out

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        body, ended = body_of(completion)
        returns = any(re.match(r"\s*return\b", line) for line in body)
        calls = [m.group(1) for line in body for m in _CALL.finditer(line) if m.group(1) not in _NOT_CALLS]
        # a body the budget cut still says "returns" once it has, and "5+" lines once it has five
        has_return = "yes" if returns else ("no" if ended else None)
        lines = body_bucket(len(body)) if (ended or len(body) >= 5) and body else None
        first_call = calls[0] if calls else ("(none)" if ended and body else None)
        return {"has_return": has_return, "body_lines": lines, "first_call": first_call}

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        return bool(body_of(completion)[0])


_ITEM = re.compile(r"^\s*(\d+[.)]|[-*\u2022])\s+\S", re.MULTILINE)


def length_bucket(n_words: int) -> str:
    return "short" if n_words <= 15 else "medium" if n_words <= 40 else "long"


class ResponseTask(TaskSpec):
    """A chat instruction (through the model's chat template); the site is the template's last token. Targets:
    the response's length bucket (words: <= 15, <= 40, more), its number of list items, whether it has a code
    block. A response the budget cut is long, and its items and code block are those it reached."""

    def _pool(self) -> list[TaskPrompt]:
        w = words("response")
        items = []  # (instruction, group, kind, requested)
        lists = w["lists"]
        for template, n, things in itertools.product(lists["templates"], lists["numbers"], lists["things"]):
            items.append((template.format(n=n, things=things), things, "list", str(n)))
        lengths = w["lengths"]
        for kind, topic in itertools.product(("short", "long"), lengths["topics"]):
            items.append((lengths[kind].format(topic=topic), topic, kind, kind))
        code = w["code"]
        for wanted, task in itertools.product(("yes", "no"), code["tasks"]):
            items.append((code[wanted].format(task=task), task, "code", wanted))
        out = []
        for instruction, group, kind, requested in items:
            hints = {"kind": kind, "requested": requested, "topic": group}
            meta = {"instruction": instruction, "kind": kind, "requested": requested, "hints": hints}
            out.append(TaskPrompt(self.name, -1, instruction, group, meta=meta))
        return out

    def labels(self, prompt: TaskPrompt, completion: str) -> Labels:
        n_items = len(_ITEM.findall(completion))
        return {
            "length_bucket": length_bucket(len(completion.split())),
            "item_count": str(n_items) if n_items < 6 else "6+",
            "code_block": "yes" if "```" in completion else "no",
        }

    def behaved(self, prompt: TaskPrompt, completion: str, labels: Labels) -> bool:
        kind, requested = prompt.meta["kind"], prompt.meta["requested"]
        if kind == "list":
            return labels["item_count"] == requested
        if kind == "code":
            return labels["code_block"] == requested
        return (labels["length_bucket"] == "short") == (requested == "short")


# A chat turn ends with the template's own marker, which is not always the file's EOS (Gemma's is <eos>).
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        RhymeTask("rhyme", ("rhyme_family", "last_word"), max_new_tokens=16, stop_texts=("\n",)),
        AnswerTask("answer", ("answer", "answer_slot"), max_new_tokens=6, stop_texts=("\n", ".")),
        AnswerLaterTask(
            "answer_later", ("answer", "answer_slot"), max_new_tokens=20, stop_texts=("\n",), source="answer"
        ),
        ResponseTask(
            "response",
            ("length_bucket", "item_count", "code_block"),
            max_new_tokens=80,
            stop_texts=END_OF_TURN,
            chat=True,
        ),
        CodeTask("code", ("has_return", "body_lines", "first_call"), max_new_tokens=48, stop_texts=()),
        ArticleTask("article", ("article", "noun"), max_new_tokens=6, stop_texts=("\n", ".")),
    )
}


def task_names(text: str | None) -> list[str]:
    """'rhyme,answer' or 'all' -> task names in TASKS order; an unknown name is the user's error."""
    if text is None or text.strip() in ("", "all"):
        return list(TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ForethoughtError(f"unknown task {unknown[0] if unknown else text!r} (known: {', '.join(TASKS)})")
    return [t for t in TASKS if t in names]

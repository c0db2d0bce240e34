"""Tasks as deterministic generators with a held-out split.

Every task hands out batches `(inputs, targets, mask)` of shape [batch, length]: the model reads `inputs`, is scored
on `targets` where `mask` is set. Batch `index` of a split is a pure function of (task, split, index), so a resumed
run sees the same data. Synthetic sequences belong to the train or the test split by a hash of their content, so no
test sequence is ever trained on; text is split by document (`forethought.data.corpus.split_of`).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from forethought.errors import ForethoughtError

SPLITS = ("train", "test")
TEST_SHARE = 10  # one sequence in 10 is held out
MAX_LENGTH = 1 << 20  # far past what attention at these sizes fits in memory (arch/budget.py says so first)
MAX_DRAWS = 64  # rounds of sampling per batch before a split is declared impossible at this length


def _generator(name: str, split: str, index: int) -> torch.Generator:
    digest = hashlib.sha1(f"{name}:{split}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _content_split(sequences: torch.Tensor) -> torch.Tensor:
    """True where a sequence belongs to the test split: a fixed hash of its tokens, the same on every machine."""
    n = sequences.shape[1]
    weights = torch.tensor([(1_000_003 * (i + 1)) % 2_147_483_647 for i in range(n)], dtype=torch.int64)
    mixed = (sequences.long() * weights).sum(dim=1) + n * 7919
    return (mixed * 2_654_435_761 % 4_294_967_296) % TEST_SHARE == 0


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


class Task:
    name: str
    vocab_size: int
    length: int  # default sequence length (train and test)
    # What accuracy is reported on: "per position" (state tracking) or "masked" (the scored positions only).
    metric: str = "accuracy"

    def batch(self, split: str, index: int, batch_size: int, length: int | None = None) -> Batch:
        raise NotImplementedError

    def check_buildable(self, lengths: list[int]) -> None:
        """Raise one line if the task cannot hand out both splits at one of `lengths`."""

    def describe(self) -> dict:
        return {"task": self.name, "vocab_size": self.vocab_size, "length": self.length}


class SyntheticTask(Task):
    """Draw sequences from a seeded generator and keep those whose content hash falls in the asked split."""

    def sample(self, generator: torch.Generator, n: int, length: int) -> torch.Tensor:
        raise NotImplementedError

    def label(self, sequences: torch.Tensor) -> Batch:
        raise NotImplementedError

    def batch(self, split: str, index: int, batch_size: int, length: int | None = None) -> Batch:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        length = length or self.length
        generator = _generator(f"{self.name}:{length}", split, index)
        kept: list[torch.Tensor] = []
        count = 0
        for _ in range(MAX_DRAWS):
            if count >= batch_size:
                break
            draw = self.sample(generator, 4 * batch_size, length)
            is_test = _content_split(draw)
            draw = draw[is_test if split == "test" else ~is_test]
            kept.append(draw)
            count += draw.shape[0]
        if count < batch_size:  # e.g. parity at length 1: two sequences, neither of them held out
            raise ForethoughtError(
                f"{self.name} at length {length} has too few distinct sequences for a {split} split; use a longer one"
            )
        return self.label(torch.cat(kept)[:batch_size])

    def check_buildable(self, lengths: list[int]) -> None:
        """Both splits can be drawn at every length (raises in one line otherwise); milliseconds."""
        for n in lengths:
            for split in SPLITS:
                self.batch(split, 0, 1, n)


@dataclass
class RunningSum(SyntheticTask):
    """Symbols 0..m-1; the target at every position is the sum so far mod m (m=2: parity). Abelian state
    tracking: one bit of state for parity, yet a state that every position must recompute from all before it."""

    modulus: int = 2
    length: int = 32

    def __post_init__(self) -> None:
        if self.modulus < 2:
            raise ForethoughtError(f"--modulus must be >= 2, got {self.modulus}")
        self.name = "parity" if self.modulus == 2 else f"sum-mod-{self.modulus}"
        self.vocab_size = self.modulus

    def sample(self, generator, n, length):
        return torch.randint(0, self.modulus, (n, length), generator=generator)

    def label(self, sequences):
        targets = sequences.cumsum(dim=1) % self.modulus
        return Batch(sequences, targets, torch.ones_like(sequences, dtype=torch.bool))


def _permutations(n: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    perms = list(itertools.permutations(range(n)))
    index = {p: i for i, p in enumerate(perms)}
    # compose[a, b] = the permutation "apply a, then b"
    compose = torch.tensor([[index[tuple(b[a[i]] for i in range(n))] for b in perms] for a in perms])
    return perms, compose


@dataclass
class PermutationComposition(SyntheticTask):
    """Tokens are permutations of `elements` items; the target at every position is the product so far.
    S3 is the smallest non-abelian group; S5 is not solvable (the NC1-complete word problem)."""

    elements: int = 3
    length: int = 32
    compose: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.elements <= 5:
            raise ForethoughtError(f"--elements must lie in 2..5, got {self.elements}")
        self.name = f"perm-s{self.elements}"
        _, self.compose = _permutations(self.elements)
        self.vocab_size = self.compose.shape[0]

    def sample(self, generator, n, length):
        return torch.randint(0, self.vocab_size, (n, length), generator=generator)

    def label(self, sequences):
        targets = torch.empty_like(sequences)
        state = sequences[:, 0]
        targets[:, 0] = state
        for t in range(1, sequences.shape[1]):
            state = self.compose[state, sequences[:, t]]
            targets[:, t] = state
        return Batch(sequences, targets, torch.ones_like(sequences, dtype=torch.bool))


@dataclass
class AssociativeRecall(SyntheticTask):
    """The look-ahead task: `k1 v1 k2 v2 ... kn vn`, then n queries (keys drawn again), each followed by its value.
    Only the answers are scored. Tokens are uniform, so nothing at a value's own position rewards remembering which
    key came before it: a model answers the later query only if the value's position *pre-caches* its key (a
    previous-token head) for a future it is not scored on -- exactly what myopic training removes."""

    pairs: int = 4
    keys: int = 8
    values: int = 8
    queries: int = 0  # 0: as many as pairs
    length: int = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.pairs <= self.keys:
            raise ForethoughtError(f"--pairs must lie in 1..{self.keys}, got {self.pairs}")
        self.name = "recall"
        self.vocab_size = self.keys + self.values
        self.queries = self.queries or self.pairs
        self.length = 2 * (self.pairs + self.queries) - 1

    def sample(self, generator, n, length):
        p, nq = self.pairs, self.queries
        keys = torch.argsort(torch.rand(n, self.keys, generator=generator), dim=1)[:, :p]
        values = torch.randint(self.keys, self.keys + self.values, (n, p), generator=generator)
        # Queries drawn with replacement: no "the value not yet asked for" shortcut by elimination.
        order = torch.randint(0, p, (n, nq), generator=generator)
        seq = torch.empty(n, 2 * (p + nq), dtype=torch.long)
        seq[:, 0 : 2 * p : 2], seq[:, 1 : 2 * p : 2] = keys, values
        seq[:, 2 * p :: 2], seq[:, 2 * p + 1 :: 2] = keys.gather(1, order), values.gather(1, order)
        return seq

    def batch(self, split, index, batch_size, length=None):
        return super().batch(split, index, batch_size, self.length + 1)

    def label(self, sequences):
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, 2 * self.pairs :: 2] = True  # positions holding a query key: the next token is its value
        return Batch(inputs, targets, mask)


@dataclass
class RepeatedBlock(SyntheticTask):
    """The look-ahead task: a block of `period` distinct random symbols (period drawn from `periods`) repeated to
    fill the sequence. After the first block, the right next token is the one that followed this token's previous
    occurrence. The period is not a fixed offset, so a position can only find that token if the position after the
    earlier occurrence *pre-cached* its predecessor (a previous-token head) when it was read -- work that does nothing
    for its own prediction (its own next token is still unseen) and that myopic training therefore never rewards."""

    length: int = 24
    symbols: int = 16
    periods: tuple[int, int] = (3, 8)

    def __post_init__(self) -> None:
        lo, hi = self.periods
        if self.length <= hi:
            raise ForethoughtError(f"repeat needs --length > {hi} (its longest period), got {self.length}")
        if not 2 <= lo <= hi <= self.symbols:
            raise ForethoughtError(f"periods {self.periods} must lie in 2..{self.symbols}")
        self.name = "repeat"
        self.vocab_size = self.symbols

    def sample(self, generator, n, length):
        lo, hi = self.periods
        period = torch.randint(lo, hi + 1, (n, 1), generator=generator)
        block = torch.argsort(torch.rand(n, self.symbols, generator=generator), dim=1)
        positions = torch.arange(length + 1).expand(n, -1) % period
        return torch.cat((block.gather(1, positions), period), dim=1)  # the period rides along as a last column

    def check_buildable(self, lengths: list[int]) -> None:
        for n in lengths:
            if n <= self.periods[0]:  # no block repeats within the sequence: nothing to score
                raise ForethoughtError(f"repeat at length {n} repeats nothing (periods start at {self.periods[0]})")
        super().check_buildable(lengths)

    def label(self, sequences):
        period, seq = sequences[:, -1:], sequences[:, :-1]
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = torch.arange(inputs.shape[1]).expand_as(inputs) + 1 >= period  # the target is a repeat
        return Batch(inputs, targets, mask)


class TextTask(Task):
    """Next-token prediction on a corpus, tokenized by the embedded model's tokenizer and mapped to its
    `vocab_size - 1` most frequent training tokens plus one <unk> (id vocab_size - 1)."""

    metric = "loss"

    def __init__(self, train: np.ndarray, test: np.ndarray, kept_ids: np.ndarray, length: int, spec: str) -> None:
        self.name = "text"
        self.train, self.test, self.kept_ids = train, test, kept_ids
        self.vocab_size = len(kept_ids) + 1
        self.length = length
        self.spec = spec

    def batch(self, split, index, batch_size, length=None):
        stream = self.train if split == "train" else self.test
        length = length or self.length
        if split == "test":  # fixed, non-overlapping windows: every evaluation scores the same tokens
            starts = (index * batch_size + np.arange(batch_size)) * length % (len(stream) - length - 1)
        else:
            rng = np.random.default_rng([index, 7])
            starts = rng.integers(0, len(stream) - length - 1, batch_size)
        windows = torch.from_numpy(np.stack([stream[s : s + length + 1] for s in starts]).astype(np.int64))
        return Batch(windows[:, :-1], windows[:, 1:], torch.ones(batch_size, length, dtype=torch.bool))

    def check_buildable(self, lengths: list[int]) -> None:
        for n in lengths:
            if min(len(self.train), len(self.test)) <= n + 1:
                raise ForethoughtError(f"text: the corpus's splits are shorter than a window of {n} tokens")

    def describe(self) -> dict:
        return super().describe() | {
            "corpus": self.spec,
            "train_tokens": len(self.train),
            "test_tokens": len(self.test),
            "unk_share_test": float((self.test == self.vocab_size - 1).mean()),
        }


def embedded_tokenizer():
    """The embedded model's tokenizer, read from its GGUF without loading the weights."""
    from forethought.weights.gguf_file import GGUFFile
    from forethought.weights.registry import DEFAULT_MODEL, REGISTRY
    from forethought.weights.tokenizer import Tokenizer

    path = REGISTRY[DEFAULT_MODEL].locate()
    gguf = GGUFFile(path)
    return Tokenizer.from_gguf_fields(
        model=gguf.get("tokenizer.ggml.model"),
        pre=gguf.get("tokenizer.ggml.pre"),
        tokens=gguf.get("tokenizer.ggml.tokens"),
        merges=gguf.get("tokenizer.ggml.merges"),
        token_types=gguf.get("tokenizer.ggml.token_type"),
        bos_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_id=gguf.get("tokenizer.ggml.eos_token_id"),
        add_bos=False,
        chat_template=None,
        source=path.name,
    )


def build_text_task(
    corpus: str = "stdlib",
    vocab_size: int = 1024,
    length: int = 64,
    train_tokens: int = 400_000,
    test_tokens: int = 40_000,
    cache_dir: Path | None = None,
) -> TextTask:
    """Tokenize documents in the corpus's own (hashed) order until both splits have enough tokens; cached on disk."""
    from forethought.data.corpus import load_corpus, split_of

    if vocab_size < 16:
        raise ForethoughtError(f"--vocab must be >= 16 for text, got {vocab_size}")
    key = hashlib.sha1(f"{corpus}:{vocab_size}:{train_tokens}:{test_tokens}".encode()).hexdigest()[:12]
    cached = cache_dir / f"text-{key}.npz" if cache_dir else None
    if cached and cached.is_file():
        try:
            with np.load(cached) as data:
                return TextTask(data["train"], data["test"], data["kept"], length, corpus)
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache is rebuilt below, never trained on
    tokenizer = embedded_tokenizer()
    streams: dict[str, list[int]] = {"train": [], "test": []}
    for document in load_corpus(corpus).documents:
        side = split_of(document.doc_id)
        wanted = train_tokens if side == "train" else test_tokens
        if len(streams[side]) < wanted:
            streams[side] += tokenizer.encode(document.text[:20_000])
        if len(streams["train"]) >= train_tokens and len(streams["test"]) >= test_tokens:
            break
    train = np.array(streams["train"][:train_tokens], dtype=np.int64)
    test = np.array(streams["test"][:test_tokens], dtype=np.int64)
    if len(train) < 10 * length or len(test) < 2 * length:
        raise ForethoughtError(f"corpus {corpus!r} is too small ({len(train)} train / {len(test)} test tokens)")
    counts = np.bincount(train)
    kept = np.argsort(-counts, kind="stable")[: vocab_size - 1]
    kept = kept[counts[kept] > 0]
    mapping = np.full(max(counts.size, int(test.max()) + 1), len(kept), dtype=np.int64)
    mapping[kept] = np.arange(len(kept))
    train_ids, test_ids = mapping[train], mapping[np.minimum(test, mapping.size - 1)]
    if cached:
        from forethought.arch.checkpoint import writing

        tmp = cached.with_name(cached.name + ".tmp.npz")  # complete before it takes the cache's name
        with writing(cached, "the tokenized corpus"):
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:
                np.savez(tmp, train=train_ids, test=test_ids, kept=kept)
                tmp.replace(cached)
            finally:
                tmp.unlink(missing_ok=True)
    return TextTask(train_ids, test_ids, kept, length, corpus)


TASKS = ("parity", "sum-mod", "perm", "repeat", "recall", "text")


def build_task(name: str, length: int | None = None, **options) -> Task:
    """A task by name; options: modulus (sum-mod), elements (perm), pairs (recall), corpus/vocab (text)."""
    if length is not None and not 1 <= length <= MAX_LENGTH:
        raise ForethoughtError(f"--length must lie in 1..{MAX_LENGTH:,}, got {length}")
    if name == "parity":
        return RunningSum(2, length or 32)
    if name == "sum-mod":
        return RunningSum(options.get("modulus", 5), length or 32)
    if name == "perm":
        return PermutationComposition(options.get("elements", 3), length or 32)
    if name == "repeat":
        return RepeatedBlock(length or 24)
    if name == "recall":
        return AssociativeRecall(
            options.get("pairs", 4), options.get("keys", 8), options.get("values", 8), options.get("queries", 0)
        )
    if name == "text":
        return build_text_task(
            options.get("corpus", "stdlib"),
            options.get("vocab", 1024),
            length or 64,
            options.get("train_tokens", 400_000),
            cache_dir=options.get("cache_dir"),
        )
    raise ForethoughtError(f"unknown task {name!r} (one of {', '.join(TASKS)})")

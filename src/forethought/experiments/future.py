"""Future Lens: how far ahead do hidden states see?  (extraction driver; the probes live in `probes.py`)."""

from __future__ import annotations

from pathlib import Path

from forethought.data.corpus import Corpus, balanced_order, load_corpus, split_of
from forethought.data.store import ExtractResult, ExtractSettings, extract, shard_windows_for
from forethought.progress import Progress


def reading_order(lm, docs: Corpus, test_fraction: float, max_doc_tokens: int | None):
    """The tokenized documents in the order extraction reads them. The one definition: the Ray shard planner
    (`forethought.distributed.extract`) must cut the corpus exactly as `run_extract` does."""
    return balanced_order(docs, lm.tokenizer.encode, test_fraction, max_doc_tokens=max_doc_tokens or None)


def document_splits(docs: Corpus, test_fraction: float) -> list[int]:
    """Per corpus document: 0 train (validation included), 1 test."""
    return [0 if split_of(d.doc_id, test_fraction) == "train" else 1 for d in docs.documents]


def run_extract(
    lm,
    corpus: str | Corpus,
    out: str | Path,
    layers: list[int],
    tokens: int,
    window: int = 256,
    batch: int = 8,
    float16: bool = False,
    test_fraction: float = 0.1,
    shard_mb: float = 256.0,
    max_doc_tokens: int | None = 2048,
    progress: Progress | None = None,
    after_shard=None,
    shard_runner=None,
) -> ExtractResult:
    """Tokenize `corpus`, pack windows, and store `layers`' resid_post (plus the final layer) for a LoadedModel."""
    c = lm.config
    stored = sorted(set(layers) | {c.n_layers - 1})
    dtype = "float16" if float16 else "float32"
    settings = ExtractSettings(
        layers=tuple(stored),
        tokens=tokens,
        window=window,
        batch=batch,
        dtype=dtype,
        test_fraction=test_fraction,
        shard_windows=shard_windows_for(len(stored), c.d_model, window, batch, dtype, shard_mb),
        separator_id=lm.tokenizer.eos_id,
        max_doc_tokens=max_doc_tokens or None,
    )
    docs = load_corpus(corpus) if isinstance(corpus, str) else corpus
    doc_ids = [d.doc_id for d in docs.documents]
    tok = lm.tokenizer
    return extract(
        lm.model,
        reading_order(lm, docs, test_fraction, max_doc_tokens),
        document_splits(docs, test_fraction),
        doc_ids,
        out,
        settings,
        model_info={"name": lm.name, "file": Path(lm.path).name, "source": lm.source, "config": c.to_dict()},
        tokenizer_info={"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id, "add_bos": False},
        corpus_info=docs.describe(),
        progress=progress,
        after_shard=after_shard,
        shard_runner=shard_runner,
    )

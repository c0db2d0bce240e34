"""The activation store: residual streams of many windows of a corpus, written as safetensors shards.

Layout of a store folder:
  manifest.json            model, tokenizer, corpus, settings, and every completed shard (name, sha256, counts)
  shard-00000.safetensors  `blocks.{l}.resid_post` [n_tokens, d] per stored layer (float32 or float16),
                           `token_ids`, `doc_ids`, `greedy_ids` (the model's own argmax next token at each
                           position), `next_logprob` (the model's log-prob of the actual next token; NaN at a
                           window's last position) [n_tokens], and `window_ids`, `split` [n_windows]
A shard is written to a temporary name, fsynced and atomically renamed, and only then recorded in the manifest
(itself replaced atomically), so a crash at any instant leaves complete shards that are recorded, at most one
complete shard that is not (rewritten identically on resume, the windows being deterministic), and temporary
files (deleted on resume). A half-written shard is never counted. Resuming with other settings is refused.

The model's greedy ids and next-token log-probs are kept instead of full logits (49152 floats per token): they
are all the baselines and the agreement measure need, at 8 bytes a token.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer
from forethought.paths import atomic_write_bytes, output_dir
from forethought.progress import Progress, tell
from forethought.trace import act_name, run_with_trace

MANIFEST = "manifest.json"
FORMAT = "forethought-activation-store/1"
SPLITS = ("train", "test")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides the bytes of the store; a resume must match it exactly."""

    layers: tuple[int, ...]  # stored layers; the final layer is always among them (the Future Lens target)
    tokens: int  # tokens to extract (train + test), rounded up to whole windows
    window: int = 256
    batch: int = 8
    dtype: str = "float32"
    test_fraction: float = 0.1
    shard_windows: int = 32
    separator_id: int | None = None  # appended after each document when packing (the model's EOS)
    max_doc_tokens: int | None = 2048  # a document's first tokens only, so no single huge file dominates

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def shard_windows_for(n_layers: int, d_model: int, window: int, batch: int, dtype: str, cap_mb: float) -> int:
    """Windows per shard so a shard (and the buffer building it) stays under `cap_mb`; a multiple of the batch."""
    bytes_per_window = n_layers * d_model * window * STORE_DTYPES[dtype].itemsize
    fit = int(cap_mb * 2**20 // bytes_per_window)
    return max(batch, fit // batch * batch)


@dataclass
class Window:
    tokens: list[int]
    doc_ids: list[int]
    split: int  # index into SPLITS


def pack_windows(
    token_docs: Iterable[tuple[int, list[int]]],
    doc_split: Callable[[int], int],
    window: int,
    separator: int | None,
    max_doc_tokens: int | None = None,
) -> Iterator[Window]:
    """Concatenate each split's documents (separator after each) and cut fixed-length windows.

    Train and test documents go to separate streams, so no window mixes the two sides of the split. No BOS is
    added: this model family is trained and run without one. Documents are cut to `max_doc_tokens`: the
    standard library has single files of 100k+ tokens that would otherwise fill a run on their own.
    """
    buffers: dict[int, tuple[list[int], list[int]]] = {0: ([], []), 1: ([], [])}
    for doc, ids in token_docs:
        split = doc_split(doc)
        tokens, docs = buffers[split]
        if max_doc_tokens:
            ids = ids[:max_doc_tokens]
        tail = ids + ([separator] if separator is not None else [])
        tokens.extend(tail)
        docs.extend([doc] * len(tail))
        while len(tokens) >= window:
            yield Window(tokens[:window], docs[:window], split)
            del tokens[:window], docs[:window]


@dataclass
class ExtractResult:
    out: Path
    shards: int
    shards_skipped: int  # already complete from an earlier run
    tokens: int
    tokens_by_split: dict[str, int]
    seconds: float
    tokens_per_second: float  # over the shards computed in this run
    manifest: dict = field(repr=False, default_factory=dict)


def _atomic_write(path: Path, data: bytes) -> None:
    """Whole or not at all; a full or read-only disk is one line naming the file (forethought.paths)."""
    atomic_write_bytes(path, data, "--out")


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_manifest(out: Path) -> dict | None:
    """The store's manifest, validated (a hand-edited or damaged one is a clean error naming the file)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ForethoughtError(f"{path}: unreadable manifest ({str(e)[:200]})") from None
    check_manifest(manifest, path)
    return manifest


_SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest: object, path: Path) -> None:
    """Types, ranges and internal consistency of a manifest, before any of it sizes an allocation or names a file.

    Token counts must follow from the shards (windows x window), and each shard's recorded byte size must hold
    that many activations, so an absurd `n_tokens` cannot reach `torch.empty`: file sizes are checked on open.
    """

    def bad(what: str) -> ForethoughtError:
        return ForethoughtError(f"{path}: invalid manifest: {what}")

    def integer(value: object, what: str, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**53:
            raise bad(f"{what} must be an integer >= {low}, got {str(value)[:40]!r}")
        return value

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("format", "model", "tokenizer", "corpus", "settings", "shards") if k not in manifest]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ForethoughtError(f"{path}: unknown store format {str(manifest['format'])[:60]!r}")
    if not isinstance(manifest["model"], dict) or not isinstance(manifest["model"].get("name"), str):
        raise bad("model must be an object with a name")
    settings = manifest["settings"]
    if not isinstance(settings, dict):
        raise bad("settings must be an object")
    for key in ("tokens", "window", "batch", "shard_windows"):
        integer(settings.get(key), f"settings.{key}", 1)
    layers = settings.get("layers")
    if not isinstance(layers, list) or not layers:
        raise bad("settings.layers must be a non-empty list")
    for layer in layers:
        integer(layer, "settings.layers[]")
    if settings.get("dtype") not in STORE_DTYPES:
        raise bad(f"settings.dtype must be one of {', '.join(STORE_DTYPES)}, got {str(settings.get('dtype'))[:20]!r}")
    d_model = integer(manifest.get("d_model", 1), "d_model", 1)
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("shards must be a list")
    per_token = len(layers) * d_model * STORE_DTYPES[settings["dtype"]].itemsize
    names = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise bad(f"shards[{i}] must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in names:
            raise bad(f"shards[{i}].name {str(name)[:40]!r} is not a new shard-NNNNN.safetensors")
        names.add(name)
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"shards[{i}].sha256 is not a sha256 hex digest")
        windows = integer(entry.get("windows"), f"shards[{i}].windows", 1)
        integer(entry.get("first_window"), f"shards[{i}].first_window")
        tokens = integer(entry.get("tokens"), f"shards[{i}].tokens", 1)
        if tokens != windows * settings["window"]:
            raise bad(f"shards[{i}].tokens = {tokens} is not windows x window")
        if integer(entry.get("bytes"), f"shards[{i}].bytes", 1) < tokens * per_token:
            raise bad(f"shards[{i}].bytes is too small for {tokens} tokens")
        by_split = entry.get("tokens_by_split")
        if (
            not isinstance(by_split, dict)
            or sum(integer(by_split.get(s), f"shards[{i}].{s}") for s in SPLITS) != tokens
        ):
            raise bad(f"shards[{i}].tokens_by_split does not add up to its tokens")
    if manifest.get("complete") is True:
        total = sum(entry["tokens"] for entry in shards)
        if integer(manifest.get("n_tokens"), "n_tokens", 1) != total:
            raise bad(f"n_tokens = {manifest['n_tokens']} but the shards hold {total}")
    documents = manifest.get("documents", [])
    if not isinstance(documents, list) or not all(
        isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d) for d in documents
    ):
        raise bad("documents must be a list of [id, split] pairs")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(path: Path, entry: dict) -> None:
    """The shard's size and sha256 against its manifest entry (a flipped byte is caught, not read as data)."""
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise ForethoughtError(f"{path} is missing or has another size than the manifest records; extract again")
    if _sha256_file(path) != entry["sha256"]:
        raise ForethoughtError(f"{path}: checksum mismatch (the file changed after extraction); extract again")


def _fingerprint(manifest: dict) -> dict:
    # Through JSON, so a fresh manifest compares as its stored copy would (tuples such as Gemma's
    # sliding_layers come back as lists).
    fingerprint = json.loads(
        json.dumps({k: manifest[k] for k in ("format", "model", "tokenizer", "corpus", "settings")})
    )
    # Where the model was loaded from (a path that may move, a field older stores lack) is not what they hold.
    fingerprint["model"].pop("source", None)
    return fingerprint


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and prefix == "model.config.":
            # A config field added after the store was written (Gemma's softcap, local RoPE base, ...): the model
            # that wrote it could not have had the feature, and the fields it did record still have to match.
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the store, {b!r} now")
    return diffs


def extract(
    model: Transformer,
    token_docs: Iterable[tuple[int, list[int]]],
    doc_splits: list[int],
    doc_ids: list[str],
    out: str | Path,
    settings: ExtractSettings,
    model_info: dict,
    tokenizer_info: dict,
    corpus_info: dict,
    progress: Progress | None = None,
    after_shard: Callable[[int, Path], None] | None = None,
    shard_runner: ShardRunner | None = None,
) -> ExtractResult:
    """Run the model over packed windows of `token_docs` and write the store at `out` (resuming if it exists).

    `after_shard(index, path)` runs after a shard is renamed into place and before the manifest records it:
    the most delicate instant for a crash, which is why tests hook it. `shard_runner(index, first_window,
    windows, settings)` returns a shard's bytes computed elsewhere (Ray workers: `forethought.distributed`);
    this function stays the one writer of shards and manifest either way.
    """
    out = Path(out)
    started = time.perf_counter()
    c = model.config
    if settings.window > c.context_length:
        raise ForethoughtError(f"--window {settings.window} exceeds the model's context length {c.context_length}")
    bad = [layer for layer in settings.layers if not 0 <= layer < c.n_layers]
    if bad:
        raise ForethoughtError(f"layers {bad} do not exist (the model has layers 0..{c.n_layers - 1})")
    if settings.tokens < 1 or settings.window < 2 or settings.batch < 1:
        raise ForethoughtError("--tokens and --batch must be positive and --window at least 2")
    n_windows_wanted = -(-settings.tokens // settings.window)
    manifest = {
        "format": FORMAT,
        "model": model_info,
        "tokenizer": tokenizer_info,
        "corpus": corpus_info,
        "settings": settings.to_dict(),
        "d_model": c.d_model,
        "shards": [],
        "complete": False,
    }
    manifest = _open_store(out, manifest)
    done = {s["name"]: s for s in manifest["shards"]}

    windows = pack_windows(
        token_docs, doc_splits.__getitem__, settings.window, settings.separator_id, settings.max_doc_tokens
    )
    shard_index, window_index = 0, 0
    computed_tokens, compute_seconds, skipped = 0, 0.0, 0
    max_doc = -1
    total = n_windows_wanted * settings.window
    tell(progress, 0, total)
    while window_index < n_windows_wanted:
        take = min(settings.shard_windows, n_windows_wanted - window_index)
        group = []
        for w in windows:
            group.append(w)
            if len(group) == take:
                break
        if not group:
            break
        max_doc = max(max_doc, max(max(w.doc_ids) for w in group))
        name = _shard_name(shard_index)
        if name in done:
            skipped += 1
        else:
            t0 = time.perf_counter()
            if shard_runner is None:
                data = shard_bytes(model, group, settings, window_index)
            else:
                data = shard_runner(shard_index, window_index, group, settings)
            _atomic_write(out / name, data)
            if after_shard is not None:
                after_shard(shard_index, out / name)
            manifest["shards"].append(_shard_entry(name, data, group, settings, window_index))
            manifest["documents"] = [[doc_ids[i], SPLITS[doc_splits[i]]] for i in range(max_doc + 1)]
            _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
            compute_seconds += time.perf_counter() - t0
            computed_tokens += len(group) * settings.window
        window_index += len(group)
        shard_index += 1
        tell(progress, window_index * settings.window, total)
    if window_index == 0:
        raise ForethoughtError(
            f"the corpus is shorter than one window of {settings.window} tokens; use a smaller --window"
        )
    manifest["complete"] = True
    manifest["n_shards"] = len(manifest["shards"])
    manifest["n_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["tokens_by_split"] = {s: sum(e["tokens_by_split"][s] for e in manifest["shards"]) for s in SPLITS}
    manifest["exhausted"] = window_index < n_windows_wanted  # the corpus ran out before --tokens
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return ExtractResult(
        out=out,
        shards=manifest["n_shards"],
        shards_skipped=skipped,
        tokens=manifest["n_tokens"],
        tokens_by_split=manifest["tokens_by_split"],
        seconds=time.perf_counter() - started,
        tokens_per_second=computed_tokens / compute_seconds if compute_seconds else 0.0,
        manifest=manifest,
    )


@torch.inference_mode()
def _run_shard(
    model: Transformer, group: list[Window], names: list[str], batch: int, store_dtype: torch.dtype, first_window: int
) -> dict[str, torch.Tensor]:
    tokens = torch.tensor([w.tokens for w in group], dtype=torch.long)
    n, T = tokens.shape
    acts = {name: [] for name in names}
    greedy, next_lp = [], []
    for i in range(0, n, batch):
        chunk = tokens[i : i + batch]
        logits, trace = run_with_trace(model, chunk, names, to_cpu=True)
        for name in names:
            act = trace.tensors[name].reshape(-1, model.config.d_model).to(store_dtype)
            if store_dtype == torch.float16 and not torch.isfinite(act).all():
                raise ForethoughtError(f"{name} overflows float16 storage; extract without --float16")
            acts[name].append(act)
        logits = logits.float()
        greedy.append(logits.argmax(-1).cpu())
        # log p(actual next token) without materializing a second [B, T, V] tensor
        chosen = logits[:, :-1].gather(-1, chunk[:, 1:, None].to(logits.device))[..., 0]
        lp = torch.full(chunk.shape, float("nan"))
        lp[:, :-1] = (chosen - torch.logsumexp(logits[:, :-1], dim=-1)).cpu()
        next_lp.append(lp)
    tensors = {name: torch.cat(parts).contiguous() for name, parts in acts.items()}
    tensors["token_ids"] = tokens.reshape(-1).to(torch.int32)
    tensors["doc_ids"] = torch.tensor([w.doc_ids for w in group], dtype=torch.int32).reshape(-1)
    tensors["greedy_ids"] = torch.cat(greedy).reshape(-1).to(torch.int32)
    tensors["next_logprob"] = torch.cat(next_lp).reshape(-1).float()
    tensors["window_ids"] = torch.arange(first_window, first_window + n, dtype=torch.int32)
    tensors["split"] = torch.tensor([w.split for w in group], dtype=torch.uint8)
    return tensors


def _open_store(out: Path, manifest: dict) -> dict:
    """The manifest to extend: the one already at `out` when its settings match (a resume; every recorded shard
    verified), else `manifest`, written at once into an empty folder. A mismatch is the user's error."""
    output_dir(out, "--out")
    old = read_manifest(out)
    if old is not None:
        diffs = _differences(_fingerprint(old), _fingerprint(manifest))
        if diffs:
            raise ForethoughtError(
                f"{out} already holds a store made with other settings ({'; '.join(diffs[:3])}); "
                "use another --out or delete it"
            )
        manifest = old
    else:
        nonempty = [p for p in out.iterdir() if not p.name.endswith(".tmp")]
        if any(p.name.startswith("shard-") for p in nonempty):
            raise ForethoughtError(f"{out} holds shards but no manifest; use an empty folder")
        # Recorded before the first shard exists: a kill right after that shard's rename must leave a store that
        # resumes (found by killing extract at 20 random points), not a folder with a shard and no manifest.
        _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    for stray in out.glob("*.tmp"):
        stray.unlink()
    for shard in manifest["shards"]:  # a resume builds on these shards: each must be the one recorded
        verify_shard(out / shard["name"], shard)
    return manifest


def _shard_entry(name: str, data: bytes, group: list, settings: ExtractSettings, first_window: int) -> dict:
    """A shard's manifest record: its hash and size, and which windows and tokens (per split) it holds."""
    return {
        "name": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "windows": len(group),
        "first_window": first_window,
        "tokens": len(group) * settings.window,
        "tokens_by_split": {s: sum(settings.window for w in group if w.split == i) for i, s in enumerate(SPLITS)},
    }


def shard_bytes(model: Transformer, group: list[Window], settings: ExtractSettings, first_window: int) -> bytes:
    """One shard's file contents: the same bytes whichever process computes them (the unit of distributed work)."""
    names = [act_name(layer, "resid_post") for layer in settings.layers]
    tensors = _run_shard(model, group, names, settings.batch, STORE_DTYPES[settings.dtype], first_window)
    return _serialize(tensors)


# Computes shard `index` (its first window, its windows) elsewhere and returns shard_bytes' result.
ShardRunner = Callable[[int, int, list[Window], ExtractSettings], bytes]


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": FORMAT})


class ActivationStore:
    """Read side of a completed store: per-token arrays across shards, and one layer at a time."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        """`verify`: check each shard's sha256 the first time it is read (one extra pass over bytes that are
        read anyway); only a caller that has just verified the store should turn it off."""
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise ForethoughtError(f"{self.path} is not an activation store (no {MANIFEST}); run forethought extract")
        if not manifest.get("complete"):
            raise ForethoughtError(f"{self.path}: extraction did not finish; rerun the same extract command to resume")
        self.manifest = manifest
        self.settings = manifest["settings"]
        self.layers: list[int] = list(self.settings["layers"])
        self.window: int = self.settings["window"]
        self.d_model: int = manifest["d_model"]
        self.n_tokens: int = manifest["n_tokens"]
        self.shard_paths = [self.path / s["name"] for s in manifest["shards"]]
        self._unverified = set(self.shard_paths) if verify else set()
        for p, entry in zip(self.shard_paths, manifest["shards"]):
            if not p.is_file() or p.stat().st_size != entry["bytes"]:
                raise ForethoughtError(f"{p} is missing or has another size than the manifest records")

    def _read(self, p: Path, key: str) -> torch.Tensor:
        """One tensor of one shard, the shard verified first; a damaged file is one error naming it."""
        from safetensors import SafetensorError, safe_open

        if p in self._unverified:
            verify_shard(p, self.manifest["shards"][self.shard_paths.index(p)])
            self._unverified.discard(p)
        try:
            with safe_open(str(p), framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise ForethoughtError(f"{p}: unreadable shard ({str(e)[:160]})") from None

    @property
    def documents(self) -> list[list[str]]:
        return self.manifest.get("documents", [])

    def array(self, key: str) -> torch.Tensor:
        """A per-token (or per-window) array over the whole store, e.g. token_ids, greedy_ids, split."""
        return torch.cat([self._read(p, key) for p in self.shard_paths])

    def layer(self, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`blocks.{layer}.resid_post` for every stored token, [n_tokens, d_model]."""
        if layer not in self.layers:
            raise ForethoughtError(f"layer {layer} is not in the store (stored: {self.layers})")
        out = torch.empty(self.n_tokens, self.d_model, dtype=dtype)  # bounded: check_manifest ties it to the files
        row = 0
        for p, entry in zip(self.shard_paths, self.manifest["shards"]):
            t = self._read(p, act_name(layer, "resid_post"))
            if tuple(t.shape) != (entry["tokens"], self.d_model):
                raise ForethoughtError(f"{p}: layer {layer} has shape {tuple(t.shape)}, the manifest implies another")
            out[row : row + t.shape[0]] = t
            row += t.shape[0]
        return out

    def verify(self) -> None:
        """Check every shard against the sha256 in the manifest."""
        for entry, p in zip(self.manifest["shards"], self.shard_paths, strict=True):
            verify_shard(p, entry)
            self._unverified.discard(p)

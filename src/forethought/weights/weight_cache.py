"""A built model's float32 weights kept in the user cache, so a model loads in seconds the second time.

Dequantising a 1.5B K-quant GGUF and laying its matrices out for the engine takes tens of seconds; reading
back the result takes a few. The entry is a plain safetensors file named by the source file's sha256
(`<cache>/weights/<sha256>.safetensors`) holding the model's own state dict (weights already fused and
transposed, nothing left to do but assign them), with metadata that says what it was made from: a format
tag, the source sha256, the model config, and a CRC-32 per tensor.

An entry is used only after every tensor's bytes matched their CRC and the config matched the one read
from the GGUF header again; anything else (a truncated or flipped file, an older layout, a config read
differently) makes `load` delete it and return None, and the caller rebuilds it from the GGUF. Writes go
to a temporary name renamed into place, so a crash never leaves a half entry under the real name.
The entry is memory-mapped copy-on-write: its pages are the model's weights, without a copy (see `_read_verified`).
Checking runs in two threads (zlib's crc32 releases the GIL).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from forethought.model.config import ModelConfig
from forethought.model.layers import Linear
from forethought.model.transformer import Transformer
from forethought.weights.assemble import cache_root

FORMAT = "forethought-weights-1"
THREADS = 2
_DTYPES = {torch.float32: "F32"}


def entry_path(sha256: str) -> Path:
    return cache_root() / "weights" / f"{sha256}.safetensors"


def _config_json(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def save(sha256: str, model: Transformer) -> Path | None:
    """Write the model's float32 weights as the entry for `sha256`; None (and no entry) when the disk is
    too full or the model is not float32 (the cache never stores a rounded copy)."""
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if any(t.dtype not in _DTYPES or t.device.type != "cpu" for t in state.values()):
        return None
    header: dict = {}
    offset = 0
    crcs = {}
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    path = entry_path(sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < offset * 1.1 + (1 << 30):  # leave a gigabyte to everyone else
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            for name, t in state.items():
                crcs[name] = zlib.crc32(_bytes(t))
            meta = {"format": FORMAT, "source_sha256": sha256, "config": _config_json(model.config)}
            header["__metadata__"] = meta | {"crc32": json.dumps(crcs)}
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
            f.write(struct.pack("<Q", len(raw)) + raw)
            for t in state.values():
                f.write(_bytes(t))
        os.replace(tmp, path)
    except OSError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(sha256: str, config: ModelConfig, device: str = "cpu", int8: bool = False) -> Transformer | None:
    """The cached float32 model for `sha256` and `config`, or None when there is no usable entry (a bad
    one is deleted so that the caller's rebuild replaces it).

    `int8` returns it with every weight matrix quantized (`Transformer.quantize_int8_`), and without the
    float32 copy: each matrix's pages of the map leave the process once it is checked and quantized, so
    the process holds the int8 matrices, the embedding rows it reads and little else -- not the whole
    float32 file it was made from (which it did, as resident pages of the map, before issue 23)."""
    path = entry_path(sha256)
    if not path.is_file():
        return None
    verified = _read_verified(path, sha256, config, release=int8 and device == "cpu")
    if verified is None:
        path.unlink(missing_ok=True)
        return None
    state, release = verified
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.init_rope()
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError:  # the engine's parameter set changed since the entry was written
        path.unlink(missing_ok=True)
        return None
    if int8:
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.quantize_int8_()
                release(f"{name}.weight_t")  # its float32 pages were read once more, to quantize them
        model.forget_decode_step()
    return model.requires_grad_(False).eval()


def _read_verified(
    path: Path, sha256: str, config: ModelConfig, release: bool = False
) -> tuple[dict[str, torch.Tensor], Callable[[str], None]] | None:
    """The entry's tensors (views of a private map of the file), every one's CRC checked, and a function
    that takes a tensor's pages out of the process by name -- a no-op unless `release`, which also takes
    every tensor's pages out once its CRC is checked."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 << 20):
                return None
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__")
        if (meta.get("format"), meta.get("source_sha256"), meta.get("config")) != (
            FORMAT,
            sha256,
            _config_json(config),
        ):
            return None
        crcs = json.loads(meta["crc32"])
        start = 8 + n
        end = max((h["data_offsets"][1] for h in header.values()), default=0)
        if start + end != size or set(crcs) != set(header):
            return None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None

    # A private (copy-on-write) map: the weights stay file-backed page cache, shared by every process that
    # loads the model and reclaimable under memory pressure (a 7 GB float32 1.5B model counts as ~0 of a
    # process's anonymous memory), and a write to a weight copies that page instead of reaching the file.
    try:
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    view = memoryview(mapped)

    def drop(name: str) -> None:
        """MADV_DONTNEED over the tensor's pages: they leave this process's resident set (the page cache
        keeps them), and a later read maps the file's bytes back in -- the same bytes, since the map is
        private and nothing has written to it yet. A page shared with a neighbouring tensor is dropped too;
        the neighbour faults it back in when it is read."""
        if not release or name not in header:
            return
        a, b = header[name]["data_offsets"]
        first = (start + a) // mmap.PAGESIZE * mmap.PAGESIZE
        if start + b > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, start + b - first)

    def read(item: tuple[str, dict]) -> tuple[str, torch.Tensor | None]:
        name, h = item
        a, b = h["data_offsets"]
        count = math.prod(h["shape"])
        if (
            h.get("dtype") != "F32"
            or b - a != 4 * count
            or a % 4
            or zlib.crc32(view[start + a : start + b]) != crcs[name]
        ):
            return name, None
        drop(name)
        if count == 0:
            return name, torch.empty(h["shape"], dtype=torch.float32)
        return name, torch.frombuffer(mapped, dtype=torch.float32, count=count, offset=start + a).view(h["shape"])

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            out = dict(pool.map(read, header.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        view.release()
    if any(t is None for t in out.values()):
        return None
    return out, drop


def _bytes(t: torch.Tensor) -> memoryview:
    """A tensor's storage as writable bytes, without a copy."""
    return memoryview(t.numpy()).cast("B")

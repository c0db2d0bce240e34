"""A small, strict reader for the GGUF container: metadata, tensor index, and raw tensor bytes.

The `gguf` package's reader builds a numpy view for every element of every metadata array, which
takes ~6 s for a 49k-token vocabulary; reading the header with `struct` takes milliseconds. We still
use `gguf` for what it is best at: the quantization formats (block sizes and dequantization).
Every way a file can be damaged ends in a ForethoughtError that names the file and the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forethought.errors import ForethoughtError
from forethought.weights import validate

MAGIC = b"GGUF"
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_NUMPY = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF lists the innermost dimension first)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buf = buffer
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ForethoughtError(f"{self.path} is truncated: its header ends at byte {len(self.buf)}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise ForethoughtError(f"{self.path} has a string that is not UTF-8 at byte {self.pos}") from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in one tight loop: vocabularies and merges hold 150k+ of them (0.9 s -> 0.2 s)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                n = length(buf, pos)[0]
                pos += 8
                if pos + n > end:
                    break
                out.append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise ForethoughtError(f"{self.path} has a string that is not UTF-8 at byte {pos}") from None
        self.pos = pos
        if len(out) < count:
            raise ForethoughtError(f"{self.path} is truncated: its header ends at byte {end}")
        return out

    def value(self, type_id: int, depth: int = 0):
        if depth > 4:  # arrays of arrays nest this deep at most in real files; a crafted one would recurse
            raise ForethoughtError(f"{self.path}: metadata arrays nested too deeply at byte {self.pos}")
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id])
        if type_id == STRING:
            return self.string()
        if type_id == ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            # Every item takes at least this many bytes: a huge count fails here, not after a long loop.
            least = {STRING: 8, ARRAY: 12}.get(item_type) or struct.calcsize(_SCALARS.get(item_type, "<B"))
            if count * least > len(self.buf) - self.pos:
                raise ForethoughtError(f"{self.path} is truncated: an array of {count} items at byte {self.pos}")
            if item_type in _NUMPY:  # numeric arrays in one read
                dtype = np.dtype(_NUMPY[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if item_type == STRING:
                return self.strings(count)
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise ForethoughtError(f"{self.path} has an unknown metadata type {type_id} at byte {self.pos}")


class GGUFFile:
    """Metadata (`fields`) and tensor index (`tensors`) of a GGUF file; tensor bytes on demand."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ForethoughtError(f"{self.path}: cannot read ({e})") from None
        cur = _Cursor(memoryview(self.data), self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise ForethoughtError(f"{self.path} is not a GGUF file (its first bytes are not 'GGUF')")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise ForethoughtError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > 1_000_000 or n_fields > 1_000_000:
            raise ForethoughtError(f"{self.path} has an implausible header ({n_tensors} tensors, {n_fields} keys)")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = cur.string()
            if key in self.fields:
                raise ForethoughtError(f"{self.path}: metadata key {key} appears twice")
            self.fields[key] = cur.value(cur.scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > validate.MAX_DIMS:  # before the loop: a flipped byte here would mean 2^32 reads
                raise ForethoughtError(f"{self.path}: tensor {name} has {n_dims} dimensions (at most 4)")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            raw.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = validate.alignment(self.fields.get("general.alignment", 32), self.path)
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: list[TensorInfo] = []
        for name, dims, type_id, offset in raw:
            try:
                kind = GGMLQuantizationType(type_id)
            except ValueError:
                raise ForethoughtError(f"{self.path}: tensor {name} has unknown type id {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[kind]
            count = validate.tensor_dims(name, dims, self.path)
            if dims[0] % block:  # a block never straddles two rows
                raise ForethoughtError(f"{self.path}: tensor {name}: rows of {dims[0]}, not whole {kind.name} blocks")
            info = TensorInfo(name, tuple(reversed(dims)), type_id, data_start + offset, count // block * type_size)
            if info.offset + info.nbytes > len(self.data):
                raise ForethoughtError(
                    f"{self.path} is truncated: tensor {name} needs bytes up to {info.offset + info.nbytes}, "
                    f"the file has {len(self.data)}"
                )
            self.tensors.append(info)
        validate.tensor_extents(((t.name, t.offset, t.nbytes) for t in self.tensors), len(self.data), self.path)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def raw_bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes shaped [rows..., bytes per row], as `gguf.quants.dequantize` expects."""
        flat = self.data[info.offset : info.offset + info.nbytes]
        rows = info.shape[:-1] if len(info.shape) > 1 else ()
        return flat.reshape(*rows, -1)

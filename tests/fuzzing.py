"""A seeded fuzzer the tests own: mutates real GGUF headers and HF model folders and runs each case through the CLI.

Every case runs in a forked child (the parent has already imported torch, so a case costs milliseconds to
start) with an address-space limit, a wall-clock limit and its own peak-memory reading, and must end in one of:
  error   exit code 2 and exactly one stderr line starting with `error:`
  loaded  exit code 0, and the loaded model's logits on a short prompt are all finite
Anything else is a defect: traceback (an exception escaping the CLI, or exit 2 without a clean line), hang
(past the time limit), crash (killed by a signal), over-budget (peak memory above the budget), nonfinite.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFECTS = ("traceback", "hang", "crash", "over-budget", "nonfinite", "silent", "late", "refused", "half-written")


def fuzz_cases(default: int) -> int:
    """Cases per corpus: `default` in CI, more with FORETHOUGHT_FUZZ_CASES=N."""
    return int(os.environ.get("FORETHOUGHT_FUZZ_CASES", default))


# --- running one case in a child ------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _child(argv: list[str], prompt: str, setup=None, check=None) -> dict:
    """Runs in the forked child: the CLI on argv, stdout/stderr captured, then the logits check (and `check`,
    a function of stdout returning "" when the output is right, else what is wrong)."""
    import torch

    import forethought.cli as cli
    import forethought.weights as weights

    torch.set_num_threads(1)
    # Warnings print to stderr as they would for a user (pytest records them instead): a stray numpy warning
    # above the `error:` line breaks the one-line promise and must count as a defect.
    warnings.resetwarnings()
    warnings.simplefilter("default")
    warnings.showwarning = warnings._showwarning_orig
    kept = {}
    original_load = weights.load_model

    def keep(*args, **kwargs):
        kept["lm"] = original_load(*args, **kwargs)
        return kept["lm"]

    weights.load_model = keep  # every command loads through commands.common.load, which looks this up per call
    if setup is not None:
        setup()
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        rc = cli.main(argv)
    except BaseException:  # noqa: BLE001 - escaping the CLI at all is the defect we look for
        return {"rc": None, "stderr": traceback.format_exc()[-3000:]}
    result = {"rc": rc, "stderr": err.getvalue()[-3000:], "model_loaded": "lm" in kept}
    if rc == 0 and check is not None:
        try:
            result["check"] = check(out.getvalue())
        except Exception:  # noqa: BLE001 - a check that cannot read the output is a wrong output
            result["check"] = "check failed: " + traceback.format_exc(limit=1)[-300:]
    if rc == 0 and "lm" not in kept:
        result["finite"] = True  # a command that loads no model through the CLI (report, extract on Ray)
    if rc == 0 and "lm" in kept:
        lm = kept["lm"]
        ids = lm.tokenizer.encode(prompt)[: lm.config.context_length] or [0]
        with torch.inference_mode():
            logits = lm.model(torch.tensor([ids]))
        result["finite"] = bool(torch.isfinite(logits).all())
    return result


@dataclass
class Outcome:
    kind: str  # error | loaded | traceback | hang | crash | over-budget | nonfinite
    detail: str = ""
    seconds: float = 0.0
    peak_bytes: int = 0  # growth of the resident set over the case
    model_loaded: bool = False  # whether the CLI loaded a model before it ended (a flag error must come first)
    check: str = ""  # what `check` found wrong with a clean exit's output


def run_case(
    argv: list[str],
    time_limit: float,
    address_limit: int,
    prompt: str = "Once upon a time",
    setup=None,
    check=None,
) -> Outcome:
    """The CLI on `argv` in a forked child, classified (peak memory is judged by the caller). `setup` runs in
    the child first (a file-size limit, say); `check(stdout)` judges a clean exit's output."""
    import forethought.cli

    forethought.cli._register_commands()  # imported once here, not in every child
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            try:  # reset the resident-set high-water mark so VmHWM measures this case alone
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            base_rss = _status_kb("VmRSS") * 1024
            vm = _status_kb("VmSize") * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + address_limit, vm + address_limit))
            result = _child(argv, prompt, setup, check)
            result["peak"] = max(0, _status_kb("VmHWM") * 1024 - base_rss)
            os.write(write_end, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, deadline, timed_out = [], started + time_limit, False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end], [], [], left)
        if not ready:
            continue
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read_end)
    seconds = time.perf_counter() - started
    if timed_out:
        return Outcome("hang", f"past {time_limit:.0f} s", seconds)
    if os.WIFSIGNALED(status) or not chunks:
        return Outcome("crash", f"child status {status}", seconds)
    result = json.loads(b"".join(chunks))
    peak = result.get("peak", 0)
    lines = result["stderr"].strip().splitlines()
    loaded = bool(result.get("model_loaded"))
    if result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return Outcome("error", lines[0], seconds, peak, loaded)
    if result["rc"] == 0 and result.get("finite") is True:
        return Outcome("loaded", "", seconds, peak, loaded, result.get("check") or "")
    if result["rc"] == 0 and result.get("finite") is False:
        return Outcome("nonfinite", "", seconds, peak)
    return Outcome("traceback", f"rc={result['rc']}: {result['stderr'][-600:]}", seconds, peak)


@dataclass
class Report:
    """Counts by outcome, with each defect's mutation for the failure message."""

    counts: Counter = field(default_factory=Counter)
    defects: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # every case, for FORETHOUGHT_FUZZ_VERBOSE
    max_peak_ratio: float = 0.0
    seconds: float = 0.0

    def add(self, label: str, outcome: Outcome, budget: int, expect: str = "any") -> None:
        """`expect`: any | error | early-error (before a model loads) | ok; a case that ends otherwise is a
        defect: silent (accepted what it must refuse, or a clean exit whose `check` failed), late, refused."""
        if outcome.kind in ("error", "loaded") and outcome.peak_bytes > budget:
            outcome = Outcome("over-budget", f"peak {outcome.peak_bytes / 2**20:.0f} MiB", outcome.seconds)
        elif outcome.kind == "loaded" and outcome.check:
            outcome = Outcome("silent", outcome.check, outcome.seconds)
        elif outcome.kind == "loaded" and expect in ("error", "early-error"):
            outcome = Outcome("silent", "exit 0 where an error was due", outcome.seconds)
        elif outcome.kind == "error" and expect == "early-error" and outcome.model_loaded:
            outcome = Outcome("late", f"after the model loaded: {outcome.detail}", outcome.seconds)
        elif outcome.kind == "error" and expect == "ok":
            outcome = Outcome("refused", outcome.detail, outcome.seconds)
        self.counts[outcome.kind] += 1
        self.seconds += outcome.seconds
        self.max_peak_ratio = max(self.max_peak_ratio, outcome.peak_bytes / max(budget, 1))
        self.lines.append(f"{label}: {outcome.kind} {outcome.detail[:160]} ({outcome.seconds:.1f} s)")
        log = os.environ.get("FORETHOUGHT_FUZZ_LOG")  # one line per case as it ends, for long runs
        if log:
            with open(log, "a") as f:
                f.write(self.lines[-1] + "\n")
        if outcome.kind in DEFECTS:
            self.defects.append(f"{label}: {outcome.kind} {outcome.detail}")

    def summary(self) -> str:
        counts = ", ".join(
            f"{k} {self.counts[k]}"
            for k in ("error", "loaded", *DEFECTS)
            if self.counts[k] or k in ("error", "loaded", "traceback", "hang", "silent")
        )
        return f"{sum(self.counts.values())} cases: {counts}; peak <= {self.max_peak_ratio:.2f} of the budget"


def generate_argv(model_path: Path) -> list[str]:
    return ["generate", "-m", str(model_path), "-n", "1", "-t", "0", "--json", "Once upon a time"]


# --- GGUF: a test-owned parser and writer of the header, so mutations can keep or break its structure ----------

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class KV:
    key: bytes
    type_id: int
    payload: bytes  # the value's encoding, exactly as in the file


@dataclass
class TensorEntry:
    name: bytes
    dims: list[int]
    type_id: int
    offset: int


@dataclass
class GGUFHeader:
    version: int
    kvs: list[KV]
    tensors: list[TensorEntry]
    data: bytes  # the tensor data section (after alignment padding)
    n_tensors: int | None = None  # overrides of the counts, to lie about them
    n_kvs: int | None = None
    alignment: int = 32  # what the writer pads to (not necessarily what the header declares)

    def to_bytes(self) -> bytes:
        out = [
            b"GGUF",
            struct.pack("<IQQ", self.version, _or(self.n_tensors, len(self.tensors)), _or(self.n_kvs, len(self.kvs))),
        ]
        for kv in self.kvs:
            out += [struct.pack("<Q", len(kv.key)), kv.key, struct.pack("<I", kv.type_id), kv.payload]
        for t in self.tensors:
            out += [struct.pack("<Q", len(t.name)), t.name, struct.pack("<I", len(t.dims))]
            out += [struct.pack("<Q", d % 2**64) for d in t.dims]
            out.append(struct.pack("<IQ", t.type_id % 2**32, t.offset % 2**64))
        header = b"".join(out)
        pad = -len(header) % self.alignment
        return header + b"\0" * pad + self.data


def _or(value: int | None, default: int) -> int:
    return default if value is None else value % 2**64


def _skip_value(buf: bytes, pos: int, type_id: int) -> int:
    if type_id in _FMT:
        return pos + struct.calcsize(_FMT[type_id])
    if type_id == STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _FMT:
        return pos + count * struct.calcsize(_FMT[item])
    for _ in range(count):
        pos = _skip_value(buf, pos, item)
    return pos


def parse_gguf(path: Path) -> GGUFHeader:
    buf = path.read_bytes()
    version, n_tensors, n_kvs = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs = 24, []
    for _ in range(n_kvs):
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + n]
        (type_id,) = struct.unpack_from("<I", buf, pos + 8 + n)
        start = pos + 12 + n
        pos = _skip_value(buf, start, type_id)
        kvs.append(KV(key, type_id, buf[start:pos]))
    tensors = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append(TensorEntry(name, dims, type_id, offset))
    data_start = -(-pos // 32) * 32
    return GGUFHeader(version, kvs, tensors, buf[data_start:])


def _encode(type_id: int, value) -> bytes:
    if type_id in _FMT:
        fmt = _FMT[type_id]
        if fmt in ("<f", "<d"):  # through numpy, so 1e300 as float32 becomes inf instead of an OverflowError
            with np.errstate(over="ignore"):
                return np.array(value, dtype=fmt).tobytes()
        bits = struct.calcsize(fmt) * 8
        if type_id == 7:
            return struct.pack("<B", int(value) % 256)
        return struct.pack(fmt.upper() if fmt[1].islower() else fmt, int(value) % 2**bits)
    if type_id == STRING:
        data = value if isinstance(value, bytes) else str(value).encode()
        return struct.pack("<Q", len(data)) + data
    raise ValueError(type_id)


HUGE_INTS = (0, 1, -1, 2, 3, 7, 2**31 - 1, 2**32 - 1, 2**40, 10**6, 10**8, 2**63 - 1, 2**64 - 1)
ODD_FLOATS = (0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 1e38, 1e300)
TENSOR_TYPES = (0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 30, 34, 35, 39, 9999)


def _kv_index(h: GGUFHeader, key: str) -> int | None:
    return next((i for i, kv in enumerate(h.kvs) if kv.key == key.encode()), None)


def mutate_gguf(h: GGUFHeader, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a parsed real GGUF: (a label saying what was done, the mutated file's bytes)."""
    import copy

    h = copy.copy(h)
    h.kvs = [copy.copy(kv) for kv in h.kvs]
    h.tensors = [copy.copy(t) for t in h.tensors]
    kind = rng.choice(
        ("truncate", "flip", "scalar", "type_swap", "dim", "tensor_type", "offset", "duplicate", "count",
         "string_len", "array_count", "insert", "float", "delete")
    )  # fmt: skip
    if kind == "truncate":
        full = h.to_bytes()
        header_len = len(full) - len(h.data)
        cut = rng.choice((rng.randrange(0, header_len), rng.randrange(header_len, len(full))))
        return f"truncate at byte {cut}", full[:cut]
    if kind == "flip":
        full = bytearray(h.to_bytes())
        header_len = len(full) - len(h.data)
        at = rng.randrange(0, header_len)
        full[at] ^= rng.randrange(1, 256)
        return f"flip byte {at}", bytes(full)
    if kind in ("scalar", "float"):
        numeric = [
            i for i, kv in enumerate(h.kvs) if kv.type_id in _FMT and (kv.type_id in (6, 12)) == (kind == "float")
        ]
        i = rng.choice(numeric)
        value = rng.choice(ODD_FLOATS if kind == "float" else HUGE_INTS)
        h.kvs[i].payload = _encode(h.kvs[i].type_id, value)
        return f"{h.kvs[i].key.decode()} = {value}", h.to_bytes()
    if kind == "type_swap":
        i = rng.randrange(len(h.kvs))
        new = rng.choice([t for t in range(13) if t != h.kvs[i].type_id])
        old, h.kvs[i].type_id = h.kvs[i].type_id, new
        return f"{h.kvs[i].key.decode()} type {old} -> {new}", h.to_bytes()
    if kind == "insert":  # a key the real file lacks (general.alignment above all), or a second copy of one it has
        key, type_id, value = rng.choice(
            [
                ("general.alignment", 4, rng.choice((0, 1, 3, 16, 64, 2**31, 2**32 - 1))),
                ("general.alignment", 5, rng.choice((-1, -32))),
                ("general.alignment", STRING, "32"),
                ("llama.attention.key_length", 4, rng.choice((0, 1, 63, 128, 2**32 - 1))),
                ("llama.rope.freq_base", STRING, "10000"),
                ("llama.context_length", 4, 8192),
            ]
        )
        h.kvs.append(KV(key.encode(), type_id, _encode(type_id, value)))
        return f"insert {key} = {value!r} (type {type_id})", h.to_bytes()
    if kind == "delete":
        i = rng.randrange(len(h.kvs))
        key = h.kvs.pop(i).key.decode()
        return f"delete {key}", h.to_bytes()
    if kind == "dim":
        t = rng.choice(h.tensors)
        j = rng.randrange(len(t.dims))
        t.dims = list(t.dims)
        t.dims[j] = rng.choice((0, 1, 2**32, 2**40, 2**62, 2**64 - 1, t.dims[j] * 2, t.dims[j] + 32))
        if rng.random() < 0.2:
            t.dims = t.dims + [rng.choice((0, 1, 2**63))]
        return f"{t.name.decode()} dims {t.dims}", h.to_bytes()
    if kind == "tensor_type":
        t = rng.choice(h.tensors)
        old, t.type_id = t.type_id, rng.choice(TENSOR_TYPES)
        return f"{t.name.decode()} type {old} -> {t.type_id}", h.to_bytes()
    if kind == "offset":
        t = rng.choice(h.tensors)
        other = rng.choice(h.tensors)
        t.offset = rng.choice(
            (len(h.data), len(h.data) - 1, 2**63, 2**64 - 1, other.offset, t.offset + 1, t.offset - 32)
        )
        return f"{t.name.decode()} offset {t.offset}", h.to_bytes()
    if kind == "duplicate":
        if rng.random() < 0.5:  # a tensor renamed to another tensor's name
            a, b = rng.sample(range(len(h.tensors)), 2)
            h.tensors[a].name = h.tensors[b].name
            return f"tensor {a} renamed {h.tensors[b].name.decode()}", h.to_bytes()
        a = rng.randrange(len(h.kvs))
        h.kvs.append(copy.copy(h.kvs[a]))
        return f"key {h.kvs[a].key.decode()} twice", h.to_bytes()
    if kind == "count":
        which = rng.choice(("n_tensors", "n_kvs"))
        real = len(h.tensors) if which == "n_tensors" else len(h.kvs)
        setattr(h, which, rng.choice((0, real - 1, real + 1, 2**32, 2**63, 2**64 - 1)))
        return f"{which} = {getattr(h, which)}", h.to_bytes()
    if kind == "string_len":
        strings = [i for i, kv in enumerate(h.kvs) if kv.type_id == STRING]
        i = rng.choice(strings)
        n = rng.choice((0, 2**32, 2**63, 2**64 - 1, len(h.kvs[i].payload) + 100))
        h.kvs[i].payload = struct.pack("<Q", n % 2**64) + h.kvs[i].payload[8:]
        return f"{h.kvs[i].key.decode()} string length {n}", h.to_bytes()
    # array_count
    arrays = [i for i, kv in enumerate(h.kvs) if kv.type_id == ARRAY]
    i = rng.choice(arrays)
    n = rng.choice((0, 1, 2**31, 2**40, 2**63, 2**64 - 1))
    payload = h.kvs[i].payload
    h.kvs[i].payload = payload[:4] + struct.pack("<Q", n % 2**64) + payload[12:]
    return f"{h.kvs[i].key.decode()} array count {n}", h.to_bytes()


# --- HF folders ---------------------------------------------------------------------------------------------

ODD_JSON = (
    "0", "-1", "1.5", "1e9", "1e10", "1000000", "10000000000", "2147483648", "NaN", "Infinity", "-Infinity",
    '"abc"', '"64"', "[]", "{}", "null", "true", "[64]", "1" * 5000, "[" * 100_000 + "]" * 100_000,
)  # fmt: skip
GENERATION_EOS = (
    '{"eos_token_id": "2"}', '{"eos_token_id": ["2", "3"]}', '{"eos_token_id": [true]}', '{"eos_token_id": 2.5}',
    '{"eos_token_id": [1.0, 2]}', '{"eos_token_id": -1}', '{"eos_token_id": []}', '{"eos_token_id": {"id": 2}}',
    '{"eos_token_id": 99999999}', '[1, 2]', '"text"', "{", '{"eos_token_id": 2}',
)  # fmt: skip
CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "hidden_act", "model_type", "eos_token_id", "attention_bias",
)  # fmt: skip


def mutate_hf(source: Path, target: Path, rng: random.Random) -> str:
    """Copy the tiny HF folder `source` to `target` with one random defect; returns what was done."""
    shutil.copytree(source, target)
    config_path = target / "config.json"
    weights = target / "model.safetensors"
    kind = rng.choice(("value", "value", "value", "delete", "config_file", "safetensors", "transpose",
                       "second_shard", "tokenizer", "chat_template", "generation_config"))  # fmt: skip
    if kind == "value":
        key, text = rng.choice(CONFIG_KEYS), rng.choice(ODD_JSON)
        config = json.loads(config_path.read_text())
        marker = "__FUZZ__"
        config[key] = marker
        config_path.write_text(json.dumps(config).replace(f'"{marker}"', text))
        return f"config {key} = {text[:20]}"
    if kind == "delete":
        config = json.loads(config_path.read_text())
        key = rng.choice(sorted(config))
        del config[key]
        config_path.write_text(json.dumps(config))
        return f"config without {key}"
    if kind == "config_file":
        text = config_path.read_bytes()
        choice = rng.choice(("list", "empty", "bytes", "truncate", "nested"))
        new = {
            "list": b"[1, 2]",
            "empty": b"{}",
            "bytes": b'{"model_type": "\xff\xfe"}',
            "truncate": text[: rng.randrange(len(text))],
            "nested": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        }[choice]
        config_path.write_bytes(new)
        return f"config.json {choice}"
    if kind == "safetensors":
        data = bytearray(weights.read_bytes())
        (header_len,) = struct.unpack_from("<Q", data, 0)
        choice = rng.choice(("truncate", "flip", "header_len", "dtype", "offsets", "duplicate"))
        if choice == "truncate":
            data = data[: rng.randrange(len(data))]
        elif choice == "flip":
            data[rng.randrange(8, 8 + header_len)] ^= rng.randrange(1, 256)
        elif choice == "header_len":
            data[:8] = struct.pack("<Q", rng.choice((0, 2**60, header_len + 1, 2**64 - 1)))
        else:
            header = json.loads(bytes(data[8 : 8 + header_len]))
            name = rng.choice([k for k in header if k != "__metadata__"])
            if choice == "dtype":
                header[name]["dtype"] = rng.choice(("F16", "I8", "BOOL", "F64", "U8"))
            elif choice == "offsets":
                end = header[name]["data_offsets"][1]
                header[name]["data_offsets"] = [end, end + rng.choice((4, 2**40))]
            text = json.dumps(header)
            if choice == "duplicate":  # the same name twice in the header object
                first = name
                text = text[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}"
            encoded = text.encode()
            encoded += b" " * (-len(encoded) % 8)
            data = bytearray(struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + header_len :]))
        weights.write_bytes(bytes(data))
        return f"model.safetensors {choice}"
    if kind in ("transpose", "second_shard"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        names = [n for n, t in tensors.items() if t.ndim == 2 and t.shape[0] != t.shape[1]]
        if kind == "transpose":
            name = rng.choice(names)
            tensors[name] = tensors[name].t().contiguous()
            save_file(tensors, str(weights))
            return f"{name} transposed"
        name = rng.choice(sorted(tensors))
        import torch

        save_file({name: torch.zeros(3, 5)}, str(target / "model-extra.safetensors"))
        return f"second shard overrides {name}"
    if kind == "tokenizer":
        path = target / "tokenizer.json"
        text = path.read_bytes()
        path.write_bytes(text[: rng.randrange(len(text))] if rng.random() < 0.5 else b"[]")
        return "tokenizer.json broken"
    if kind == "generation_config":  # HF's own file, read for the stop token: a string id was a TypeError
        value = rng.choice(GENERATION_EOS)
        (target / "generation_config.json").write_text(value)
        return f"generation_config.json {value[:40]}"
    path = target / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["chat_template"] = rng.choice((42, ["a"], "{% if %}", "{{ raise_exception('no') }}", "{{ 1/0 }}"))
    path.write_text(json.dumps(settings))
    return f"chat_template {settings['chat_template']!r}"


# --- issue 25's surfaces: draft-head files, speculative flags, the report cache, output paths, --ray ----------


@dataclass
class Case:
    """One hostile command line: what it must end in, and (for the parent, after it ran) what it left behind."""

    label: str
    argv: list[str]
    expect: str = "error"  # any | error | early-error | ok
    setup: object = None  # run in the child before the CLI
    check: object = None  # check(stdout) -> "" or what is wrong, for a clean exit
    after: object = None  # after() -> "" or what was left half-written, in the parent
    time_limit: float = 60.0


def speculative_argv(model: Path, heads: Path | None, kind: str = "heads", *extra: str) -> list[str]:
    argv = ["generate", "-m", str(model), "-n", "6", "-t", "0", "--json", "--speculative", kind]
    return argv + (["--heads", str(heads)] if heads is not None else []) + list(extra) + ["Once upon a time"]


def _reseal(tensors: dict, meta: dict) -> dict:
    """Metadata with the sha256 recomputed: the mutation is then caught by a check of its own, not the hash."""
    from forethought.model.heads import payload_sha256

    return meta | {"sha256": payload_sha256(tensors, meta)}


def mutate_heads(source: Path, target: Path, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """Copy the intact heads file `source` to `target` with one defect; (label, expected outcome)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = source.read_bytes()
    kind = kind or rng.choice(HEADS_MUTATIONS)
    if kind == "flip":
        at = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[at] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(flipped))
        return f"heads: flip byte {at}", "error" if _heads_content_changed(source, target) else "any"
    if kind == "truncate":
        cut = rng.randrange(len(data))
        target.write_bytes(data[:cut])
        return f"heads: truncated at {cut} of {len(data)}", "error"
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    w, vocab = tensors["w"], tensors["vocab"]
    d, reseal = w.shape[1], True
    if kind == "k0":
        tensors["w"] = w[:0]
    elif kind == "k16":
        tensors["w"] = w[:1].expand(16, d, d).contiguous()
    elif kind == "vocab_float":
        tensors["vocab"] = vocab.float()
    elif kind == "vocab_zero":
        tensors["vocab"] = torch.zeros_like(vocab)
    elif kind == "vocab_repeat":
        tensors["vocab"] = torch.cat([vocab[:2], vocab[:1]])
    elif kind == "vocab_negative":
        tensors["vocab"] = vocab.clone()
        tensors["vocab"][0] = -1
    elif kind == "vocab_range":
        tensors["vocab"] = vocab.clone()
        tensors["vocab"][-1] = 10**6
    elif kind == "vocab_empty":
        tensors["vocab"] = vocab[:0]
    elif kind == "vocab_2d":
        tensors["vocab"] = vocab[: len(vocab) // 2 * 2].reshape(2, -1)
    elif kind == "w_int8":
        tensors["w"] = (w.float() * 100).round().clamp(-127, 127).to(torch.int8)
    elif kind == "w_bool":
        tensors["w"] = w != 0
    elif kind == "w_nan":
        tensors["w"] = w.clone()
        tensors["w"][0, 0, 0] = float(rng.choice(("nan", "inf", "-inf")))
    elif kind == "w_shape":
        tensors["w"] = w[:, :, : d - 1].contiguous()
    elif kind == "junk_tensor":
        tensors["junk"] = torch.randn(3)
    elif kind == "no_vocab":
        del tensors["vocab"]
    elif kind == "meta_layer":
        meta["layer"] = rng.choice(("0", "-1", "x", "1e9"))
    elif kind == "meta_d_model":
        meta["d_model"] = str(int(meta["d_model"]) + 1)
    elif kind == "meta_format":
        meta["format"] = "forethought-draft-heads/0"
    elif kind == "meta_training":
        meta["training"] = rng.choice(("[1, 2]", "{", "null"))
    elif kind == "meta_fingerprint":
        meta["model_fingerprint"] = rng.choice(("[]", '"abc"', "[1, 2, 3]", "{", json.dumps([0.5] * 128)))
    elif kind == "no_fingerprint":
        del meta["model_fingerprint"]
    elif kind == "no_sha256":
        del meta["sha256"]
        reseal = False
    elif kind == "meta_digit":  # a changed digit in the provenance, the hash left as it was
        meta["training"] = meta["training"].replace("0", "1", 1) if "0" in meta["training"] else meta["training"] + " "
        reseal = False
    elif kind == "sha_other":
        meta["sha256"] = "0" * 64
        reseal = False
    else:
        raise ValueError(kind)
    if reseal:
        meta = _reseal(tensors, meta)
    save_file(tensors, str(target), metadata=meta)
    return f"heads: {kind}" + ("" if reseal else " (hash kept)"), "error"


HEADS_MUTATIONS = (
    "flip", "flip", "flip", "truncate", "k0", "k16", "vocab_float", "vocab_zero", "vocab_repeat", "vocab_negative",
    "vocab_range", "vocab_empty", "vocab_2d", "w_int8", "w_bool", "w_nan", "w_shape", "junk_tensor", "no_vocab",
    "meta_layer", "meta_d_model", "meta_format", "meta_training", "meta_fingerprint", "no_fingerprint", "no_sha256",
    "meta_digit", "sha_other",
)  # fmt: skip


def _heads_content_changed(source: Path, target: Path) -> bool:
    """Whether a byte flip changed what the file says (a flip inside the header's JSON whitespace may not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(source), "pt") as a, safe_open(str(target), "pt") as b:
            if a.metadata() != b.metadata() or sorted(a.keys()) != sorted(b.keys()):
                return True
            return any(
                a.get_tensor(n).dtype != b.get_tensor(n).dtype or not a.get_tensor(n).equal(b.get_tensor(n))
                for n in a.keys()  # noqa: SIM118
            )
    except Exception:  # noqa: BLE001 - unreadable: changed
        return True


def speculative_flag_cases(model: Path, heads: Path, folder: Path) -> list[Case]:
    """Flags that must fail before the model loads, and the valid ones beside them that must run."""
    missing = folder / "nowhere.safetensors"
    g = ["generate", "-m", str(model), "-n", "4", "-t", "0"]
    cases = [
        Case(f"--draft-len {n}", speculative_argv(model, None, "lookup", "--draft-len", n), "early-error")
        for n in ("0", "-1", "-5", "16", str(10**12), str(2**70))
    ]
    cases += [
        Case(f"--speculative {k!r}", speculative_argv(model, None, k), "early-error")
        for k in ("bogus", "", "HEADS", "lookup ", "heads,lookup")
    ]
    cases += [
        Case("--heads without --speculative", [*g, "--heads", str(heads), "hi"], "early-error"),
        Case("--draft-len without --speculative", [*g, "--draft-len", "3", "hi"], "early-error"),
        Case("--heads with lookup", speculative_argv(model, heads, "lookup"), "early-error"),
        Case("--heads a folder", speculative_argv(model, folder), "early-error"),
        Case("--heads missing", speculative_argv(model, missing), "early-error"),
        Case("--speculative with --no-cache", speculative_argv(model, None, "lookup", "--no-cache"), "early-error"),
        Case("--draft-len abc", speculative_argv(model, None, "lookup", "--draft-len", "abc"), "early-error"),
        Case("--speculative heads without shipped heads", speculative_argv(model, None, "heads"), "error"),
        Case("control: lookup --draft-len 1", speculative_argv(model, None, "lookup", "--draft-len", "1"), "ok"),
        Case("control: lookup --draft-len 15", speculative_argv(model, None, "lookup", "--draft-len", "15"), "ok"),
        Case("control: heads file", speculative_argv(model, heads), "ok"),
        Case("control: auto with heads file", speculative_argv(model, heads, "auto", "--draft-len", "2"), "ok"),
    ]
    return cases


# report cache -----------------------------------------------------------------------------------------------


def report_argv(model: Path, corpus: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["report", "--model", str(model), "--corpus", str(corpus), "--cache", str(cache), "--out", str(out),
            "--sections", "invariance,state_size", "--json", *extra]  # fmt: skip


def report_numbers(stdout: str) -> dict:
    printed = json.loads(stdout)
    return {s["key"]: (s["status"], s.get("cached"), s.get("numbers")) for s in printed["sections"]}


def mutate_cache_entry(cache: Path, rng: random.Random) -> str:
    """One defect in one cached section of the report cache (finding.json, a figure, the hashes)."""
    folders = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    folder = rng.choice(folders)
    finding = folder / "finding.json"
    kind = rng.choice(("digit", "digit", "truncate", "figure_cut", "figure_gone", "hashes_gone", "hashes_junk",
                       "finding_gone", "verdict", "empty", "model_description"))  # fmt: skip
    if kind == "digit":  # one digit of a number changed: the page would show it
        text = finding.read_text()
        spots = [i for i, ch in enumerate(text) if ch.isdigit()]
        i = rng.choice(spots)
        text = text[:i] + str((int(text[i]) + rng.randrange(1, 10)) % 10) + text[i + 1 :]
        finding.write_text(text)
    elif kind == "truncate":
        data = finding.read_bytes()
        finding.write_bytes(data[: rng.randrange(len(data))])
    elif kind in ("figure_cut", "figure_gone"):
        pngs = sorted(folder.glob("*.png"))
        if not pngs:
            return mutate_cache_entry(cache, rng)
        png = rng.choice(pngs)
        if kind == "figure_gone":
            png.unlink()
        else:
            png.write_bytes(png.read_bytes()[: rng.randrange(png.stat().st_size)])
    elif kind == "hashes_gone":
        (folder / "sha256.json").unlink()
    elif kind == "hashes_junk":
        (folder / "sha256.json").write_text(rng.choice(("[]", "{", '{"finding.json": 5}', "{}")))
    elif kind == "finding_gone":
        finding.unlink()
    elif kind == "verdict":
        saved = json.loads(finding.read_text())
        saved["verdict"] = "Something else entirely."
        finding.write_text(json.dumps(saved))
    elif kind == "empty":
        finding.write_text("")
    else:  # the model's cached description: n_params shown on the page
        described = next(cache.glob("model-*.json"))
        text = described.read_text()
        spots = [i for i, ch in enumerate(text) if ch.isdigit()]
        i = rng.choice(spots)
        described.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])
        return "report cache: model description digit"
    return f"report cache: {folder.name.split('-')[0]} {kind}"


def recomputed_check(original: dict):
    """A damaged entry must come back recomputed (not cached), with the original numbers."""

    def check(stdout: str) -> str:
        now = report_numbers(stdout)
        for key, (status, _, numbers) in ((k, v) for k, v in original.items() if k != "_n_params"):
            got = now.get(key)
            if got is None or got[0] != status or got[2] != numbers:
                return f"{key}: shown {got} instead of {numbers}"
        meta = json.loads(stdout)["meta"]["model"].get("description", {})
        if "n_params" in meta and meta["n_params"] != original.get("_n_params", meta["n_params"]):
            return f"model description shows n_params {meta['n_params']}"
        return ""

    return check


_META = b'{"meta": {"model": {"name": "x"}, "mode": "quick", "started": "t"}, "sections": '
COMPARE_GARBAGE = (
    b"[]", b"{}", b'{"meta": 1}', b'{"meta": {"model": {"name": 5}}, "sections": []}', _META + b"{}}",
    _META + b'[{"key": 1}]}', _META + b'[{"key": "a", "numbers": [1]}]}',
    _META + b'[{"key": "a", "numbers": {"n": {}}}]}', _META + b"[1]}", b"\xff\xfe not json", b"",
)  # fmt: skip
RESULTS_GARBAGE = (
    "{", "[]", '{"verdict": 5}', '{"verdict": "v", "numbers": [1, 2]}', '{"verdict": "v", "numbers": {"a": {}}}',
    '{"verdict": "v", "intervals": {"a": [2, 1]}}', '{"verdict": "v", "intervals": {"a": "x"}}',
    '{"verdict": "v", "figures": [{"file": "missing.png", "caption": "c", "command": "c"}]}',
    '{"verdict": "v", "figures": [{"file": "../x.png", "caption": "c", "command": "c"}]}',
    '{"verdict": "v", "figures": ["a"]}', '{"verdict": "v", "commands": "c"}', '{"verdict": "v", "data": []}',
)  # fmt: skip


# output paths -----------------------------------------------------------------------------------------------


def limit_file_size(limit: int):
    """A child's writes beyond `limit` bytes fail with EFBIG, as a full disk would (no root needed)."""

    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem holding `folder` but for about `leave` bytes."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / ".filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def absent(*paths: Path):
    """After a failed write: none of `paths` may exist (no half file a rerun would take as complete)."""

    def after() -> str:
        there = [str(p) for p in paths if p.exists()]
        left = [str(q) for p in paths if p.parent.is_dir() for q in p.parent.glob(f".{p.name}.*.tmp")]
        return f"left behind: {there + left}" if there or left else ""

    return after


def store_not_complete(out: Path):
    def after() -> str:
        manifest = out / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
            return f"{out} reads as a complete store after a failed write"
        return ""

    return after

"""forethought's CPU kernels (csrc/cpu_kernels.cpp), compiled on first use.

Two things are in the extension: `matvec`, a batch-1 product that streams a weight matrix at close to
copy speed (torch's MKL path reads ~15 GB/s on two EPYC cores, a plain copy ~22+), and `DecodeStep`,
which runs one whole decode token of a Llama-family model in one call, so a step pays for its weight
reads and almost nothing else (op by op, ~20 small ATen calls per block cost ~14 ms per step here).
`DecodeStep.forward_many` takes up to MAX_TOKENS tokens at once and reads every weight once for all of
them: how speculative decoding verifies drafted tokens at about the price of one step. It takes its
weights by name, and `announce_fallback` says once on stderr when the compiled path is not used.

The extension is built with the local C++ compiler the first time it is needed (~40 s, once; cached
under ~/.cache/forethought/kernels/, keyed by everything that changes the build: `build_key_parts`). Anything that goes
wrong -- no compiler, no ninja, a failed build, FORETHOUGHT_KERNELS=0 -- leaves `module()` returning
None, and callers fall back to torch. Import never fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

_SOURCE_FILE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" once built, or "error" once it failed


def cache_dir() -> Path:
    return Path(os.environ.get("FORETHOUGHT_CACHE", Path.home() / ".cache" / "forethought")) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


# What the compiler is told; part of the cache key, since other flags make a different library.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _compiler() -> str:
    """The C++ compiler torch's extension builder runs ($CXX or c++) and its version line."""
    cxx = os.environ.get("CXX", "c++")
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        version = (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""
    except (OSError, subprocess.SubprocessError):
        version = "unavailable"
    return f"{cxx}: {version}"


def build_key_parts() -> dict[str, str]:
    """Everything that changes the built library. Two environments that differ in any of these (another
    torch install beside this one, another compiler) get their own cache folders instead of rebuilding
    one folder in turn -- which is what a key of source + torch version alone did (issue 23)."""
    return {
        # torch's builder rebuilds when the source's path changes, so two checkouts of one version share nothing
        "source": f"{hashlib.sha256(_SOURCE_FILE.read_bytes()).hexdigest()} at {_SOURCE_FILE.resolve()}",
        "torch": f"{torch.__version__} at {Path(torch.__file__).resolve().parent}",
        "python": f"{sys.version} at {sys.executable}",
        "compiler": _compiler(),
        "flags": " ".join(CFLAGS) + " | " + " ".join(LDFLAGS),
        # -march=native bakes in the build machine's instructions: a home directory shared between
        # machines must never load a library the CPU cannot run.
        "cpu": _cpu_flags(),
    }


def build_key(parts: dict[str, str] | None = None) -> str:
    parts = build_key_parts() if parts is None else parts
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(parts.items())).encode()).hexdigest()[:16]


STALE_LOCK_SECONDS = 15 * 60  # a build takes ~40 s idle and a few minutes under heavy load


def _clear_stale_lock(lock: Path) -> None:
    """torch's builder waits for ever on the lock file a build killed mid-compile leaves behind: one older than
    any build could take is such a leftover, so it goes (every later process would hang on it otherwise)."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            print(f"forethought: removed a stale kernel build lock ({lock})", file=sys.stderr, flush=True)
    except OSError:  # no lock, or another process removed it first
        pass


def _build():
    from torch.utils.cpp_extension import load

    key = build_key()
    folder = cache_dir() / key
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder / "lock")
    if not (folder / f"forethought_kernels_{key}.so").exists():
        # Its own line on stderr (a spinner or streamed text may be on the current one); callers time
        # the build apart from prefill by calling `module()` before they start the clock.
        print(f"\nforethought: compiling CPU kernels once (~40 s), cached in {folder}", file=sys.stderr, flush=True)
    return load(
        name=f"forethought_kernels_{key}",
        sources=[str(_SOURCE_FILE)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(folder),
        verbose=False,
    )


def module():
    """The compiled extension, or None when it is disabled or cannot be built (then torch is used)."""
    if "module" in _state:
        return _state["module"]
    if "error" in _state:
        return None
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        if os.environ.get("FORETHOUGHT_KERNELS", "1") == "0":
            # An escape hatch for oversubscribed machines: when other processes hold the cores, the
            # per-call 2-thread barrier can make a step several times slower than torch.mm.
            _state["error"] = "disabled by FORETHOUGHT_KERNELS=0"
            return None
        try:
            _state["module"] = _build()
        except Exception as exc:  # noqa: BLE001 -- any build failure means "use torch", never a crash
            _state["error"] = f"{type(exc).__name__}: {exc}"
            print(f"forethought: fast CPU kernels unavailable, using torch ({_state['error'][:200]})", file=sys.stderr)
            _state["announced"] = True  # said once, here
            return None
    return _state["module"]


def available() -> bool:
    return module() is not None


def status() -> str:
    """'compiled', 'not built yet', or why the kernels are not used."""
    if "module" in _state:
        return "compiled"
    return str(_state.get("error", "not built yet"))


_NONE = torch.empty(0)  # what the extension takes for "no scale" / "no bias"


def matvec(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x [in] or [T, in] (T <= MAX_TOKENS) @ weight_t [in, out] (* scale) (+ bias) -> [out] or [T, out] in x's
    dtype, the weights read once for all T rows and each row computed exactly as alone; None without the kernels.

    weight_t is float32, bfloat16, or int8 (packed, see layers.pack_int8) with its float16 `scale`.
    """
    mod = module()
    if mod is None:
        return None
    return mod.matvec(x, weight_t, _NONE if scale is None else scale, _NONE if bias is None else bias)


MAX_TOKENS = 16  # the most tokens one DecodeStep call takes (kMaxTokens in the C++)

# Weight names of one product (Linear) in the compiled step: weight, scale (int8), bias.
LINEAR_FIELDS = ("weight", "scale", "bias")


def decode_step(
    model_weights: dict[str, torch.Tensor | None],
    layer_weights: list[dict[str, torch.Tensor | None]],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    eps: float,
):
    """A compiled step over these weights, by name (see DecodeStep in the C++), or None without the kernels.

    `model_weights`: embed, final_norm, unembed.{weight,scale,bias}, rope_cos, rope_sin; each of
    `layer_weights`: attn_norm, qkv.*, o.*, mlp_norm, gate_up.*, down.*. None means absent. A missing or
    unexpected name raises RuntimeError naming it.
    """
    mod = module()
    if mod is None:
        return None

    def filled(named: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        return {k: _NONE if t is None else t for k, t in named.items()}

    return mod.DecodeStep(filled(model_weights), [filled(w) for w in layer_weights], n_heads, n_kv_heads, head_dim, eps)


def announce_fallback(reason: str) -> None:
    """Say once per process, on stderr, that the compiled decode step is off and why (it costs ~30%)."""
    if _state.get("announced"):
        return
    _state["announced"] = True
    print(f"forethought: compiled decode step unavailable, decoding op by op ({reason[:200]})", file=sys.stderr)

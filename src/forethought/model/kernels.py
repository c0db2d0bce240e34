"""Batch-1 matrix-vector products for CPU decoding, compiled on first use.

A decode step multiplies one vector by every weight matrix, so it is bound by how fast the weights
stream from memory. Through MKL, `torch.mm([1, in], W[in, out])` reaches ~15 GB/s on two EPYC cores
while a plain copy reads ~22+ GB/s; the loop below reads each thread's half of the matrix as one
sequential stream (the access pattern hardware prefetchers like best) and gets close to the copy.

The extension is built with the local C++ compiler the first time a large enough batch-1 product
runs (~40 s, once; cached under ~/.cache/forethought/kernels/, keyed by source, torch version and CPU
flags). Anything that goes wrong -- no compiler, no ninja, a failed build, FORETHOUGHT_KERNELS=0 --
leaves `matvec()` returning None, and the caller falls back to torch. Import never fails.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>

// One SIMD vector of float32, whatever the widest the compiler was allowed (-march=native).
#if defined(__AVX512F__)
  #define VW 16
  typedef __m512 vf;
  static inline vf vzero() { return _mm512_setzero_ps(); }
  static inline vf vset(float a) { return _mm512_set1_ps(a); }
  static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
  static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  // bfloat16 is the top half of a float32: widen to 32 bits and shift left 16 (exact).
  static inline vf vload(const at::BFloat16* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  #define VW 8
  typedef __m256 vf;
  static inline vf vzero() { return _mm256_setzero_ps(); }
  static inline vf vset(float a) { return _mm256_set1_ps(a); }
  static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
  static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf vload(const at::BFloat16* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#else
  #error "forethought kernels need AVX2+FMA or AVX-512"
#endif

static inline float tofloat(float v) { return v; }
static inline float tofloat(at::BFloat16 v) { return static_cast<float>(v); }

// acc[j0:j1] += sum_{i in [i0,i1)} x[i] * W[i, j0:j1], W row-major [in, out] with row stride `out`.
// Four rows at a time: one load/store of the accumulator (in L1) per four weight vectors.
template <typename T>
static void rows_axpy(const T* W, const float* x, float* acc, int64_t out, int64_t i0, int64_t i1,
                      int64_t j0, int64_t j1) {
  const int64_t jv = j0 + (j1 - j0) / VW * VW;
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const T* w0 = W + i * out; const T* w1 = w0 + out; const T* w2 = w1 + out; const T* w3 = w2 + out;
    vf x0 = vset(x[i]), x1 = vset(x[i + 1]), x2 = vset(x[i + 2]), x3 = vset(x[i + 3]);
    int64_t j = j0;
    for (; j < jv; j += VW) {
      vf a = vload(acc + j);
      a = vfma(vload(w0 + j), x0, a);
      a = vfma(vload(w1 + j), x1, a);
      a = vfma(vload(w2 + j), x2, a);
      a = vfma(vload(w3 + j), x3, a);
      vstore(acc + j, a);
    }
    for (; j < j1; j++)
      acc[j] += tofloat(w0[j]) * x[i] + tofloat(w1[j]) * x[i + 1]
              + tofloat(w2[j]) * x[i + 2] + tofloat(w3[j]) * x[i + 3];
  }
  for (; i < i1; i++) {
    const T* w0 = W + i * out;
    vf x0 = vset(x[i]);
    int64_t j = j0;
    for (; j < jv; j += VW) vstore(acc + j, vfma(vload(w0 + j), x0, vload(acc + j)));
    for (; j < j1; j++) acc[j] += tofloat(w0[j]) * x[i];
  }
}

template <typename T>
static void matvec_impl(const T* W, const float* x, const float* bias, float* y, int64_t in, int64_t out) {
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64));
  if (in * out < (1 << 15)) nt = 1;
  const int64_t col_tile = 2048;  // floats of accumulator per pass: 8 KB, stays in L1
  if (out >= 4096 || nt == 1) {
    // Wide matrices (the unembedding): threads own disjoint column ranges, no reduction needed.
    int64_t per = ((out + nt - 1) / nt + VW - 1) / VW * VW;
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        int64_t a = std::min(out, t * per), b = std::min(out, a + per);
        for (int64_t j = a; j < b; j += col_tile) {
          int64_t e = std::min(b, j + col_tile);
          if (bias) std::copy(bias + j, bias + e, y + j); else std::fill(y + j, y + e, 0.f);
          rows_axpy(W, x, y, out, 0, in, j, e);
        }
      }
    });
    return;
  }
  // Narrow matrices: each thread streams a contiguous block of rows into its own partial sum.
  std::vector<float> part((size_t)nt * out, 0.f);
  int64_t per = (in + nt - 1) / nt;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      int64_t a = std::min(in, t * per), b = std::min(in, a + per);
      if (a < b) rows_axpy(W, x, part.data() + t * out, out, a, b, 0, out);
    }
  });
  for (int64_t j = 0; j < out; j++) {
    float s = bias ? bias[j] : 0.f;
    for (int64_t t = 0; t < nt; t++) s += part[t * out + j];
    y[j] = s;
  }
}

// y[out] = x[in] @ W[in, out] + bias, for W float32 or bfloat16; x and bias any float dtype.
torch::Tensor matvec(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous() && W.device().is_cpu(), "W must be a contiguous CPU matrix");
  const int64_t in = W.size(0), out = W.size(1);
  TORCH_CHECK(x.numel() == in, "x has ", x.numel(), " elements, W has ", in, " rows");
  auto xf = x.reshape({in}).to(torch::kFloat).contiguous();
  torch::Tensor bf;
  if (bias.has_value()) bf = bias->to(torch::kFloat).contiguous();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  auto y = torch::empty({out}, xf.options());
  if (W.scalar_type() == torch::kFloat)
    matvec_impl(W.data_ptr<float>(), xf.data_ptr<float>(), bp, y.data_ptr<float>(), in, out);
  else if (W.scalar_type() == torch::kBFloat16)
    matvec_impl(W.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), bp, y.data_ptr<float>(), in, out);
  else
    TORCH_CHECK(false, "W must be float32 or bfloat16");
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}
"""

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


def _build():
    from torch.utils.cpp_extension import load_inline

    # -march=native bakes in the build machine's instructions: key the cache on them too, so a home
    # directory shared between machines never loads a library the CPU cannot run.
    key = hashlib.sha256("|".join((_SOURCE, torch.__version__, sys.version, _cpu_flags())).encode()).hexdigest()[:16]
    folder = cache_dir() / key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"forethought_kernels_{key}.so").exists():
        print(f"forethought: compiling CPU kernels once (~40 s), cached in {folder}", file=sys.stderr)
    return load_inline(
        name=f"forethought_kernels_{key}",
        cpp_sources=[_SOURCE],
        functions=["matvec"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
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
            return None
    return _state["module"]


def available() -> bool:
    return module() is not None


def status() -> str:
    """'compiled', 'not built yet', or why the kernels are not used."""
    if "module" in _state:
        return "compiled"
    return str(_state.get("error", "not built yet"))


def matvec(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [in] @ weight_t [in, out] (+ bias) -> [out] in x's dtype; None when the kernels are unavailable."""
    mod = module()
    if mod is None:
        return None
    return mod.matvec(x, weight_t, bias)

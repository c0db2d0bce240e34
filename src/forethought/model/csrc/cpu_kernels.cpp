// forethought's CPU kernels: batch-1 matrix-vector products and a whole decode step (or the
// verification of a few drafted tokens, which reads the weights once, like one step).
//
// A decode step multiplies one vector by every weight matrix, so it is bound by how fast the weights
// stream from memory. Two things keep torch from that bound at batch 1: MKL's [1, in] x [in, out]
// product reads at ~15 GB/s on two EPYC cores where a plain copy reads ~22+, and the ~15 small ATen
// calls around each block's four products cost ~0.45 ms per block in dispatch and Python. Here the
// products stream each thread's share of a matrix as one sequential run (what hardware prefetchers
// like best), and `DecodeStep` runs the whole token -- every block, attention over the KV cache, the
// unembedding -- in one call, with every buffer allocated once.
//
// Float weights are stored [in, out] (row i holds input i's weights to every output), float32 or
// bfloat16. int8 weights have a float16 scale per 128 inputs of each output (64 or 32 where 128 does not
// divide the input size; llama.cpp's Q8_0 has one per 32) and a packed layout that `int8_block` below
// describes. Activations are float32, except
// that an int8 product rounds its input to 15 bits per group of 32 (error <= max|x| / 65278).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <vector>

// One SIMD vector of float32, the widest the compiler was allowed (-march=native).
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
// bfloat16 is the top half of a float32: widen to 32 bits and shift left 16 (exact).
static inline vf vload(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vload(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#else
#error "forethought kernels need AVX2+FMA or AVX-512"
#endif

static inline float tofloat(float v) { return v; }
static inline float tofloat(at::BFloat16 v) { return static_cast<float>(v); }

// ------------------------------------------------------------------------------ matrix-vector

// For each of nT inputs t: acc_t[j0:j1] += sum_{i in [i0,i1)} x_t[i] * W[i, j0:j1], W row-major [in, out]
// with row stride `out`; x_t = X + t * ldx, acc_t = ACC + t * ldacc.
//
// Every acc_t[j] is one chain of fused multiply-adds over the rows in one fixed order, whatever nT is, so
// T tokens at once give bit-for-bit the numbers of T single-token steps -- what keeps speculative greedy
// decoding token-identical. The blocking: 8 rows at a time (8 streams through the matrix, one accumulator
// load/store per 8 rows), and a register tile of up to 4 inputs x 4 vectors, so each weight vector loaded
// feeds up to 4 tokens' multiply-adds (a verification of T drafted tokens reads the weights once and costs
// little more than one step). The 8 rows are consecutive (`stride` 1) for wide matrices, whose rows are
// long runs; a narrow matrix's rows are short (896 floats on Qwen 0.5B), so 8 consecutive ones are 8
// streams that each end after 3.5 KB and the prefetchers never get going: there the 8 rows are one from
// each of 8 bands of the row range (`stride` = the band's length), 8 streams that each run the whole band.
//
// Code generation matters here (GCC 12, Zen 4, 2 threads, Qwen 1.5B): inlined into its caller, the tile's
// registers were spilled to the stack, and left to itself the compiler folds each weight load into every
// token's multiply-add, loading each weight vector TB times. Kept out of line, with the weight vectors
// pinned in registers, a 5-token verification fell from ~1.7 to ~1.3 steps' time (in-cache products ran
// ~2x faster at T >= 2). The multiply-adds and their order are unchanged.
template <typename T, int TB, int JB>
__attribute__((noinline)) static void axpy_tile(const T* W, const float* X, int64_t ldx, float* ACC,
                                                int64_t ldacc, int64_t out, int64_t i, int64_t rows, int64_t j,
                                                int64_t stride) {
  vf acc[TB][JB];
  for (int t = 0; t < TB; t++)
    for (int b = 0; b < JB; b++) acc[t][b] = vload(ACC + t * ldacc + j + b * VW);
  const T* w = W + i * out + j;
  const float* x = X + i;
  const int64_t w_step = stride * out;
#pragma GCC unroll 1
  for (int64_t r = 0; r < rows; r++, w += w_step, x += stride) {
    vf wv[JB];
    for (int b = 0; b < JB; b++) {
      wv[b] = vload(w + b * VW);
      if (TB > 1) asm("" : "+v"(wv[b]));  // a register the TB multiply-adds share, not TB loads
    }
    for (int t = 0; t < TB; t++) {
      const vf xb = vset(x[t * ldx]);
      for (int b = 0; b < JB; b++) acc[t][b] = vfma(wv[b], xb, acc[t][b]);
    }
  }
  for (int t = 0; t < TB; t++)
    for (int b = 0; b < JB; b++) vstore(ACC + t * ldacc + j + b * VW, acc[t][b]);
}

template <typename T, int JB>
static inline void axpy_tiles(const T* W, const float* X, int64_t ldx, float* ACC, int64_t ldacc, int64_t nT,
                              int64_t out, int64_t i, int64_t rows, int64_t j, int64_t stride) {
  for (int64_t t = 0; t < nT; t += 4) {
    const float* x = X + t * ldx;
    float* acc = ACC + t * ldacc;
    switch (std::min<int64_t>(4, nT - t)) {
      case 1: axpy_tile<T, 1, JB>(W, x, ldx, acc, ldacc, out, i, rows, j, stride); break;
      case 2: axpy_tile<T, 2, JB>(W, x, ldx, acc, ldacc, out, i, rows, j, stride); break;
      case 3: axpy_tile<T, 3, JB>(W, x, ldx, acc, ldacc, out, i, rows, j, stride); break;
      default: axpy_tile<T, 4, JB>(W, x, ldx, acc, ldacc, out, i, rows, j, stride); break;
    }
  }
}

// `banded`: the 8 rows of a block are i, i + band, ..., i + 7 band (band = a eighth of the rows); else
// i, i + 1, ..., i + 7.
template <typename T>
static void rows_axpy(const T* W, const float* X, int64_t ldx, float* ACC, int64_t ldacc, int64_t nT, int64_t out,
                      int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool banded = false) {
  constexpr int64_t R = 8;
  const int64_t jv = j0 + (j1 - j0) / VW * VW;
  const int64_t stride = banded ? (i1 - i0 + R - 1) / R : 1;
  const int64_t last = banded ? std::min(i1, i0 + stride) : i1;  // the first row of the last block, + 1
  for (int64_t i = i0; i < last; i += banded ? 1 : R) {
    // Rows i + r * stride < i1: the last band may be shorter than the others.
    const int64_t rows = std::min<int64_t>(R, (i1 - i + stride - 1) / stride);
    int64_t j = j0;
    for (; j + 4 * VW <= jv; j += 4 * VW) axpy_tiles<T, 4>(W, X, ldx, ACC, ldacc, nT, out, i, rows, j, stride);
    for (; j < jv; j += VW) axpy_tiles<T, 1>(W, X, ldx, ACC, ldacc, nT, out, i, rows, j, stride);
    for (; j < j1; j++)
      for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < nT; t++) {
          const int64_t row = i + r * stride;
          ACC[t * ldacc + j] = std::fma(tofloat(W[row * out + j]), X[t * ldx + row], ACC[t * ldacc + j]);
        }
  }
}

// The most tokens one call takes: a decode step plus up to 15 drafted tokens to verify.
static constexpr int64_t kMaxTokens = 16;

// A weight matrix as the kernels see it: raw pointers, so a decode step touches no tensor objects.
struct Mat {
  const void* w = nullptr;
  at::ScalarType type = at::kFloat;
  int64_t in = 0, out = 0;
  const at::Half* scale = nullptr;  // int8 only: [in / (32 per_scale), out]
  int64_t per_scale = 1;            // int8 only: groups of 32 inputs that share a scale row
  const float* bias = nullptr;
};

static int64_t threads_for(const Mat& m) {
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64));
  return m.in * m.out < (1 << 15) ? 1 : nt;
}

// ------------------------------------------------------------------------------ int8 weights
//
// q[i, j] int8 in [-127, 127] with W[i, j] = scale[i / (32 per_scale), j] * q[i, j], stored as the byte q + 128 (an
// unsigned byte: what vpdpbusd multiplies) and packed so that one decode step reads the matrix front to
// back: for group g (32 inputs) and strip s (16 outputs), a 512-byte block holds the 8 input quads p,
// each as 16 outputs c x 4 inputs r:  block[g][s][p][4c + r] = q[32g + 4p + r, 16s + c] + 128 (outputs
// past `out` hold 128, i.e. zero). The input is rounded to 15 bits per group of 32 and sent as a high and
// a low signed byte (`quantize_input`). One block is then 16 vpdpbusd (each 4 byte products per output:
// 8 quads x high and low) -- exact integer sums, less the offset the +128 adds --, then one float multiply
// by the group's input step and the weights' scale. A scale row serves `per_scale` groups (1, 2 or 4: 32, 64
// or 128 inputs, `layers.Linear.quantize_int8_`): scales are 1/17 of the bytes at 32 (Q8_0's grouping), 1/65 at 128.
//
// The earlier layout widened the weights to int16 and multiplied int16 pairs: 16 widenings (lane-crossing)
// and 16 multiply-adds a block, ~42 GB/s of weights per core with the matrix in cache, which left one core
// streaming from memory at ~18 GB/s where a float32 product streams ~25 (compute and memory did not
// overlap). A Qwen 0.5B int8 step: 21.3-23.7 ms before, 18.3-18.8 after (interleaved A/B, two processes
// each). Rounding the input to int8 instead (llama.cpp's Q8_0 products; 8 vpdpbusd a block) was no
// faster here (within 1%) and less exact (below).

static constexpr int64_t kGroup = 32, kStrip = 16, kBlock = kGroup * kStrip, kQuads = kGroup / 4;

// Matrices with at least this many outputs are packed strip-major -- block [s][g], each strip's blocks
// one after another (`layers.INT8_STRIP_MAJOR_OUT`, which must equal it) -- and their threads own runs of
// strips: a thread's share is one contiguous stream and a strip's sums stay in registers to its last group.
// Group-major ([g][s]) had each thread jump across every group's row of blocks and reload its partial sums
// per group: the Qwen 0.5B's gate_up read 29.6 GB/s against 32.5 strip-major (median of 12 alternating
// rounds, 2 threads, 45 matrices in turn). Narrower matrices stay group-major: their threads own groups.
static constexpr int64_t kWideOut = 4096;

static int64_t strips(int64_t out) { return (out + kStrip - 1) / kStrip; }

// The input's integer steps per group: max|x| / kSteps. Each rounded input is sent as two signed bytes,
// x16 = 256 hi + lo with hi, lo in [-128, 127] -- 15 bits, an input error below max|x| / 65278 (int8
// inputs, llama.cpp's choice for Q8_0, measured 3.5x the KL divergence from float32 with a weight scale per
// 32: 5.2e-3 against 1.5e-3 on SmolLM2, 8.8e-4 against 2.0e-4 on Qwen 0.5B; argmax agreement on SmolLM2 94%
// against 98%; `python -m benchmarks.int8_precision`).
static constexpr int32_t kSteps = 127 * 256 + 127;

// x[in] -> hi[in], lo[in] (bytes) and dx[in / 32] with x ~= dx[g] * (256 hi + lo) (round to nearest even,
// per group of 32), and offset[g] = 128 * sum(256 hi + lo): what the weights' +128 adds to each sum.
static void quantize_input(const float* x, int64_t in, int8_t* hi, int8_t* lo, float* dx, int32_t* offset) {
  for (int64_t g = 0; g < in / kGroup; g++) {
    const float* xg = x + g * kGroup;
#if defined(__AVX512F__)
    const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
#else
    float mx = 0.f;
    for (int64_t i = 0; i < kGroup; i++) mx = std::max(mx, std::fabs(xg[i]));
#endif
    const float inv = mx > 0.f ? (float)kSteps / mx : 0.f;
    dx[g] = mx / (float)kSteps;
#if defined(__AVX512F__)
    // cvtps rounds to nearest even (the default MXCSR mode), as lrintf does below.
    int32_t sum = 0;
    for (int half = 0; half < 2; half++) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(half ? b : a, _mm512_set1_ps(inv)));
      const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
      const __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 8));
      _mm_storeu_si128((__m128i*)(hi + g * kGroup + 16 * half), _mm512_cvtsepi32_epi8(h));
      _mm_storeu_si128((__m128i*)(lo + g * kGroup + 16 * half), _mm512_cvtsepi32_epi8(l));
      sum += _mm512_reduce_add_epi32(q);
    }
    offset[g] = 128 * sum;
#else
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; i++) {
      const int32_t q = (int32_t)std::lrintf(xg[i] * inv);
      const int32_t h = (q + 128) >> 8;
      hi[g * kGroup + i] = (int8_t)h;
      lo[g * kGroup + i] = (int8_t)(q - h * 256);
      sum += q;
    }
    offset[g] = 128 * sum;
#endif
  }
}

// One block's exact integer sums for one input group: sum_i x16[i] (q[i, 16s + c] + 128) - offset for the 16
// outputs c of the strip (vector path: the block's 8 weight vectors `wv`; scalar path: output c of block `w`).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512i block_sums(const __m512i* wv, const int8_t* hi, const int8_t* lo, int32_t offset) {
  const int32_t* h4 = reinterpret_cast<const int32_t*>(hi);
  const int32_t* l4 = reinterpret_cast<const int32_t*>(lo);
  // Four independent chains (high and low bytes, even and odd quads). Integer sums are exact
  // (|256 * high + low| < 2^31), so the order changes nothing.
  __m512i he = _mm512_setzero_si512(), ho = _mm512_setzero_si512();
  __m512i le = _mm512_set1_epi32(-offset), lodd = _mm512_setzero_si512();
  for (int p = 0; p < kQuads; p += 2) {
    he = _mm512_dpbusd_epi32(he, wv[p], _mm512_set1_epi32(h4[p]));
    ho = _mm512_dpbusd_epi32(ho, wv[p + 1], _mm512_set1_epi32(h4[p + 1]));
    le = _mm512_dpbusd_epi32(le, wv[p], _mm512_set1_epi32(l4[p]));
    lodd = _mm512_dpbusd_epi32(lodd, wv[p + 1], _mm512_set1_epi32(l4[p + 1]));
  }
  return _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(he, ho), 8), _mm512_add_epi32(le, lodd));
}
#else
static inline int32_t block_sum(const uint8_t* w, int64_t c, const int8_t* hi, const int8_t* lo, int32_t offset) {
  int32_t sum = -offset;
  for (int p = 0; p < kQuads; p++)
    for (int r = 0; r < 4; r++) sum += (int32_t)w[4 * kStrip * p + 4 * c + r] * (256 * hi[4 * p + r] + lo[4 * p + r]);
  return sum;
}
#endif

// For each input t: acc_t[16s + c] += sum over groups [g0, g1) of dx_t[g] * scale[g / per_scale, 16s + c] *
// (sum_i x16_t[i] (q[i, 16s + c] + 128) - offset_t[g]), for strips [s0, s1); x16_t = 256 hi_t + lo_t,
// hi_t = hi + t * in (lo alike), dx_t = dx + t * G, offset_t = offset + t * G, acc_t = acc + t * ldacc
// (room for whole strips, 16 floats each). A strip's 8 weight vectors are loaded once and reused by every
// input; each acc_t sums in the same order whatever nT is.
static void int8_block(const uint8_t* P, const at::Half* S, const int8_t* hi, const int8_t* lo, const float* dx,
                       const int32_t* offset, float* acc, int64_t ldacc, int64_t nT, int64_t in, int64_t out,
                       int64_t per_scale, int64_t g0, int64_t g1, int64_t s0, int64_t s1) {
  const int64_t ns = strips(out), G = in / kGroup;
  for (int64_t g = g0; g < g1; g++) {
    const uint8_t* blocks = P + g * ns * kBlock;
    const at::Half* sg = S + (g / per_scale) * out;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    for (int64_t s = s0; s < s1; s++) {
      const uint8_t* w = blocks + s * kBlock;
      __m512i wv[kQuads];
      for (int p = 0; p < kQuads; p++) wv[p] = _mm512_loadu_si512((const void*)(w + 4 * kStrip * p));
      const int64_t j = s * kStrip;
      const __mmask16 live = out - j >= kStrip ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - j)) - 1);
      const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, sg + j));
      for (int64_t t = 0; t < nT; t++) {
        const float dxg = dx[t * G + g];
        if (dxg == 0.f) continue;  // an all-zero input group adds nothing
        const __m512i sum = block_sums(wv, hi + t * in + g * kGroup, lo + t * in + g * kGroup, offset[t * G + g]);
        float* at = acc + t * ldacc + j;
        const __m512 a = _mm512_loadu_ps(at);
        _mm512_storeu_ps(at, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(dxg)), sc, a));
      }
    }
#else
    for (int64_t t = 0; t < nT; t++) {
      const float dxg = dx[t * G + g];
      if (dxg == 0.f) continue;
      const int8_t* hg = hi + t * in + g * kGroup;
      const int8_t* lg = lo + t * in + g * kGroup;
      for (int64_t s = s0; s < s1; s++) {
        const uint8_t* w = blocks + s * kBlock;
        for (int64_t c = 0; c < kStrip && s * kStrip + c < out; c++) {
          const int32_t sum = block_sum(w, c, hg, lg, offset[t * G + g]);
          // The same float operations as the vector path: (sum * dx) * scale + acc, fused.
          float* at = acc + t * ldacc + s * kStrip + c;
          *at = std::fma((float)sum * dxg, static_cast<float>(sg[s * kStrip + c]), *at);
        }
      }
    }
#endif
  }
}

// Strip-major matrices: for each input t, acc_t[16s + c] = the sum `int8_block` forms over every group, in the
// same order with the same float operations (so the two layouts give equal bits), for strips [s0, s1).
static void int8_strips(const uint8_t* P, const at::Half* S, const int8_t* hi, const int8_t* lo, const float* dx,
                        const int32_t* offset, float* acc, int64_t ldacc, int64_t nT, int64_t in, int64_t out,
                        int64_t per_scale, int64_t s0, int64_t s1) {
  const int64_t G = in / kGroup;
  for (int64_t s = s0; s < s1; s++) {
    const uint8_t* blocks = P + s * G * kBlock;
    const int64_t j = s * kStrip;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __mmask16 live = out - j >= kStrip ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - j)) - 1);
    __m512 a[kMaxTokens];
    for (int64_t t = 0; t < nT; t++) a[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      const uint8_t* w = blocks + g * kBlock;
      __m512i wv[kQuads];
      for (int p = 0; p < kQuads; p++) wv[p] = _mm512_loadu_si512((const void*)(w + 4 * kStrip * p));
      const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, S + (g / per_scale) * out + j));
      for (int64_t t = 0; t < nT; t++) {
        const float dxg = dx[t * G + g];
        if (dxg == 0.f) continue;
        const __m512i sum = block_sums(wv, hi + t * in + g * kGroup, lo + t * in + g * kGroup, offset[t * G + g]);
        a[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(dxg)), sc, a[t]);
      }
    }
    for (int64_t t = 0; t < nT; t++) _mm512_storeu_ps(acc + t * ldacc + j, a[t]);
#else
    for (int64_t t = 0; t < nT; t++)
      for (int64_t c = 0; c < kStrip; c++) {
        float v = 0.f;  // padding outputs (j + c >= out) stay zero
        for (int64_t g = 0; j + c < out && g < G; g++) {
          const float dxg = dx[t * G + g];
          if (dxg == 0.f) continue;
          const int32_t sum =
              block_sum(blocks + g * kBlock, c, hi + t * in + g * kGroup, lo + t * in + g * kGroup, offset[t * G + g]);
          v = std::fma((float)sum * dxg, static_cast<float>(S[(g / per_scale) * out + j + c]), v);
        }
        acc[t * ldacc + j + c] = v;
      }
#endif
  }
}

// Y[t] = X[t] @ W (+ bias) for nT inputs X [nT, in] -> Y [nT, out], rows contiguous.
static void matvec_int8(const Mat& m, const float* X, int64_t nT, float* Y, float* scratch) {
  const int64_t nt = threads_for(m), G = m.in / kGroup, ns = strips(m.out), padded = ns * kStrip;
  const uint8_t* P = static_cast<const uint8_t*>(m.w);
  // scratch: [nt][nT][padded] partial sums, then dx [nT][G], offset [nT][G], hi and lo [nT][in] (bytes).
  float* parts = scratch;
  float* dx = parts + nt * nT * padded;
  int32_t* offset = reinterpret_cast<int32_t*>(dx + nT * G);
  int8_t* hi = reinterpret_cast<int8_t*>(offset + nT * G);
  int8_t* lo = hi + nT * m.in;
  for (int64_t t = 0; t < nT; t++)
    quantize_input(X + t * m.in, m.in, hi + t * m.in, lo + t * m.in, dx + t * G, offset + t * G);
  if (m.out >= kWideOut || nt == 1) {
    // Wide matrices (strip-major) and one thread: threads own disjoint strips of outputs.
    const bool strip_major = m.out >= kWideOut;
    if (!strip_major) std::fill(parts, parts + nT * padded, 0.f);
    const int64_t per = (ns + nt - 1) / nt;
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        const int64_t a = std::min(ns, t * per), b = std::min(ns, (t + 1) * per);
        if (strip_major)
          int8_strips(P, m.scale, hi, lo, dx, offset, parts, padded, nT, m.in, m.out, m.per_scale, a, b);
        else
          int8_block(P, m.scale, hi, lo, dx, offset, parts, padded, nT, m.in, m.out, m.per_scale, 0, G, a, b);
      }
    });
    for (int64_t r = 0; r < nT; r++)
      for (int64_t j = 0; j < m.out; j++) Y[r * m.out + j] = parts[r * padded + j] + (m.bias ? m.bias[j] : 0.f);
    return;
  }
  // Narrow matrices: threads own disjoint groups of inputs, each summing into its own partial.
  const int64_t per = (G + nt - 1) / nt;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      float* part = parts + t * nT * padded;
      std::fill(part, part + nT * padded, 0.f);
      int8_block(P, m.scale, hi, lo, dx, offset, part, padded, nT, m.in, m.out, m.per_scale, std::min(G, t * per),
                 std::min(G, (t + 1) * per), 0, ns);
    }
  });
  for (int64_t r = 0; r < nT; r++)
    for (int64_t j = 0; j < m.out; j++) {
      float s = m.bias ? m.bias[j] : 0.f;
      for (int64_t t = 0; t < nt; t++) s += parts[(t * nT + r) * padded + j];
      Y[r * m.out + j] = s;
    }
}

// ------------------------------------------------------------------------------ float weights

// Floats of scratch `matvec` needs for `m` and nT inputs: per thread and input a partial sum (narrow
// matrices), and for int8 the rounded inputs (a byte each) with their groups' scales and offsets.
static int64_t scratch_floats(const Mat& m, int64_t nT) {
  return nT * (threads_for(m) * strips(m.out) * kStrip + m.in);
}

// Bytes of accumulators a wide product keeps live per thread: half of a core's L2 (256 KB where the
// system does not say), so that they stay there while the weights stream past.
static int64_t accumulator_budget() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? (int64_t)l2 / 2 : (int64_t)128 * 1024;
  }();
  return bytes;
}

template <typename T>
static void matvec_typed(const Mat& m, const float* X, int64_t nT, float* Y, float* scratch) {
  const T* W = static_cast<const T*>(m.w);
  const int64_t in = m.in, out = m.out, nt = threads_for(m);
  // Columns of one pass down the rows: as wide as the nT accumulators allow while they stay in L2 (a
  // thread's whole share of the unembedding at nT = 1 here). A pass reads 8 rows at a time, each row's
  // slice a run of col_tile weights: long runs are what keep the hardware prefetchers streaming. The
  // earlier 2 KB runs (512 columns) read the Qwen unembedding, 608 KB a row apart, at ~2/3 the speed.
  const int64_t col_tile = std::max<int64_t>(512, accumulator_budget() / (4 * nT)) / VW * VW;
  if (out >= 4096) {
    // Wide matrices (the unembedding, gate_up): threads own disjoint column ranges, no reduction needed.
    const int64_t per = ((out + nt - 1) / nt + VW - 1) / VW * VW;
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        const int64_t a = std::min(out, t * per), b = std::min(out, a + per);
        for (int64_t j = a; j < b; j += col_tile) {
          const int64_t e = std::min(b, j + col_tile);
          for (int64_t r = 0; r < nT; r++) {
            float* y = Y + r * out;
            if (m.bias) std::copy(m.bias + j, m.bias + e, y + j); else std::fill(y + j, y + e, 0.f);
          }
          rows_axpy(W, X, in, Y, out, nT, out, 0, in, j, e);
        }
      }
    });
    return;
  }
  // Narrow matrices: each thread streams a contiguous block of rows, in 8 bands, into its own partial sums.
  const int64_t per = (in + nt - 1) / nt;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t a = std::min(in, t * per), b = std::min(in, a + per);
      float* part = scratch + t * nT * out;
      std::fill(part, part + nT * out, 0.f);
      if (a < b) rows_axpy(W, X, in, part, out, nT, out, a, b, 0, out, /*banded=*/true);
    }
  });
  for (int64_t r = 0; r < nT; r++)
    for (int64_t j = 0; j < out; j++) {
      float s = m.bias ? m.bias[j] : 0.f;
      for (int64_t t = 0; t < nt; t++) s += scratch[(t * nT + r) * out + j];
      Y[r * out + j] = s;
    }
}

// Y [nT, out] = X [nT, in] @ W (+ bias): the weights are read once for all nT inputs.
static void matvec(const Mat& m, const float* X, int64_t nT, float* Y, float* scratch) {
  switch (m.type) {
    case at::kFloat: return matvec_typed<float>(m, X, nT, Y, scratch);
    case at::kBFloat16: return matvec_typed<at::BFloat16>(m, X, nT, Y, scratch);
    case at::kByte: return matvec_int8(m, X, nT, Y, scratch);
    default: TORCH_CHECK(false, "weights must be float32, bfloat16 or int8, not ", m.type);
  }
}

static bool absent(const torch::Tensor& t) { return !t.defined() || t.numel() == 0; }

static const float* optional_f32(const torch::Tensor& t, int64_t n, const char* what) {
  if (absent(t)) return nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() && t.numel() == n, what,
              " must be a contiguous float32 CPU vector of ", n);
  return t.data_ptr<float>();
}

static Mat make_mat(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& bias) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "W must be a contiguous CPU tensor");
  Mat m;
  m.w = w.data_ptr();
  m.type = w.scalar_type();
  TORCH_CHECK((m.type == at::kByte) != absent(scale), "int8 weights need a scale, and only they take one");
  if (m.type == at::kByte) {
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.device().is_cpu() &&
                    scale.dim() == 2,
                "int8 scales must be a contiguous float16 CPU matrix [in / (32 k), out]");
    m.out = scale.size(1);
    const bool strip_major = m.out >= kWideOut;
    const int64_t strip_dim = strip_major ? 0 : 1, groups = w.dim() == 4 ? w.size(1 - strip_dim) : 0;
    TORCH_CHECK(w.dim() == 4 && w.size(strip_dim) == strips(m.out) && w.size(2) == kQuads && w.size(3) == 4 * kStrip,
                strip_major ? "packed int8 weights with 4096 outputs or more must be uint8 [ceil(out / 16), in / 32, 8, 64]"
                            : "packed int8 weights must be uint8 [in / 32, ceil(out / 16), 8, 64]");
    m.in = groups * kGroup;
    TORCH_CHECK(scale.size(0) > 0 && groups % scale.size(0) == 0,
                "int8 scales must have one row per 32 k inputs, for a whole k");
    m.per_scale = groups / scale.size(0);
    m.scale = scale.data_ptr<at::Half>();
  } else {
    TORCH_CHECK(w.dim() == 2 && (m.type == at::kFloat || m.type == at::kBFloat16),
                "W must be a float32 or bfloat16 matrix [in, out], or packed int8");
    m.in = w.size(0);
    m.out = w.size(1);
  }
  m.bias = optional_f32(bias, m.out, "bias");
  return m;
}

// y[out] = x[in] @ W + bias, in x's dtype; W float [in, out], or packed int8 with its scales. Scale and
// bias may be empty tensors.
// x [in] or [nT, in] (nT <= kMaxTokens) -> [out] or [nT, out]: the weights read once for all nT rows, each row
// computed exactly as it would be alone.
torch::Tensor matvec_op(torch::Tensor x, torch::Tensor W, torch::Tensor scale, torch::Tensor bias) {
  torch::Tensor bias32 = bias.numel() ? bias.to(torch::kFloat).contiguous() : bias;
  Mat m = make_mat(W, scale, bias32);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == m.in, "x has ", x.size(-1), " features, W has ", m.in, " rows");
  const int64_t nT = x.numel() / m.in;
  TORCH_CHECK(nT >= 1 && nT <= kMaxTokens, "one call takes 1 to ", kMaxTokens, " rows, got ", nT);
  auto xf = x.reshape({nT, m.in}).to(torch::kFloat).contiguous();
  auto y = torch::empty({nT, m.out}, xf.options());
  std::vector<float> scratch(scratch_floats(m, nT));
  matvec(m, xf.data_ptr<float>(), nT, y.data_ptr<float>(), scratch.data());
  if (x.dim() == 1) y = y.view({m.out});
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

// ------------------------------------------------------------------------------ decode step

static void rms_norm(const float* x, const float* w, float* y, int64_t d, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
  const float r = 1.f / std::sqrt((float)(ss / d) + eps);
  for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * r);
}

// HF's rotate-half RoPE on one head in place: pairs (i, i + half) turn by the position's angles.
static void rope(float* h, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = h[i], b = h[i + half];
    h[i] = a * cos[i] - b * sin[i];
    h[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

#if defined(__AVX512F__)
// e^x for 16 floats: range reduction (x = k ln 2 + r, |r| <= ln2 / 2) and a degree-6 polynomial, relative
// error < 4e-7; x is clamped to [-87, 88] (e^-87 ~ 1.6e-38: softmax weights below it are zero anyway).
static inline __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 k =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f),
                                    _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x));
  __m512 poly = _mm512_set1_ps(1.f / 720);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 120));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 24));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 6));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, k);  // poly * 2^k
}
#endif

// SwiGLU's activation in place: gate[i] = silu(gate[i]) * up[i]. libm's scalar expf over the MLP width was
// ~1-2% of a Qwen 0.5B int8 step, on one thread while the other waited.
static void silu_mul(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = vexp(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(gate + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// p[0:n] = e^(p - mx) in place; returns their sum.
static float exp_shifted(float* p, int64_t n, float mx) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(p + i), _mm512_set1_ps(mx)));
    _mm512_storeu_ps(p + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; i++) {
    p[i] = std::exp(p[i] - mx);
    sum += p[i];
  }
  return sum;
}

struct Layer {
  const float* attn_norm;
  const float* mlp_norm;
  Mat qkv, o, gate_up, down;
};

// Weights passed by name: a missing name, or a name nobody reads, is an error naming it, so the Python
// side and this one cannot drift apart silently.
using Named = std::map<std::string, torch::Tensor>;

class Weights {
 public:
  Weights(const Named& named, std::string where) : named_(named), where_(std::move(where)) {}
  // An empty tensor stands for "absent" (no scale, no bias).
  const torch::Tensor& operator[](const std::string& name) {
    auto it = named_.find(name);
    TORCH_CHECK(it != named_.end(), where_, " has no weight named '", name, "'");
    used_.push_back(name);
    return it->second;
  }
  Mat mat(const std::string& prefix) {
    return make_mat((*this)[prefix + ".weight"], (*this)[prefix + ".scale"], (*this)[prefix + ".bias"]);
  }
  void check_all_used() const {
    for (const auto& kv : named_)
      TORCH_CHECK(std::find(used_.begin(), used_.end(), kv.first) != used_.end(), where_, ": unexpected weight '",
                  kv.first, "'");
  }

 private:
  const Named& named_;
  std::string where_;
  std::vector<std::string> used_;
};

// Positions per attention work item (see DecodeStep::attend).
static constexpr int64_t kAttnBlock = 256;

// Up to kMaxTokens consecutive tokens through a Llama-family model (batch 1), appending their K/V to
// the cache: one token is a decode step, several are the verification of drafted tokens, at about the
// cost of one step since every weight matrix is read once for all of them.
// Built once per set of weights; holds references to the tensors so the pointers stay valid.
class DecodeStep {
 public:
  // `globals`: embed [vocab, d], final_norm [d], unembed.{weight,scale,bias}, rope_cos [ctx, hd],
  // rope_sin. `layers`, one dict each: attn_norm, qkv.*, o.*, mlp_norm, gate_up.*, down.* (each
  // product as .weight, .scale, .bias; absent scales and biases are empty tensors).
  DecodeStep(Named globals, std::vector<Named> layers, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
             double eps)
      : globals_(std::move(globals)), layer_weights_(std::move(layers)), n_q_(n_heads), n_kv_(n_kv_heads),
        hd_(head_dim), eps_((float)eps) {
    TORCH_CHECK(n_q_ > 0 && n_kv_ > 0 && n_q_ % n_kv_ == 0, "query heads must be a multiple of KV heads");
    Weights g(globals_, "the model");
    const auto& embed = g["embed"];
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kFloat && embed.is_contiguous(),
                "embed must be a contiguous float32 matrix");
    vocab_ = embed.size(0);
    d_ = embed.size(1);
    embed_ = embed.data_ptr<float>();
    final_norm_ = optional_f32(g["final_norm"], d_, "final_norm");
    unembed_ = g.mat("unembed");
    const auto& cos = g["rope_cos"];
    const auto& sin = g["rope_sin"];
    for (const auto* r : {&cos, &sin})
      TORCH_CHECK(r->dim() == 2 && r->size(1) == hd_ && r->scalar_type() == at::kFloat && r->is_contiguous() &&
                      r->size(0) == cos.size(0),
                  "rope tables must be contiguous float32 [context, head_dim]");
    cos_ = cos.data_ptr<float>();
    sin_ = sin.data_ptr<float>();
    context_ = cos.size(0);
    g.check_all_used();
    const int64_t qkv_out = (n_q_ + 2 * n_kv_) * hd_;
    for (size_t l = 0; l < layer_weights_.size(); l++) {
      Weights w(layer_weights_[l], "layer " + std::to_string(l));
      Layer L;
      L.attn_norm = optional_f32(w["attn_norm"], d_, "attn_norm");
      L.qkv = w.mat("qkv");
      L.o = w.mat("o");
      L.mlp_norm = optional_f32(w["mlp_norm"], d_, "mlp_norm");
      L.gate_up = w.mat("gate_up");
      L.down = w.mat("down");
      w.check_all_used();
      TORCH_CHECK(L.attn_norm && L.mlp_norm, "norm weights are required");
      TORCH_CHECK(L.qkv.in == d_ && L.qkv.out == qkv_out && L.o.in == n_q_ * hd_ && L.o.out == d_ &&
                      L.gate_up.in == d_ && L.gate_up.out % 2 == 0 && L.down.in == L.gate_up.out / 2 &&
                      L.down.out == d_,
                  "layer shapes disagree with the model's dimensions");
      d_ff_ = L.down.in;
      layers_.push_back(L);
    }
    TORCH_CHECK(!layers_.empty(), "the model has no layers");
    TORCH_CHECK(final_norm_ && unembed_.in == d_, "final norm / unembedding disagree with d_model");
    for (const auto& kv : globals_) remember(kv.second);
    for (const Named& named : layer_weights_)
      for (const auto& kv : named) remember(kv.second);
    x_.resize(kMaxTokens * d_);
    xn_.resize(kMaxTokens * d_);
    qkv_.resize(kMaxTokens * qkv_out);
    att_.resize(kMaxTokens * n_q_ * hd_);
    tmp_.resize(kMaxTokens * d_);
    gu_.resize(kMaxTokens * 2 * d_ff_);
    act_.resize(kMaxTokens * d_ff_);
    const int64_t max_blocks = (context_ + kAttnBlock - 1) / kAttnBlock;
    scores_.resize(n_kv_ * max_blocks * (n_q_ / n_kv_) * kAttnBlock);
    parts_.resize(n_q_ * max_blocks * (hd_ + 2));
    size_scratch();
  }

  // Logits [vocab] (float32) of `token` at position `pos`; K and V are [layer, 1, kv_head, capacity,
  // head_dim] float32 caches that already hold positions 0..pos-1.
  torch::Tensor forward(int64_t token, int64_t pos, torch::Tensor k_cache, torch::Tensor v_cache) {
    auto tokens = torch::tensor({token}, torch::kLong);
    return std::get<0>(forward_many(tokens, pos, k_cache, v_cache)).view({vocab_});
  }

  // Logits [T, vocab] and the last block's output (the residual before the final norm) [T, d] of
  // `tokens` [T] (int64, T <= kMaxTokens) at positions pos..pos+T-1, token t attending to 0..pos+t.
  std::tuple<torch::Tensor, torch::Tensor> forward_many(torch::Tensor tokens, int64_t pos, torch::Tensor k_cache,
                                                        torch::Tensor v_cache) {
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong && tokens.device().is_cpu(),
                "tokens must be a CPU int64 vector");
    const int64_t nT = tokens.size(0);
    TORCH_CHECK(nT >= 1 && nT <= kMaxTokens, "one call takes 1 to ", kMaxTokens, " tokens, got ", nT);
    auto tok = tokens.contiguous();
    const int64_t* ids = tok.data_ptr<int64_t>();
    for (int64_t t = 0; t < nT; t++)
      TORCH_CHECK(ids[t] >= 0 && ids[t] < vocab_, "token id ", ids[t], " is outside the vocabulary");
    TORCH_CHECK(pos >= 0 && pos + nT <= context_, "positions ", pos, "..", pos + nT - 1, " are outside the context");
    for (const auto* c : {&k_cache, &v_cache})
      TORCH_CHECK(c->dim() == 5 && c->scalar_type() == at::kFloat && c->is_contiguous() && c->device().is_cpu() &&
                      c->size(0) == (int64_t)layers_.size() && c->size(1) == 1 && c->size(2) == n_kv_ &&
                      c->size(4) == hd_ && c->size(3) >= pos + nT,
                  "the KV cache must be contiguous float32 [layers, 1, kv_heads, capacity >= end, head_dim]");
    if (at::get_num_threads() != scratch_threads_) size_scratch();  // torch.set_num_threads since
    const int64_t cap = k_cache.size(3);
    const int64_t qkv_out = (n_q_ + 2 * n_kv_) * hd_, att_w = n_q_ * hd_;
    float* K = k_cache.data_ptr<float>();
    float* V = v_cache.data_ptr<float>();
    float* x = x_.data();
    float* xn = xn_.data();
    float* tmp = tmp_.data();
    for (int64_t t = 0; t < nT; t++) std::copy(embed_ + ids[t] * d_, embed_ + (ids[t] + 1) * d_, x + t * d_);

    for (size_t l = 0; l < layers_.size(); l++) {
      const Layer& L = layers_[l];
      // Attention: project, rotate, append K/V, attend over positions 0..pos+t.
      for (int64_t t = 0; t < nT; t++) rms_norm(x + t * d_, L.attn_norm, xn + t * d_, d_, eps_);
      matvec(L.qkv, xn, nT, qkv_.data(), scratch_.data());
      for (int64_t t = 0; t < nT; t++) {
        const float* cos = cos_ + (pos + t) * hd_;
        const float* sin = sin_ + (pos + t) * hd_;
        float* q = qkv_.data() + t * qkv_out;
        float* k = q + n_q_ * hd_;
        float* v = k + n_kv_ * hd_;
        for (int64_t h = 0; h < n_q_; h++) rope(q + h * hd_, cos, sin, hd_);
        for (int64_t h = 0; h < n_kv_; h++) {
          rope(k + h * hd_, cos, sin, hd_);
          const int64_t slot = ((l * n_kv_ + h) * cap + pos + t) * hd_;
          std::copy(k + h * hd_, k + (h + 1) * hd_, K + slot);
          std::copy(v + h * hd_, v + (h + 1) * hd_, V + slot);
        }
      }
      for (int64_t t = 0; t < nT; t++)
        attend(qkv_.data() + t * qkv_out, K + l * n_kv_ * cap * hd_, V + l * n_kv_ * cap * hd_, cap, pos + t + 1,
               att_.data() + t * att_w);
      matvec(L.o, att_.data(), nT, tmp, scratch_.data());
      for (int64_t i = 0; i < nT * d_; i++) x[i] += tmp[i];
      // MLP: SwiGLU.
      for (int64_t t = 0; t < nT; t++) rms_norm(x + t * d_, L.mlp_norm, xn + t * d_, d_, eps_);
      matvec(L.gate_up, xn, nT, gu_.data(), scratch_.data());
      for (int64_t t = 0; t < nT; t++) {
        float* gate = gu_.data() + t * 2 * d_ff_;
        const float* up = gate + d_ff_;
        silu_mul(gate, up, d_ff_);
        std::copy(gate, gate + d_ff_, act_.data() + t * d_ff_);  // down reads [T, d_ff] rows
      }
      matvec(L.down, act_.data(), nT, tmp, scratch_.data());
      for (int64_t i = 0; i < nT * d_; i++) x[i] += tmp[i];
    }
    auto hidden = torch::from_blob(x, {nT, d_}, torch::kFloat).clone();
    for (int64_t t = 0; t < nT; t++) rms_norm(x + t * d_, final_norm_, xn + t * d_, d_, eps_);
    auto logits = torch::empty({nT, vocab_}, torch::kFloat);
    matvec(unembed_, xn, nT, logits.data_ptr<float>(), scratch_.data());
    return {logits, hidden};
  }

  // Whether every weight still lies where this step read its pointers: `param.data = other` (and
  // Module.to) moves a tensor's memory under the same tensor object, which this step holds. A check of a
  // few hundred pointers, so the caller can skip gathering the weights in Python on every token.
  bool current() const {
    for (const auto& seen : seen_)
      if (seen.first.data_ptr() != seen.second) return false;
    return true;
  }

 private:
  void remember(const torch::Tensor& t) {
    if (t.defined()) seen_.emplace_back(t, t.data_ptr());
  }

  // The products' scratch depends on the thread count: sized for the current one.
  void size_scratch() {
    scratch_threads_ = at::get_num_threads();
    int64_t n = scratch_floats(unembed_, kMaxTokens);
    for (const Layer& L : layers_)
      for (const Mat* m : {&L.qkv, &L.o, &L.gate_up, &L.down}) n = std::max(n, scratch_floats(*m, kMaxTokens));
    scratch_.assign(n, 0.f);
  }

  // Softmax attention of every query head in `qkv` over `S` cached positions of its KV head
  // (grouped-query), written to `out` [n_heads * head_dim].
  //
  // Work items are (KV head, block of kAttnBlock positions): one item reads each K and V row of its block
  // once for all the query heads that share that KV head, and leaves per query head the block's running
  // max, sum of e^(score - max) and unnormalised output; the blocks then merge in order. Reading K and V
  // once per query head instead (the earlier loop) read a Qwen 0.5B cache 7 times per layer; a SmolLM2
  // fp32 step at 2,048 positions took 25.1 ms with it and 22.4 with this (interleaved A/B, two processes
  // a side; 17.4 and 16.1 at 128 positions). Block boundaries depend on the
  // position only, never on the thread count or on how many tokens come in one call, so every result is
  // the same number however the items are scheduled (speculative verification relies on it).
  void attend(const float* qkv, const float* K, const float* V, int64_t cap, int64_t S, float* out) {
    const int64_t group = n_q_ / n_kv_;
    const float scale = 1.f / std::sqrt((float)hd_);
    const int64_t blocks = (S + kAttnBlock - 1) / kAttnBlock, items = n_kv_ * blocks;
    const int64_t part = hd_ + 2;  // per query head and block: max, sum, output[hd]
    // Below a few thousand (position, head) pairs one thread is faster than waking the other.
    const int64_t grain = S * n_q_ < 2048 ? items : 1;
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; it++) {
        const int64_t kv = it / blocks, b = it % blocks;
        const int64_t s0 = b * kAttnBlock, s1 = std::min(S, s0 + kAttnBlock), n = s1 - s0;
        const float* Kb = K + (kv * cap + s0) * hd_;
        const float* Vb = V + (kv * cap + s0) * hd_;
        float* p = scores_.data() + (kv * blocks + b) * group * kAttnBlock;  // [group][n]
        for (int64_t s = 0; s < n; s++) {
          const float* kr = Kb + s * hd_;
          for (int64_t g = 0; g < group; g++) p[g * kAttnBlock + s] = dot(qkv + (kv * group + g) * hd_, kr) * scale;
        }
        for (int64_t g = 0; g < group; g++) {
          float* pg = p + g * kAttnBlock;
          float* res = parts_.data() + ((kv * group + g) * blocks + b) * part;
          const float mx = *std::max_element(pg, pg + n);
          res[0] = mx;
          res[1] = exp_shifted(pg, n, mx);
          std::fill(res + 2, res + part, 0.f);
        }
        for (int64_t s = 0; s < n; s++) {
          const float* vr = Vb + s * hd_;
          for (int64_t g = 0; g < group; g++) {
            float* o = parts_.data() + ((kv * group + g) * blocks + b) * part + 2;
            const float w = p[g * kAttnBlock + s];
            for (int64_t i = 0; i < hd_; i++) o[i] += w * vr[i];
          }
        }
      }
    });
    for (int64_t h = 0; h < n_q_; h++) {
      const float* res = parts_.data() + h * blocks * part;
      float mx = -INFINITY;
      for (int64_t b = 0; b < blocks; b++) mx = std::max(mx, res[b * part]);
      float sum = 0.f;
      float* o = out + h * hd_;
      std::fill(o, o + hd_, 0.f);
      for (int64_t b = 0; b < blocks; b++) {
        const float f = std::exp(res[b * part] - mx);
        sum += f * res[b * part + 1];
        for (int64_t i = 0; i < hd_; i++) o[i] += f * res[b * part + 2 + i];
      }
      for (int64_t i = 0; i < hd_; i++) o[i] /= sum;
    }
  }

  // q . k over head_dim in SIMD lanes: a scalar float reduction is one serial chain the compiler may not
  // reorder, and at a few hundred positions it was most of a step's non-weight time.
  float dot(const float* q, const float* k) const {
    const int64_t hv = hd_ / VW * VW;
    vf acc = vset(0.f);
    for (int64_t i = 0; i < hv; i += VW) acc = vfma(vload(q + i), vload(k + i), acc);
    float d = vsum(acc);
    for (int64_t i = hv; i < hd_; i++) d += q[i] * k[i];
    return d;
  }

  Named globals_;
  std::vector<Named> layer_weights_;  // kept so the pointers below stay valid
  std::vector<Layer> layers_;
  const float* embed_;
  const float* final_norm_;
  const float* cos_;
  const float* sin_;
  Mat unembed_;
  int64_t n_q_, n_kv_, hd_, d_ = 0, d_ff_ = 0, vocab_ = 0, context_ = 0;
  float eps_;
  int64_t scratch_threads_ = 0;
  std::vector<float> x_, xn_, qkv_, att_, tmp_, gu_, act_, scores_, parts_, scratch_;
  std::vector<std::pair<torch::Tensor, const void*>> seen_;  // each weight and where its memory was
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matvec", &matvec_op, "x @ W + bias for x [in] or [T <= 16, in] and W [in, out] (int8 W with its scales)");
  m.attr("MAX_TOKENS") = kMaxTokens;
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<Named, std::vector<Named>, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecodeStep::forward)
      .def("forward_many", &DecodeStep::forward_many)
      .def("current", &DecodeStep::current);
}

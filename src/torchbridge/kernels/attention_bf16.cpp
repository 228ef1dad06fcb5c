// Encoder self-attention in one pass per (sequence, head), bf16 in and out, for x86 CPUs with
// AVX512_BF16 (built and loaded by torchbridge/kernels/__init__.py; see its docstring for why).
//
// For each sequence b and head h of a fused projection qkv [B, T, 3, H, D] (q, k, v side by
// side in each token's row, as the fused q/k/v GEMM writes them):
//   scores = q k^T * scale + key_bias[b]   (fp32 accumulators, VDPBF16PS)
//   p      = exp(scores - rowmax)          (fp32, rounded to bf16 for the second product)
//   out    = (p v) / rowsum(p)             -> out [B, T, H, D] bf16
// q, k and v are read where the projection wrote them (no copies into per-head tensors); k and v
// are rearranged once per (b, h) into the pair-interleaved layout VDPBF16PS reads, in a scratch
// buffer that stays in L1/L2. Work is split over (b, h) with OpenMP, on as many threads as the
// caller says: the library loads this after torch, so it shares torch's libgomp.

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>

#include "simd.h"

namespace {

using tb::exp512;
using tb::u16;
using tb::u32;

constexpr int kQueryBlock = 32;  // query rows whose scores are kept at once (32 x T fp32)
constexpr int kRowsAhead = 4;    // rows fetched ahead of the one being rearranged

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// scores[r][j0 + 16c + l] for R query rows and C vectors of 16 keys. q[r] is a query row as D/2
// bf16 pairs; kp holds the keys as [D/2][tpad] pairs (key j's pair p at kp[p * tpad + j]).
template <int R, int C>
void scores_block(const u32* const* q, const u32* kp, int half_d, int tpad, int j0,
                  const float* bias, float scale, float* scores, int stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int p = 0; p < half_d; ++p) {
    __m512i keys[C];
    for (int c = 0; c < C; ++c) keys[c] = _mm512_loadu_si512(kp + p * tpad + j0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512i pair = _mm512_set1_epi32(static_cast<int>(q[r][p]));
      for (int c = 0; c < C; ++c) acc[r][c] = dot_pairs(acc[r][c], pair, keys[c]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(scores + r * stride + j0 + 16 * c,
                       _mm512_fmadd_ps(acc[r][c], s, _mm512_loadu_ps(bias + j0 + 16 * c)));
}

// out[r][d0 + 16c + l] = (p[r] v)[...] * inv[r] for R rows and C vectors of 16 output features.
// p[r] is a row of probabilities as tpad/2 bf16 pairs; vp holds the values as [tpad/2][D] pairs
// (keys 2k and 2k+1 of feature d at vp[k * D + d]).
template <int R, int C>
void values_block(const u32* const* p, const u32* vp, int half_t, int d, int d0, const float* inv,
                  u16* const* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int k = 0; k < half_t; ++k) {
    __m512i vals[C];
    for (int c = 0; c < C; ++c) vals[c] = _mm512_loadu_si512(vp + k * d + d0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512i pair = _mm512_set1_epi32(static_cast<int>(p[r][k]));
      for (int c = 0; c < C; ++c) acc[r][c] = dot_pairs(acc[r][c], pair, vals[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 scale = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < C; ++c) tb::store_bf16(out[r] + d0 + 16 * c, _mm512_mul_ps(acc[r][c], scale));
  }
}

// Runtime (rows, vectors) -> the template instance; R and C are 1..4.
template <template <int, int> class F, typename... A>
void dispatch(int rows, int vectors, A... args) {
  switch (rows * 4 + vectors) {
#define TB_CASE(R, C) case R * 4 + C: F<R, C>::run(args...); break;
    TB_CASE(1, 1) TB_CASE(1, 2) TB_CASE(1, 3) TB_CASE(1, 4)
    TB_CASE(2, 1) TB_CASE(2, 2) TB_CASE(2, 3) TB_CASE(2, 4)
    TB_CASE(3, 1) TB_CASE(3, 2) TB_CASE(3, 3) TB_CASE(3, 4)
    TB_CASE(4, 1) TB_CASE(4, 2) TB_CASE(4, 3) TB_CASE(4, 4)
#undef TB_CASE
    default: break;
  }
}

template <int R, int C>
struct Scores {
  template <typename... A> static void run(A... args) { scores_block<R, C>(args...); }
};
template <int R, int C>
struct Values {
  template <typename... A> static void run(A... args) { values_block<R, C>(args...); }
};

// One (sequence, head): q/k/v rows at qkv + t * row_stride (+ 0 / width / 2 * width).
void attend_head(const u16* q0, const u16* k0, const u16* v0, long row_stride, int t, int d,
                 const float* bias, float scale, u16* out0, long out_stride, u32* kp, u32* vp,
                 float* scores, u16* probs) {
  const int tpad = (t + 15) / 16 * 16, half_d = d / 2, half_t = tpad / 2;
  // keys as [D/2][tpad] pairs, zero past t; rows a few ahead (q and v too) are fetched while
  // this one is rearranged: freshly written by the projection, they sit in L3 or the other
  // core's L2, a page or more apart (on a 2-core Zen 4 this took the kernel from 2.4-2.6 ms to
  // 1.8-2.2 at [8, 12, 128, 64] right after the projection; ad hoc)
  for (int j = 0; j < t; ++j) {
    if (j + kRowsAhead < t) {
      for (int f = 0; f < 2 * d; f += 64) {
        const long ahead = (j + kRowsAhead) * row_stride;
        _mm_prefetch(reinterpret_cast<const char*>(k0 + ahead) + f, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q0 + ahead) + f, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v0 + ahead) + f, _MM_HINT_T0);
      }
    }
    const u32* key = reinterpret_cast<const u32*>(k0 + j * row_stride);
    for (int p = 0; p < half_d; ++p) kp[p * tpad + j] = key[p];
  }
  for (int p = 0; p < half_d; ++p)
    for (int j = t; j < tpad; ++j) kp[p * tpad + j] = 0;
  // values as [tpad/2][D] pairs of keys (2k, 2k+1), zero past t
  for (int k = 0; k < half_t; ++k) {
    const int j = 2 * k;
    for (int f = 0; f < d; f += 16) {
      const __m256i lo = j < t ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + j * row_stride + f))
                               : _mm256_setzero_si256();
      const __m256i hi = j + 1 < t
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + (j + 1) * row_stride + f))
          : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_storeu_si512(vp + k * d + f, pair);
    }
  }
  for (int i0 = 0; i0 < t; i0 += kQueryBlock) {
    const int rows = t - i0 < kQueryBlock ? t - i0 : kQueryBlock;
    float inv[kQueryBlock];
    for (int i = 0; i < rows; i += 4) {
      const int r = rows - i < 4 ? rows - i : 4;
      const u32* q[4];
      for (int x = 0; x < r; ++x)
        q[x] = reinterpret_cast<const u32*>(q0 + (i0 + i + x) * row_stride);
      for (int j0 = 0; j0 < tpad; j0 += 64) {
        const int c = (tpad - j0) / 16 < 4 ? (tpad - j0) / 16 : 4;
        dispatch<Scores>(r, c, q, (const u32*)kp, half_d, tpad, j0, bias, scale,
                         scores + i * tpad, tpad);
      }
    }
    // softmax numerators in bf16 (pairs for the second product), 1 / denominators kept in fp32
    for (int i = 0; i < rows; ++i) {
      float* s = scores + i * tpad;
      __m512 m = _mm512_set1_ps(-3.0e38f);
      for (int j = 0; j < tpad; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < tpad; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx));
        const __m256bh b = _mm512_cvtneps_pbh(e);
        // sum what the second product will multiply: the bf16-rounded numerators
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(b));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + i * tpad + j), (__m256i)b);
      }
      inv[i] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int i = 0; i < rows; i += 4) {
      const int r = rows - i < 4 ? rows - i : 4;
      const u32* p[4];
      u16* o[4];
      for (int x = 0; x < r; ++x) {
        p[x] = reinterpret_cast<const u32*>(probs + (i + x) * tpad);
        o[x] = out0 + (i0 + i + x) * out_stride;
      }
      for (int d0 = 0; d0 < d; d0 += 64) {
        const int c = (d - d0) / 16 < 4 ? (d - d0) / 16 : 4;
        dispatch<Values>(r, c, p, (const u32*)vp, half_t, d, d0, inv + i, o);
      }
    }
  }
}

// Its q, k and v rows of a (sequence, head) into L2: one 4 KB page or more apart, they are
// beyond the hardware prefetchers, which stop at page boundaries.
void prefetch_rows(const u16* q0, long row_stride, long width, int t, int d) {
  for (int j = 0; j < t; ++j)
    for (int part = 0; part < 3; ++part)
      for (int f = 0; f < d; f += 32)
        _mm_prefetch(reinterpret_cast<const char*>(q0 + j * row_stride + part * width + f),
                     _MM_HINT_T1);
}

}  // namespace

extern "C" {

// Sequences packed back to back in the rows of a fused projection: sequence b is rows
// starts[b] .. starts[b] + lengths[b] - 1 of qkv (bf16, row_stride elements apart), each row
// holding q, k and v of `heads` heads of `d` features (d a multiple of 16). Sequence b's output
// goes to the same rows of out (bf16, out_stride apart, heads * d features). key_bias: fp32,
// sequence b's keys at key_bias + b * bias_stride, added to the scores; or null. Runs on
// `threads` OpenMP threads (torch's intra-op count). Returns 0, or 1 for a d it cannot take, 2
// when out of memory.
int tb_attention_bf16(const u16* qkv, long row_stride, const long* starts, const int* lengths,
                      const float* key_bias, long bias_stride, u16* out, long out_stride,
                      int batch, int heads, int d, float scale, int threads) {
  if (d % 16 != 0 || d > 512) return 1;
  int longest = 0;
  for (int b = 0; b < batch; ++b) longest = lengths[b] > longest ? lengths[b] : longest;
  if (longest == 0) return 0;
  const int most = (longest + 15) / 16 * 16;
  const long width = static_cast<long>(heads) * d;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    // per thread: keys and values rearranged, one block of scores and of numerators, the bias
    const size_t bytes = sizeof(u32) * static_cast<size_t>(most) * d
        + sizeof(float) * (kQueryBlock * most + most) + sizeof(u16) * kQueryBlock * most;
    char* scratch = static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    if (scratch == nullptr) {
#pragma omp atomic write
      failed = 1;
    }
    u32* kp = reinterpret_cast<u32*>(scratch);
    u32* vp = kp + static_cast<size_t>(most) * d / 2;
    float* scores = reinterpret_cast<float*>(vp + static_cast<size_t>(most) * d / 2);
    float* bias = scores + kQueryBlock * most;
    u16* probs = reinterpret_cast<u16*>(bias + most);
    int bias_of = -1;
    const long tasks = static_cast<long>(batch) * heads;
    const int team = omp_get_num_threads();
    // Task = (sequence, head), dealt round-robin: the threads share each sequence's heads, so
    // sequences of different lengths balance, and a thread knows its next task.
#pragma omp for schedule(static, 1)
    for (long task = 0; task < tasks; ++task) {
      const int b = static_cast<int>(task / heads), h = static_cast<int>(task % heads);
      const int t = lengths[b];
      if (scratch == nullptr || t == 0) continue;
      if (task + team < tasks) {  // fetch the next task's rows while this one computes
        const int nb = static_cast<int>((task + team) / heads);
        const int nh = static_cast<int>((task + team) % heads);
        prefetch_rows(qkv + starts[nb] * row_stride + nh * d, row_stride, width, lengths[nb], d);
      }
      const int tpad = (t + 15) / 16 * 16;
      if (bias_of != b) {  // build a sequence's bias once for its heads
        for (int j = 0; j < tpad; ++j)
          bias[j] = j >= t ? -3.0e38f : (key_bias ? key_bias[b * bias_stride + j] : 0.0f);
        bias_of = b;
      }
      const u16* row0 = qkv + starts[b] * row_stride + h * d;
      attend_head(row0, row0 + width, row0 + 2 * width, row_stride, t, d, bias, scale,
                  out + starts[b] * out_stride + h * d, out_stride, kp, vp, scores, probs);
    }
    std::free(scratch);
  }
  return failed ? 2 : 0;
}

}  // extern "C"

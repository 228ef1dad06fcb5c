// One batch-1 decode step of a GPT-2 or Llama decoder in one call, or a short prompt of one
// sequence, for x86 CPUs with AVX-512 (built and loaded by torchbridge/kernels/__init__.py,
// driven by generation/native_step.py).
//
// A decode step streams every weight once. Compiled by inductor, the step's kernels read them at
// the memory's rate, but each step also paid its Python wrapper (~400 buffer views and
// allocations) and dynamo's entry: ~1 ms of a 13 ms fp32 GPT-2 step, and more of an int8 one.
// Here the whole step is C++: the projections are row-parallel GEMVs (OpenMP, the caller's thread
// count), everything between them runs on the calling thread (a token's LayerNorm, RoPE and
// attention are microseconds). Arithmetic follows generation/decoders.py: fp32 activations; float
// and int8-weight-only weights converted to fp32 in registers; int8-dynamic projections quantize
// the token on the module's per-token asymmetric grid and multiply its uint8 levels by the int8
// weight with AVX512_VNNI `vpdpbusd`, accumulated exactly in int32.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

using tb::load_bf16;
using tb::u16;

enum Format : int32_t { FP32 = 0, BF16 = 1, INT8_WEIGHT_ONLY = 2, INT8_DYNAMIC = 3 };
enum Act : int32_t { GELU_TANH = 0, GELU_ERF = 1, SILU = 2, RELU = 3 };
enum Family : int32_t { GPT2 = 0, LLAMA = 1 };

// Mirrored by ctypes structures in generation/native_step.py: change both together.
struct Proj {  // y[out] = x[in] . W[out, in] (* scales) + bias
  int32_t format, out, in, reserved;
  const void* weight;        // [out, in] row-major: fp32, bf16 or int8
  const float* scales;       // [out] per output channel (int8), else null
  const float* bias;         // [out] or null
  const int32_t* row_sums;   // [out] sum of each int8 row (int8 dynamic: the zero point's share)
  const float* inv_smooth;   // [in] or null (int8 dynamic: SmoothQuant scales, divided out)
};

struct Group {  // projections of one input written side by side (q|k|v, gate|up)
  int32_t parts, reserved;
  Proj part[3];
};

struct Layer {
  Group qkv, o, up, down;  // up: c_fc (GPT-2) or gate|up (Llama)
  const float *norm1_w, *norm1_b, *norm2_w, *norm2_b;  // biases null for RMSNorm
  float attn_scale, reserved;
};

struct Model {
  int32_t family, act, layers, hidden, heads, kv_heads, head_dim, inter, vocab, embed_format;
  int32_t max_positions, reserved;  // max_positions: GPT-2's table, 0 for none
  float eps, rope_scaling;
  const Layer* layer;
  const void* embed;      // [vocab, hidden] fp32 or bf16 (embed_format)
  const void* positions;  // GPT-2: [max_positions, hidden], same format; else null
  const float* inv_freq;  // Llama: [head_dim / 2]
  const float *norm_w, *norm_b;
  Group head;
};

// A GEMV reads kStreams rows at once, each from its own kStreams-th of the weight: far-apart
// streams keep more memory requests in flight than adjacent rows, which the prefetcher sees as
// one stream (GPT-2's 124M fp32 weights, 2 threads, ad hoc: 45 GB/s against 30 for blocks of 4
// adjacent rows and 36 for one row at a time; 42 for 8 streams).
constexpr int kStreams = 4;
// Tokens of a prompt a GEMV block computes per pass over its weight rows (kStreams x kTokens
// accumulators: 16 of the 32 vector registers).
constexpr int kTokens = 4;

inline __mmask16 tail_mask(int remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

inline __m512 load_weights(const Proj& p, int row, int k, __mmask16 m) {
  switch (p.format) {
    case FP32:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p.weight) + size_t(row) * p.in + k);
    case BF16:
      return load_bf16(static_cast<const u16*>(p.weight) + size_t(row) * p.in + k, m);
    default: {  // int8 weight-only
      const int8_t* w = static_cast<const int8_t*>(p.weight) + size_t(row) * p.in + k;
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w)));
    }
  }
}

// Rows rows[0..N) of a float or int8-weight-only projection for T tokens (rows of x at
// x_stride): out[t * N + r] = x[t] . W[rows[r]]. Each weight vector is loaded and converted once
// for the T tokens.
template <int F, int N, int T>
void float_block(const Proj& p, const float* x, long x_stride, const int* rows, float* out) {
  Proj q = p;
  q.format = F;  // the switch in load_weights folds away per instantiation
  __m512 acc[T][N];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < N; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int k = 0; k < p.in; k += 16) {
    const __mmask16 m = tail_mask(p.in - k);
    __m512 w[N];
    for (int r = 0; r < N; ++r) w[r] = load_weights(q, rows[r], k, m);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * x_stride + k);
      for (int r = 0; r < N; ++r) acc[t][r] = _mm512_fmadd_ps(xv, w[r], acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < N; ++r) out[t * N + r] = _mm512_reduce_add_ps(acc[t][r]);
}

// Rows rows[0..N) of an int8-dynamic projection for T tokens' codes (p.in bytes apart):
// out[t * N + r] = codes[t] . W[rows[r]], in int32.
template <int N, int T>
void int8_block(const Proj& p, const uint8_t* codes, const int* rows, int32_t* out) {
  const int8_t* w = static_cast<const int8_t*>(p.weight);
  __m512i acc[T][N];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < N; ++r) acc[t][r] = _mm512_setzero_si512();
  for (int k = 0; k < p.in; k += 64) {
    const __mmask64 m = p.in - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (p.in - k)) - 1;
    __m512i wv[N];
    for (int r = 0; r < N; ++r) wv[r] = _mm512_maskz_loadu_epi8(m, w + size_t(rows[r]) * p.in + k);
    for (int t = 0; t < T; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi8(m, codes + long(t) * p.in + k);
      for (int r = 0; r < N; ++r) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], xv, wv[r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < N; ++r) out[t * N + r] = _mm512_reduce_add_epi32(acc[t][r]);
}

template <int N, int T>
void block(const Proj& p, const float* x, long x_stride, const uint8_t* codes, const int* rows,
           float* raw, int32_t* sums) {
  switch (p.format) {
    case FP32: float_block<FP32, N, T>(p, x, x_stride, rows, raw); break;
    case BF16: float_block<BF16, N, T>(p, x, x_stride, rows, raw); break;
    case INT8_WEIGHT_ONLY: float_block<INT8_WEIGHT_ONLY, N, T>(p, x, x_stride, rows, raw); break;
    default: int8_block<N, T>(p, codes, rows, sums); break;
  }
}

// Tokens [t0, t0 + T) of rows rows[0..N): T in 1..kTokens, the template instance at run time.
template <int N>
void block_tokens(int tokens, const Proj& p, const float* x, long x_stride, const uint8_t* codes,
                  const int* rows, float* raw, int32_t* sums) {
  switch (tokens) {
    case 1: block<N, 1>(p, x, x_stride, codes, rows, raw, sums); break;
    case 2: block<N, 2>(p, x, x_stride, codes, rows, raw, sums); break;
    case 3: block<N, 3>(p, x, x_stride, codes, rows, raw, sums); break;
    default: block<N, kTokens>(p, x, x_stride, codes, rows, raw, sums); break;
  }
}

// The token on the module's grid (precisions/int8_dynamic.py: asymmetric_grid, quantize_tokens):
// codes = clamp(round(x / scale) + zero, 0, 255), x ~ (codes - zero) * scale.
void quantize_token(const Proj& p, const float* x, uint8_t* codes, float* scratch, float* scale,
                    float* zero) {
  const float* v = x;
  if (p.inv_smooth) {
    for (int k = 0; k < p.in; ++k) scratch[k] = x[k] * p.inv_smooth[k];
    v = scratch;
  }
  __m512 low = _mm512_set1_ps(v[0]), high = low;
  for (int k = 0; k < p.in; k += 16) {
    const __mmask16 m = tail_mask(p.in - k);
    low = _mm512_mask_min_ps(low, m, low, _mm512_maskz_loadu_ps(m, v + k));
    high = _mm512_mask_max_ps(high, m, high, _mm512_maskz_loadu_ps(m, v + k));
  }
  const float lo = std::fmin(_mm512_reduce_min_ps(low), 0.0f);
  const float s = std::fmax((std::fmax(_mm512_reduce_max_ps(high), 0.0f) - lo) / 255.0f, 1e-8f);
  const float z = std::nearbyint(-lo / s);
  const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
  for (int k = 0; k < p.in; k += 16) {
    const __mmask16 m = tail_mask(p.in - k);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, v + k), sv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zv), _mm512_setzero_ps()),
                      _mm512_set1_ps(255.0f));
    _mm_mask_storeu_epi8(codes + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
  *scale = s;
  *zero = z;
}

// y = group(x), or y += group(x) (the residual add), for `count` tokens (rows of x and y at
// the given strides). Parts write side by side. `work`: (2 + count) floats per input feature and
// 2 per token. Each block of weight rows is read from memory once for all the tokens.
void project(const Group& g, const float* x, long x_stride, float* y, long y_stride, int count,
             bool accumulate, float* work, int threads) {
  for (int i = 0; i < g.parts; ++i) {
    const Proj& p = g.part[i];
    float* scale = work + 2L * p.in;
    float* zero = scale + count;
    uint8_t* codes = reinterpret_cast<uint8_t*>(zero + count);
    if (p.format == INT8_DYNAMIC)
      for (int t = 0; t < count; ++t)
        quantize_token(p, x + t * x_stride, codes + long(t) * p.in, work, scale + t, zero + t);
    // step i < chunk reads rows i, chunk + i, ...; the steps after it one leftover row each
    const int chunk = p.out / kStreams, leftover = p.out - chunk * kStreams;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < chunk + leftover; ++i) {
      int rows[kStreams], n = 1;
      if (i < chunk) {
        for (int r = 0; r < kStreams; ++r) rows[r] = r * chunk + i;
        n = kStreams;
      } else {
        rows[0] = kStreams * chunk + (i - chunk);
      }
      for (int t0 = 0; t0 < count; t0 += kTokens) {
        const int tokens = count - t0 < kTokens ? count - t0 : kTokens;
        float raw[kTokens * kStreams];
        int32_t sums[kTokens * kStreams];
        const float* xt = x + t0 * x_stride;
        const uint8_t* ct = codes + long(t0) * p.in;
        if (n == kStreams)
          block_tokens<kStreams>(tokens, p, xt, x_stride, ct, rows, raw, sums);
        else
          block_tokens<1>(tokens, p, xt, x_stride, ct, rows, raw, sums);
        for (int tt = 0; tt < tokens; ++tt) {
          const int t = t0 + tt;
          float* yt = y + t * y_stride;
          for (int r = 0; r < n; ++r) {
            const int o = rows[r], at = tt * n + r;
            float v;
            if (p.format == INT8_DYNAMIC)  // (codes - zero) . W, exact in int32, then rescaled
              v = float(sums[at] - int32_t(zero[t]) * p.row_sums[o]) * (scale[t] * p.scales[o]);
            else
              v = p.scales ? raw[at] * p.scales[o] : raw[at];
            if (p.bias) v += p.bias[o];
            yt[o] = accumulate ? yt[o] + v : v;
          }
        }
      }
    }
    y += p.out;
  }
}

void layer_norm(const float* x, const float* w, const float* b, float eps, int n, float* out) {
  float mean = 0.0f;
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= float(n);
  float var = 0.0f;
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(var / float(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

void rms_norm(const float* x, const float* w, float eps, int n, float* out) {
  float squares = 0.0f;
  for (int i = 0; i < n; ++i) squares += x[i] * x[i];
  const float r = 1.0f / std::sqrt(squares / float(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

void normalize(const Model& m, const float* x, const float* w, const float* b, float* out) {
  if (m.family == GPT2)
    layer_norm(x, w, b, m.eps, m.hidden, out);
  else
    rms_norm(x, w, m.eps, m.hidden, out);
}

// tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|) <= 1 (the range exp512 is written for)
inline __m512 tanh512(__m512 y) {
  const __m512 a = _mm512_abs_ps(y);
  const __m512 e = tb::exp512(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e),
                                 _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(t),
      _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(int32_t(0x80000000u)))));
}

// sigmoid(x) from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below
inline __m512 sigmoid512(__m512 x) {
  const __m512 e = tb::exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_blend_ps(neg, _mm512_set1_ps(1.0f), e), d);
}

// x[i] = act(x[i]) * (gate_of ? mult[i] : 1) for i < n
void activate(int act, float* x, const float* mult, int n) {
  int i = 0;
  if (act != GELU_ERF) {
    for (; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
      __m512 y;
      if (act == GELU_TANH) {
        const __m512 inner = _mm512_mul_ps(
            _mm512_set1_ps(0.7978845608028654f),
            _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
        y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                          _mm512_add_ps(_mm512_set1_ps(1.0f), tanh512(inner)));
      } else if (act == SILU) {
        y = _mm512_mul_ps(v, sigmoid512(v));
      } else {
        y = _mm512_max_ps(v, _mm512_setzero_ps());
      }
      if (mult) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, mult + i));
      _mm512_mask_storeu_ps(x + i, m, y);
    }
    return;
  }
  for (; i < n; ++i) {
    const float y = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.7071067811865476f));
    x[i] = mult ? y * mult[i] : y;
  }
}

// HF's apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin, in fp32.
void rope(const Model& m, float* x, int64_t position) {
  const int half = m.head_dim / 2;
  for (int j = 0; j < half; ++j) {
    const float f = float(position) * m.inv_freq[j];
    const float c = std::cos(f) * m.rope_scaling, s = std::sin(f) * m.rope_scaling;
    const float a = x[j], b = x[j + half];
    x[j] = a * c - b * s;
    x[j + half] = b * c + a * s;
  }
}

float dot(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// A query at `slot` against its kv head's cache [length, d]: softmax(q k^T * scale) v over the
// slots it may read: up to its own, valid ones (left padding is not), and always its own (a
// padding query of a prompt sees itself only, as the decoder's prefill has it).
void attend(const Model& m, const float* q, const float* keys, const float* values,
            const uint8_t* valid, int64_t slot, int64_t length, float scale, float* scores,
            float* out) {
  const int d = m.head_dim;
  float top = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    if (j > slot || (!valid[j] && j != slot)) {
      scores[j] = -INFINITY;
      continue;
    }
    scores[j] = dot(q, keys + j * d, d) * scale;
    top = std::fmax(top, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < length; ++j) {
    scores[j] = scores[j] == -INFINITY ? 0.0f : std::exp(scores[j] - top);
    total += scores[j];
  }
  for (int k = 0; k < d; ++k) out[k] = 0.0f;
  for (int64_t j = 0; j < length; ++j) {
    if (scores[j] == 0.0f) continue;
    const float p = scores[j] / total;
    for (int k = 0; k < d; ++k) out[k] += p * values[j * d + k];
  }
}

void embed_row(const Model& m, const void* table, int64_t row, float* out, bool add) {
  for (int i = 0; i < m.hidden; ++i) {
    float v;
    if (m.embed_format == BF16) {
      const uint32_t bits = uint32_t(static_cast<const u16*>(table)[row * m.hidden + i]) << 16;
      std::memcpy(&v, &bits, 4);
    } else {
      v = static_cast<const float*>(table)[row * m.hidden + i];
    }
    out[i] = add ? out[i] + v : v;
  }
}

// The widest activation of a step: gate|up, the MLP's input, or the attention's output.
long widest(const Model& m) {
  long wide = 2L * m.inter;
  if (long(m.heads) * m.head_dim > wide) wide = long(m.heads) * m.head_dim;
  return m.hidden > wide ? m.hidden : wide;
}

}  // namespace

extern "C" {

// Scratch floats tb_decode_tokens needs for `count` tokens and a cache of `length` slots.
long tb_decode_scratch(const Model* m, long count, long length) {
  const long wide = widest(*m);
  const long per_token = 3L * m->hidden + long(2 * m->heads + 2 * m->kv_heads) * m->head_dim + wide;
  return count * per_token + (2 + count) * wide + 2 * count + length;
}

// `count` tokens of one sequence at model positions positions[], written to cache slots
// first_slot .. first_slot + count - 1 of caches k[layer], v[layer] ([kv_heads, length,
// head_dim] fp32 each): one decode step (count 1) or a short prompt. valid[length] marks the
// slots a query may read (left padding is false). Writes the last token's logits[vocab] and its
// greedy next token (the first maximum among tokens not banned[]). Returns 0, or 1 for a token,
// position or slot out of range.
int tb_decode_tokens(const Model* model, const int64_t* tokens, const int64_t* positions,
                     int64_t count, int64_t first_slot, int64_t length, float* const* k_cache,
                     float* const* v_cache, const uint8_t* valid, const uint8_t* banned,
                     float* scratch, float* logits, int64_t* next_token, int threads) {
  const Model& m = *model;
  if (count < 1 || first_slot < 0 || first_slot + count > length) return 1;
  for (int64_t t = 0; t < count; ++t)
    if (tokens[t] < 0 || tokens[t] >= m.vocab || positions[t] < 0 ||
        (m.max_positions && positions[t] >= m.max_positions))
      return 1;
  const int c = m.hidden, d = m.head_dim, n = int(count);
  const long wide = widest(m), qw = long(m.heads + 2 * m.kv_heads) * d, aw = long(m.heads) * d;
  float* h = scratch;
  float* x = h + n * long(c);
  float* qkv = x + n * long(c);
  float* att = qkv + n * qw;
  float* mid = att + n * aw + n * long(c);
  float* work = mid + n * wide;
  float* scores = work + (2 + n) * wide + 2 * n;

  for (int t = 0; t < n; ++t) {
    embed_row(m, m.embed, tokens[t], h + t * long(c), false);
    if (m.positions) embed_row(m, m.positions, positions[t], h + t * long(c), true);
  }
  const int group = m.heads / m.kv_heads;
  for (int l = 0; l < m.layers; ++l) {
    const Layer& layer = m.layer[l];
    for (int t = 0; t < n; ++t)
      normalize(m, h + t * long(c), layer.norm1_w, layer.norm1_b, x + t * long(c));
    project(layer.qkv, x, c, qkv, qw, n, false, work, threads);
    for (int t = 0; t < n; ++t) {
      float* q = qkv + t * qw;
      float* k = q + aw;
      float* v = k + long(m.kv_heads) * d;
      const int64_t slot = first_slot + t;
      if (m.family == LLAMA) {
        for (int i = 0; i < m.heads; ++i) rope(m, q + long(i) * d, positions[t]);
        for (int i = 0; i < m.kv_heads; ++i) rope(m, k + long(i) * d, positions[t]);
      }
      for (int i = 0; i < m.kv_heads; ++i) {
        std::memcpy(k_cache[l] + (i * length + slot) * d, k + long(i) * d, d * sizeof(float));
        std::memcpy(v_cache[l] + (i * length + slot) * d, v + long(i) * d, d * sizeof(float));
      }
    }
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < m.heads; ++i) {
        const long kv = long(i / group) * length * d;
        attend(m, qkv + t * qw + long(i) * d, k_cache[l] + kv, v_cache[l] + kv, valid,
               first_slot + t, length, layer.attn_scale, scores, att + t * aw + long(i) * d);
      }
    project(layer.o, att, aw, h, c, n, true, work, threads);
    for (int t = 0; t < n; ++t)
      normalize(m, h + t * long(c), layer.norm2_w, layer.norm2_b, x + t * long(c));
    project(layer.up, x, c, mid, wide, n, false, work, threads);
    for (int t = 0; t < n; ++t)
      activate(m.act, mid + t * wide, m.family == LLAMA ? mid + t * wide + m.inter : nullptr,
               m.inter);
    project(layer.down, mid, wide, h, c, n, true, work, threads);
  }
  normalize(m, h + (n - 1) * long(c), m.norm_w, m.norm_b, x);
  project(m.head, x, c, logits, m.vocab, 1, false, work, threads);
  int64_t best = -1;
  float top = -INFINITY;
  for (int64_t i = 0; i < m.vocab; ++i) {
    if (banned[i]) continue;
    if (best < 0 || logits[i] > top || (std::isnan(logits[i]) && !std::isnan(top))) {
      best = i;
      top = logits[i];
    }
  }
  *next_token = best < 0 ? 0 : best;
  return 0;
}

}  // extern "C"

// LayerNorm(x + residual) over rows of bf16, in fp32, for x86 CPUs with AVX512_BF16 (built and
// loaded by torchbridge/kernels/__init__.py).
//
// The post-LN encoder block (BERT, RoBERTa) ends in LayerNorm(dense(h) + h). torch runs the add
// and the LayerNorm as two passes over the rows, or oneDNN adds the residual inside the GEMM's
// epilogue, which on a 2-core Zen 4 cost twice a separate add (ad hoc, 1,024 x 768 rows). Here a
// thread takes a row, adds the two in fp32 (the sum is not rounded to bf16 in between), keeps
// the sum in an L1 buffer for the mean, the variance (two-pass, as torch computes it) and the
// normalized output, and writes bf16 rounded to nearest even.

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using tb::load_bf16;
using tb::store_bf16;
using tb::u16;

void add_layer_norm_row(const u16* x, const u16* residual, const u16* gamma, const u16* beta,
                        float eps, int width, float* sum, u16* out) {
  __m512 total = _mm512_setzero_ps();
  for (int i = 0; i < width; i += 16) {
    const __m512 s = _mm512_add_ps(load_bf16(x + i), load_bf16(residual + i));
    _mm512_storeu_ps(sum + i, s);
    total = _mm512_add_ps(total, s);
  }
  const float mean = _mm512_reduce_add_ps(total) / static_cast<float>(width);
  const __m512 m = _mm512_set1_ps(mean);
  __m512 squares = _mm512_setzero_ps();
  for (int i = 0; i < width; i += 16) {
    const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(sum + i), m);
    squares = _mm512_fmadd_ps(c, c, squares);
  }
  const float variance = _mm512_reduce_add_ps(squares) / static_cast<float>(width);
  const __m512 rstd = _mm512_set1_ps(1.0f / __builtin_sqrtf(variance + eps));
  for (int i = 0; i < width; i += 16) {
    const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sum + i), m), rstd);
    const __m512 y = _mm512_fmadd_ps(c, load_bf16(gamma + i), load_bf16(beta + i));
    store_bf16(out + i, y);
  }
}

}  // namespace

extern "C" {

// out[r] = LayerNorm(x[r] + residual[r]) * gamma + beta for r < rows; rows of `width` bf16
// (a multiple of 16) at the given strides (in elements), gamma and beta bf16.
// Returns 0, or 1 when width is not a positive multiple of 16.
int tb_add_layer_norm_bf16(const u16* x, long x_stride, const u16* residual, long residual_stride,
                           const u16* gamma, const u16* beta, float eps, u16* out,
                           long out_stride, long rows, int width, int threads) {
  if (width <= 0 || width % 16) return 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> sum(width);
#pragma omp for schedule(static)
    for (long r = 0; r < rows; ++r)
      add_layer_norm_row(x + r * x_stride, residual + r * residual_stride, gamma, beta, eps, width,
                         sum.data(), out + r * out_stride);
  }
  return 0;
}

}  // extern "C"

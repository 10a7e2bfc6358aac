// The 4-bit (and 8-bit) layers' many-token path (q4.cpp has the layout and the decode kernels): blocks of
// rows dequantized (to float32, or straight to bfloat16 for the bfloat16 GEMM) and multiplied with the BLAS
// GEMM, a LoRDBA branch's folded factors joining it as more inputs (q4_branch's `fast` prefill); and
// `q4_dequant`, the whole float32 weight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "q4.h"
#include "q4_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lordba_q4 {
namespace {

#if defined(__AVX512F__)
// 16 float32 rounded to bfloat16 (to nearest, ties to even: what at::Tensor::to and the GEMM's own
// conversions give for finite values, which dequantized weights are).
inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  return bf16_words(v);
#endif
}

// The first n of v's 16 lanes (all where n >= 16, none where n <= 0) stored at d: float32, or bfloat16 (to_bf16).
inline void store_lanes(float* d, __m512 v, int64_t n) {
  if (n >= 16) return _mm512_storeu_ps(d, v);
  if (n > 0) _mm512_mask_storeu_ps(d, static_cast<__mmask16>((1u << n) - 1), v);
}
inline void store_lanes(c10::BFloat16* d, __m512 v, int64_t n) {
  const __m256i h = to_bf16(v);
  if (n >= 16) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), h);
  if (n > 0) std::memcpy(d, lanes, static_cast<size_t>(n) * sizeof(uint16_t));
}
#endif

// [rows o0..o1, in] of the dequantized weight, into dst (row stride `ld`, default `in`): float32, or
// (Out = c10::BFloat16, the bfloat16 GEMM's block) those float32 values rounded to bfloat16 as they
// are written, which is what rounding the float32 block afterwards gave, without its pass.
template <typename Out>
void dequant_rows(const Packed& p, int64_t o0, int64_t o1, Out* dst, int64_t ld = 0) {
  if (ld == 0) ld = p.in;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* q = p.q + o * p.row_bytes;
    Out* d = dst + (o - o0) * ld;
    for (int64_t g = 0; g < p.groups; ++g) {
      const float s = half_to_float(p.s[o * p.groups + g]), m = half_to_float(p.m[o * p.groups + g]);
      for (int64_t k = g * p.group; k < (g + 1) * p.group && k < p.in; k += kChunk) {
#if defined(__AVX512F__)
        __m512i lo_i, hi_i;
        if (p.bits == 4) {
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
          lo_i = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
          hi_i = _mm512_srli_epi32(bytes, 4);
        } else {
          lo_i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
          hi_i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16)));
        }
        const __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
        const int64_t left = p.in - k;  // the padded tail: only the inputs below `in` are written
        store_lanes(d + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_i), vs, vm), left);
        store_lanes(d + k + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi_i), vs, vm), left - 16);
#else
#if defined(LORDBA_Q4_AVX2)
        if constexpr (std::is_same_v<Out, float>) {  // AVX2: the same s * q + m, one rounding (FMA)
          __m256 w[4];
          if (p.bits == 4) {
            avx2::codes<4>(q, k, w);
          } else {
            avx2::codes<8>(q, k, w);
          }
          const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
          for (int j = 0; j < 4; ++j) avx2::store_first(d + k + 8 * j, _mm256_fmadd_ps(w[j], vs, vm), p.in - k - 8 * j);
          continue;
        }
#endif
        if (k + kChunk <= p.in && p.bits == 4) {  // a whole chunk: no conditions, so the compiler vectorizes it
          for (int64_t j = 0; j < 16; ++j) {
            d[k + j] = static_cast<Out>(s * static_cast<float>(q[k / 2 + j] & 15) + m);
            d[k + j + 16] = static_cast<Out>(s * static_cast<float>(q[k / 2 + j] >> 4) + m);
          }
          continue;
        }
        for (int64_t j = 0; j < 16; ++j) {
          const int lo = p.bits == 4 ? (q[k / 2 + j] & 15) : q[k + j];
          const int hi = p.bits == 4 ? (q[k / 2 + j] >> 4) : q[k + j + 16];
          if (k + j < p.in) d[k + j] = static_cast<Out>(s * static_cast<float>(lo) + m);
          if (k + j + 16 < p.in) d[k + j + 16] = static_cast<Out>(s * static_cast<float>(hi) + m);
        }
#endif
      }
    }
  }
}

// Rows [o0, o1) of the GEMM's weight block [W | B' | 0] (row stride K) into dst: the dequantized rows,
// then (bp: B' [out, r] in bfloat16, else nothing) each row's r columns of B' and zeros up to K.
template <typename Out>
void block_rows(const Packed& p, int64_t o0, int64_t o1, Out* dst, int64_t K, const c10::BFloat16* bp, int64_t r) {
  dequant_rows(p, o0, o1, dst, K);
  if (bp == nullptr) return;
  for (int64_t o = o0; o < o1; ++o) {
    Out* row = dst + (o - o0) * K + p.in;
    std::copy(bp + o * r, bp + (o + 1) * r, row);
    std::fill(row + r, row + (K - p.in), Out(0.f));
  }
}

// [x | h | 0] into xin [T, K] by at::mm (h = x A'^T in xin's dtype), where input_with_h cannot run. h is
// computed from x rounded into a tensor of its own, then copied: at::mm on xin's first `in` columns (a strided
// view) reads past them in torch 2.13's bfloat16 path (whole tokens of h came out wrong, NaN where xin's other
// columns held garbage), and mm_out straight into xin's columns shares xin's storage with that input.
void input_with_mm(const at::Tensor& x2, const at::Tensor& A, int64_t in, at::Tensor& xin) {
  const int64_t r = A.size(0), K = xin.size(1);
  const at::Tensor xr = x2.to(xin.scalar_type()).contiguous();
  xin.narrow(1, 0, in).copy_(xr);
  xin.narrow(1, in, r).copy_(at::mm(xr, A.to(xin.scalar_type()).t()));
  xin.narrow(1, in + r, K - in - r).zero_();
}

}  // namespace

// Many tokens: dequantize blocks of rows and multiply with the BLAS GEMM, in float32 or (bf16) with the
// block (dequantized straight to bfloat16) and the input rounded to bfloat16 (oneDNN's bf16 GEMM: 4x the
// float32 GEMM's speed on a CPU with AVX512_BF16; the output is rounded to bfloat16 too). The 4-bit weight
// is exact in float32; bfloat16 rounds it and the input to 8 significant bits, far below the 4-bit
// quantization error.
//
// With a LoRDBA branch (folded factors A' [r, in], B' [out, r], bfloat16; q4_branch's `fast`
// prefill) the branch joins the GEMM as r more inputs: h = x A'^T (prefill.cpp's pass on the tile
// unit, else at::mm), then y = [x | h] [W | B']^T block by block, so its second product costs r / in
// of the base GEMM instead of a skinny GEMM and a pass over the output of its own (SmolLM2-135M's
// 512-token prefill, docs/kernels.md), rounded as the base is.
void gemm(const Packed& p, const at::Tensor& x2, at::Tensor& y, bool bf16, const at::Tensor* A, const at::Tensor* B,
          const uint32_t* packedA) {
  const int64_t r = A != nullptr ? A->size(0) : 0;
  // With a branch, K = in + r padded with zero columns to a multiple of 32 (oneDNN's bfloat16 GEMM
  // runs SmolLM2's K = 608 faster than 592; zeros add nothing to the sums).
  const int64_t K = r > 0 ? (p.in + r + 31) / 32 * 32 : p.in;
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(p.out, (1 << 20) / std::max<int64_t>(K, 1)));
  // bf16: the block is dequantized straight to bfloat16 (the GEMM's operand), no float32 block to round
  at::Tensor w = at::empty({block, K}, x2.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor xin;
  if (A == nullptr) {
    xin = bf16 ? x2.to(at::kBFloat16) : x2;
  } else {  // [x | h | 0], h = x A'^T written in place (no concatenation): on the tile unit where it runs
    const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
    xin = at::empty({x2.size(0), K}, x2.options().dtype(dtype));
    if (!bf16 || !input_with_h(x2.data_ptr<float>(), x2.size(0), p.in, A->data_ptr<at::BFloat16>(), r,
                               xin.data_ptr<at::BFloat16>(), K, packedA))
      input_with_mm(x2, *A, p.in, xin);
  }
  const c10::BFloat16* bp = B != nullptr ? B->data_ptr<at::BFloat16>() : nullptr;  // [out, r]
  for (int64_t o0 = 0; o0 < p.out; o0 += block) {
    const int64_t o1 = std::min(p.out, o0 + block);
    at::parallel_for(o0, o1, 16, [&](int64_t a, int64_t b) {
      if (bf16)
        block_rows(p, a, b, w.data_ptr<at::BFloat16>() + (a - o0) * K, K, bp, r);
      else
        block_rows(p, a, b, w.data_ptr<float>() + (a - o0) * K, K, bp, r);
    });
    y.narrow(1, o0, o1 - o0).copy_(at::mm(xin, w.narrow(0, 0, o1 - o0).t()));
  }
}

// The whole float32 weight [out, in] (the op lordba::q4_dequant).
at::Tensor q4_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minus, int64_t in,
                      int64_t bits) {
  const Packed p = unpack_args(qweight, scale, minus, in, bits);
  at::Tensor w = at::empty({p.out, p.in}, qweight.options().dtype(at::kFloat));
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, p.out, 16, [&](int64_t o0, int64_t o1) { dequant_rows<float>(p, o0, o1, dst + o0 * p.in); });
  return w;
}

}  // namespace lordba_q4

// A dense (unquantized) linear layer and its one LoRDBA adapter in one call: `lordba::linear_branch`.
//
//   y = x W^T (+ bias) + s * a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))
//
// One float32 token on an AVX-512 or AVX2 build (decode on a float32 base): the layer's GEMV is computed here,
// blocks of 16 rows on every thread, and each thread adds the branch's output stage to the block it
// has just computed (RowBranch::add_rows, as q4.cpp's one-token path does): the branch's signs and
// scales are read while the weight streams, and there is no second pass over the output. The GEMV is
// memory-bound (4 bytes per weight), so its speed is the weight's bandwidth, as MKL's; its sums run in
// another order than MKL's, so the result equals at::linear then the branch up to float32 rounding.
// Otherwise (more tokens, other dtypes, other builds) the layer's product is at::linear (what
// nn.Linear computes) and the branch is added into that fresh output by the `branch` op's own code:
// bit for bit the layer and the op called one after the other. Either way one dispatch per layer and
// token instead of a module call and an op call (decode runs ~210 adapted layers per token).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "branch.h"
#include "q4.h"
#include "warm.h"

#include <algorithm>
#include <cstdint>

#include "q4_rows.h"

namespace lordba_linear {
namespace {

constexpr int64_t kRowBlock = lordba::RowBranch::kRows;
constexpr int64_t kTileMinTokens = 16;  // the tile path's blocks are 32 tokens; fewer stay float32 (TILE_MIN_TOKENS)

#if defined(__AVX512F__) || defined(LORDBA_Q4_AVX2)
#define LORDBA_LINEAR_ONE_TOKEN 1
// y[o] = w[o] · x (+ bias[o]) for the rows o in [o0, o1): NR rows at a time, each weight row read once.
template <int NR>
inline void dense_rows(const float* w, const float* x, int64_t in, int64_t o, const float* bias, float* y) {
#if defined(LORDBA_Q4_AVX2)
  namespace avx2 = lordba_q4::avx2;
  const int64_t full = in - in % 8;
  __m256 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm256_setzero_ps();
  const float* rows[NR];
  for (int i = 0; i < NR; ++i) rows[i] = w + (o + i) * in;
  for (int64_t k = 0; k < full; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[i] + k), xv, acc[i]);
  }
  if (full < in) {
    const __m256 xv = avx2::load_first(x + full, in - full);
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(avx2::load_first(rows[i] + full, in - full), xv, acc[i]);
  }
  for (int i = 0; i < NR; ++i) y[o + i] = avx2::sum(acc[i]) + (bias != nullptr ? bias[o + i] : 0.f);
#else
  const int64_t full = in - in % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in % 16)) - 1u);
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const float* rows[NR];
  for (int i = 0; i < NR; ++i) rows[i] = w + (o + i) * in;
  for (int64_t k = 0; k < full; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[i] + k), xv, acc[i]);
  }
  if (tail != 0) {
    const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, rows[i] + full), xv, acc[i]);
  }
  for (int i = 0; i < NR; ++i) y[o + i] = _mm512_reduce_add_ps(acc[i]) + (bias != nullptr ? bias[o + i] : 0.f);
#endif
}

// One float32 token: the GEMV and the branch's output stage, block by block (see the top). false where
// this path does not apply (the caller computes at::linear and branch_add).
bool one_token(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
               const at::Tensor& a, double scaling, int64_t sign_max_tokens, at::Tensor& y) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || x.numel() != in || in == 0) return false;
  if (!x.is_contiguous() || !weight.is_contiguous()) return false;
  if (bias.has_value() && (bias->scalar_type() != at::kFloat || !bias->is_contiguous() || bias->numel() != out))
    return false;
  lordba_warm::warm_tensors({{weight}, {sign_A}, {sign_B}, {a}, {b, lordba_warm::kScaleBytes},
                             {m, lordba_warm::kScaleBytes}});
  lordba::RowBranch::warm_buffers(1);
  lordba::RowBranch branch;
  if (!branch.prepare(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, out)) return false;
  auto shape = x.sizes().vec();
  shape.back() = out;
  y = at::empty(shape, x.options());
  const float* wp = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + kRowBlock - 1) / kRowBlock, 1, [&](int64_t k0, int64_t k1) {
    branch.start(k0, k1);
    const int64_t o1 = std::min(out, k1 * kRowBlock);
    int64_t o = k0 * kRowBlock;
    for (; o + 4 <= o1; o += 4) dense_rows<4>(wp, xp, in, o, bp, yp);
    for (; o < o1; ++o) dense_rows<1>(wp, xp, in, o, bp, yp);
    branch.add_rows(k0, k1, yp);
  });
  return true;
}
#endif

// M (bfloat16 [rows, cols]) packed for the tile unit (prefill.cpp's pack_tiles: int32 [tile_words(rows, cols)]):
// an adapter's folded factors as linear_branch's tile_A / tile_B and q4_branch's tile_A, made once and kept by
// the layer.
at::Tensor tile_pack(const at::Tensor& M) {
  TORCH_CHECK(M.scalar_type() == at::kBFloat16 && M.dim() == 2, "lordba::tile_pack: M must be a bfloat16 matrix");
  const at::Tensor Mc = M.contiguous();
  const int64_t rows = M.size(0), cols = M.size(1);
  at::Tensor packed = at::empty({lordba_q4::tile_words(rows, cols)}, at::TensorOptions().dtype(at::kInt));
  lordba_q4::pack_tiles(Mc.data_ptr<at::BFloat16>(), rows, cols, reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()));
  return packed;
}

// More float32 tokens than the sign path takes, with the adapter's folded factors packed for the tile unit
// (tile_A / tile_B: tile_pack of q4_prefill_factors'): the branch added into the layer's output y on the tile
// unit in bfloat16 with float32 sums (prefill.cpp's add_branch: q4's `fast` prefill arithmetic) instead of
// two float32 GEMMs after folding per call, from 16 tokens on (one token is float32 in every kernel mode).
// false where it does not run (the caller adds it in float32). The tiles are checked by size only: the
// caller passes this adapter's (scaling and signs are in them; the layer's fused call keeps them).
bool tile_branch(const at::Tensor& x, const at::Tensor& tA, const at::Tensor& tB, const at::Tensor& b,
                 const at::Tensor& m, const at::Tensor& a, int64_t sign_max_tokens, at::Tensor& y) {
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  const int64_t T = in > 0 ? x.numel() / in : 0;
  if (T <= sign_max_tokens || T < kTileMinTokens || x.scalar_type() != at::kFloat || y.scalar_type() != at::kFloat ||
      !y.is_contiguous())
    return false;
  TORCH_CHECK(y.size(-1) == out && x.size(-1) == in,
              "lordba::linear_branch: the adapter's scale vectors do not match the layer's in / out features");
  TORCH_CHECK(tA.scalar_type() == at::kInt && tA.dim() == 1 && tA.numel() == lordba_q4::tile_words(r, in) &&
                  tB.scalar_type() == at::kInt && tB.dim() == 1 && tB.numel() == lordba_q4::tile_words(out, r) &&
                  tA.is_contiguous() && tB.is_contiguous(),
              "lordba::linear_branch: tile_A / tile_B must be tile_pack of the adapter's folded factors");
  const at::Tensor xc = x.contiguous();
  return lordba_q4::add_branch(xc.data_ptr<float>(), T, in, reinterpret_cast<const uint32_t*>(tA.data_ptr<int32_t>()),
                               reinterpret_cast<const uint32_t*>(tB.data_ptr<int32_t>()), r, out, y.data_ptr<float>());
}

at::Tensor linear_branch(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                         const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                         const c10::optional<at::Tensor>& tile_A, const c10::optional<at::Tensor>& tile_B) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "lordba::linear_branch: x's last dimension must be the weight's in_features");
  at::Tensor fused;
#if defined(LORDBA_LINEAR_ONE_TOKEN)
  if (one_token(x, weight, bias, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, fused)) return fused;
#endif
  at::Tensor y = at::linear(x, weight, bias);
  if (tile_A.has_value() && tile_B.has_value() && tile_branch(x, *tile_A, *tile_B, b, m, a, sign_max_tokens, y))
    return y;
  return lordba::branch_add(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, y, /*into_base=*/true);
}

}  // namespace
}  // namespace lordba_linear

TORCH_LIBRARY_FRAGMENT(lordba, lib) {
  lib.def(
      "linear_branch(Tensor x, Tensor weight, Tensor? bias, Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, "
      "Tensor a, float scaling, int sign_max_tokens, Tensor? tile_A=None, Tensor? tile_B=None) -> Tensor");
  lib.def("tile_pack(Tensor M) -> Tensor");
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) {
  lib.impl("linear_branch", &lordba_linear::linear_branch);
  lib.impl("tile_pack", &lordba_linear::tile_pack);
}

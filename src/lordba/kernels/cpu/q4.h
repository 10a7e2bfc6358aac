// Shared by the 4-bit kernels (q4.cpp: layout, the float32 decode, its row kernels in q4_rows.h; q4_gemm.cpp: dequantization and the
// GEMM of many tokens; q4_dot.cpp: the bfloat16 and int8 one-token kernels).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Half.h>
#include <c10/util/MaybeOwned.h>
#include <c10/util/SmallVector.h>

#include "branch.h"
#include "warm.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace lordba_q4 {

constexpr int64_t kChunk = 32;  // inputs per 16-byte chunk of a 4-bit row
// one token's rows are computed (and handed to the RowsHooks below) in RowBranch::add_rows' blocks
constexpr int64_t kRowBlock = lordba::RowBranch::kRows;

// A one-token kernel's parallel loop tells its caller, on each thread, which blocks [k0, k1) of kRowBlock
// rows that thread computes: start(k0, k1) before it computes them, done(k0, k1) once it has (q4_branch
// runs a share of the adapter's first stage in start and adds the branch to the rows in done, on the
// thread that wrote them).
struct RowsHooks {
  c10::function_ref<void(int64_t, int64_t)> start;
  c10::function_ref<void(int64_t, int64_t)> done;
};

#if defined(__F16C__)
inline float half_to_float(const c10::Half& h) { return _cvtsh_ss(h.x); }  // one instruction
#else
inline float half_to_float(const c10::Half& h) { return static_cast<float>(h); }
#endif

// A packed weight: qweight [out][row_bytes] codes, scale and minus [out][groups] (see q4.cpp).
struct Packed {
  const uint8_t* q;
  const c10::Half* s;
  const c10::Half* m;
  int64_t out, in, groups, group, row_bytes, bits;
};

// One of the layers a one-token call computes from the same input (q4_group: q/k/v, gate/up): its packed
// weight (all of a call's with the same in, group and bits), where its rows go, and its hooks (or null).
struct Member {
  Packed p;
  float* y;
  const RowsHooks* hooks;
};

// The rows of every member in blocks of kRowBlock, the members' blocks one after the other over one
// parallel loop: rows(member, o0, o1) computes a block; each thread's blocks of a member go to that
// member's hooks before and after. (Every thread taking its share of every member's first stage before
// its rows, rather than of the members it computes rows of, measured alike: this schedule took 0.9975x
// that one's time for SmolLM2's adapted --aot step, docs/kernels.md.)
// The calling thread, once its blocks are done, asks for the next call's lines (warm.h's ahead).
template <typename F>
void member_blocks(const Member* ms, int64_t n, const F& rows) {
  c10::SmallVector<int64_t, 8> first(static_cast<size_t>(n) + 1, 0);  // member i's blocks: [first[i], first[i + 1])
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + (ms[i].p.out + kRowBlock - 1) / kRowBlock;
  const lordba_warm::Site* site = lordba_warm::take_site();
  const void* caller = lordba_warm::this_thread();
  at::parallel_for(0, first[n], 1, [&](int64_t k0, int64_t k1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l0 = std::max(k0, first[i]) - first[i], l1 = std::min(k1, first[i + 1]) - first[i];
      if (l0 >= l1) continue;
      const Member& mb = ms[i];
      if (mb.hooks != nullptr) mb.hooks->start(l0, l1);
      for (int64_t k = l0; k < l1; ++k) rows(mb, k * kRowBlock, std::min(mb.p.out, (k + 1) * kRowBlock));
      if (mb.hooks != nullptr) mb.hooks->done(l0, l1);
    }
    if (site != nullptr && lordba_warm::this_thread() == caller)
      if (const lordba_warm::Site* next = lordba_warm::ahead(site)) lordba::RowBranch::warm_buffers(next->slots);
  });
}

// The one-token kernels read a layer's rows once, a few at a time; the hardware prefetcher alone
// kept them far below the rate one core streams memory at (docs/kernels.md: SmolLM2's 210 layers
// ~5 GB/s, where a plain read streams ~25 GB/s on the same Intel Xeon). So each step of a kernel first
// asks for the stored bytes kPrefetchAhead past the rows it is about to read (2-16 KB measured alike).
constexpr int64_t kPrefetchAhead = 4096;

// Fetches into L2 (no wait) the `rows` rows' worth of stored bytes kPrefetchAhead past row o's start,
// up to the end of p's rows.
inline void prefetch_ahead(const Packed& p, int64_t o, int64_t rows) {
  const int64_t from = o * p.row_bytes + kPrefetchAhead;
  const int64_t end = std::min(p.out * p.row_bytes, from + rows * p.row_bytes);
  for (int64_t i = from; i < end; i += 64) __builtin_prefetch(p.q + i, 0, 2);
}

// Rows [o, o1) four at a time (four(o) computes rows o .. o + 3), the rest one by one (one(o)), each
// step first fetching the rows ahead: the one-token kernels' row loop.
template <typename Four, typename One>
inline void rows_by_four(const Packed& p, int64_t o, int64_t o1, const Four& four, const One& one) {
  for (; o + 4 <= o1; o += 4) {
    prefetch_ahead(p, o, 4);
    four(o);
  }
  for (; o < o1; ++o) {
    prefetch_ahead(p, o, 1);
    one(o);
  }
}

// The offset term of row o for one token: sum_g m_g * sum(x_g) (xsum: that token's group sums of x).
inline float row_offset(const Packed& p, int64_t o, const float* xsum) {
  const c10::Half* m = p.m + o * p.groups;
  float offset = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) offset += half_to_float(m[g]) * xsum[g];
  return offset;
}

#if defined(__AVX512F__)
// 16 float32 rounded to bfloat16 words exactly as c10::BFloat16 rounds them: to nearest, ties to even (an
// integer add on the bits), NaN to 0x7FC0. (q4_dot.cpp's one-token input; q4_gemm.cpp's weight blocks where
// the CPU has no AVX512_BF16 conversion.)
inline __m256i bf16_words(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(_mm512_srli_epi32(up, 16), nan, _mm512_set1_epi32(0x7FC0)));
}
#endif

// xsum [T][groups]: each token's sum of x over each weight group, every group summed in input order
// (the groups interleaved so their sums run side by side, not one long chain of dependent adds).
void group_sums(const Packed& p, const float* x, int64_t T, float* xsum);

// One token on the bfloat16 (bf16) or int8 (int8_dot, 4-bit rows) kernel, where this build has it: every
// row of the n members (sharing in, group and bits) from the one input x, xsum the token's group sums of
// x. Returns false (nothing written) where neither applies, and the float32 kernels run.
bool dot1_reduced(const Member* ms, int64_t n, const float* x, const float* xsum, bool bf16, bool int8_dot);

// prefill.cpp: whether the tile unit (AMX-BF16) is built and granted to this process; and the
// bfloat16 prefill GEMM's input with a branch, xin [T, K] = [x | x A'^T | 0] (x [T, in] float32, A' [r, in]
// bfloat16, K >= in + r) in one pass on it, A' read from packedA where given (pack_tiles(A', r, in)), else
// packed per call. false (nothing written) where it cannot run.
bool amx_ready();
bool input_with_h(const float* x, int64_t T, int64_t in, const c10::BFloat16* A, int64_t r, c10::BFloat16* xin,
                  int64_t K, const uint32_t* packedA = nullptr);
// A dense base's prefill branch on the tile unit (linear.cpp): y [T, out] (float32, rows contiguous) +=
// bfloat16(bfloat16(x) A'^T) B'^T (x [T, in] float32; float32 sums), with A' [r, in] and B' [out, r] in bfloat16
// packed by pack_tiles (tile_words(r, in) and tile_words(out, r) words). false (nothing written) where it cannot run.
int64_t tile_words(int64_t rows, int64_t cols);
void pack_tiles(const c10::BFloat16* M, int64_t rows, int64_t cols, uint32_t* dst);
bool add_branch(const float* x, int64_t T, int64_t in, const uint32_t* packedA, const uint32_t* packedB, int64_t r,
                int64_t out, float* y);

// q4.cpp, for q4_branch.cpp: the checked view of a packed weight; one token's (or a few tokens') GEMV,
// `hooks` (if given) hearing of each thread's blocks of rows; the GEMM of many tokens, with a branch's
// folded factors A' [r, in] and B' [out, r] (bfloat16; A' packed for the tile unit where given) joining
// it; x as float32 rows and the output's shape; the `q4_linear` op.
Packed unpack_args(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minus, int64_t in,
                   int64_t bits);
void gemv(const Packed& p, const float* x, int64_t T, float* y, bool bf16, bool int8_dot,
          const RowsHooks* hooks = nullptr);
// One token through n members that share in, group and bits (member_blocks: one parallel loop).
void gemv1(const Member* ms, int64_t n, const float* x, bool bf16, bool int8_dot);
void gemm(const Packed& p, const at::Tensor& x2, at::Tensor& y, bool bf16, const at::Tensor* A = nullptr,
          const at::Tensor* B = nullptr, const uint32_t* packedA = nullptr);
at::Tensor q4_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minus, int64_t in,
                      int64_t bits);
std::pair<at::Tensor, std::vector<int64_t>> input_rows(const at::Tensor& x, int64_t in, int64_t out);
// A one-token call's input x (one token, x.size(-1) == in: the caller checks) as float32 — x itself, borrowed,
// where it is contiguous float32 — and its float32 output with x's leading shape and `out` features.
struct OneToken {
  c10::MaybeOwned<at::Tensor> x;
  at::Tensor y;
};
OneToken one_token_io(const at::Tensor& x, int64_t out);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& minus, int64_t in, int64_t gemm_min_tokens, int64_t bits, bool bf16,
                     bool int8_dot);

// Whether this build has the int8 one-token kernel (AVX512-VNNI with VL, or AVX2); the bfloat16 one
// (AVX512_BF16).
bool int8_dot_built();
bool bf16_dot_built();

}  // namespace lordba_q4

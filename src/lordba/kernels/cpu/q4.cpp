// 4-bit (and 8-bit) weight-only linear layers for CPU: the frozen base of an on-device LoRDBA model.
//
// Layout (per output row, input padded to a multiple of the group size G, G a multiple of 32):
//   4-bit: qweight[o][k/2] uint8: for every chunk of 32 inputs (16 bytes), byte j holds input j in
//          its low nibble and input j+16 in its high nibble;
//   8-bit: qweight[o][k] uint8, one code per input (used for the output head);
//   scale[o][g]      float16 s, minus[o][g] float16 m = -s * zero: w = s * q + m (affine, HQQ-style).
// y[t][o] = sum_g s_g * (q_g . x_g) + sum_g m_g * sum(x_g) (+ bias): the dot products run on the
// unpacked nibbles in float32 (no activation quantization), so the result is the dequantized
// weight's exactly up to float rounding. Decode (a few tokens) reads 4.5 bits per weight, 7x less
// than float32: that is where the speed comes from. Many tokens (prefill, backward) dequantize
// blocks of rows and use the BLAS GEMM (q4_gemm.cpp); the float32 row kernels (AVX-512, AVX2, portable) are
// in q4_rows.h. With `bf16` the operands are rounded to
// bfloat16 (the GEMM's; one token's x, on q4_dot.cpp's bfloat16 kernel); with `int8_dot` one token's
// x is quantized to int8 (q4_dot.cpp). The offset term always uses the float32 sums of x.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include "branch.h"
#include "q4.h"
#include "q4_rows.h"
#include "shim.h"
#include "warm.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace lordba_q4 {

Packed unpack_args(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minus, int64_t in,
                   int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "lordba::q4: bits must be 4 or 8");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "lordba::q4: qweight must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minus.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  minus.is_contiguous() && scale.sizes() == minus.sizes() && scale.dim() == 2,
              "lordba::q4: scale and minus must be contiguous float16 tensors of one shape [out, groups]");
  const int64_t out = qweight.size(0), row_bytes = qweight.size(1), groups = scale.size(1);
  TORCH_CHECK(scale.size(0) == out && groups > 0, "lordba::q4: scale rows must match qweight rows");
  const int64_t padded = row_bytes * 8 / bits;
  TORCH_CHECK(padded % groups == 0 && (padded / groups) % kChunk == 0 && in > 0 && in <= padded &&
                  padded - in < padded / groups,
              "lordba::q4: inconsistent sizes (qweight bytes per row, groups, in)");
  return {qweight.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), minus.data_ptr<c10::Half>(),
          out, in, groups, padded / groups, row_bytes, bits};
}

namespace {

constexpr int64_t kTokenBlock = 4;

// Rows one by one, the packed rows read once per block of kTokenBlock tokens (few tokens; one token of
// the 8-bit head): y [T, out], xsum the tokens' group sums.
void gemv_rows(const Packed& p, const float* x, int64_t T, const float* xsum, float* y) {
  at::parallel_for(0, p.out, 8, [&](int64_t o0, int64_t o1) {
    const int64_t chunks = p.group / kChunk;
    for (int64_t o = o0; o < o1; ++o) {
      prefetch_ahead(p, o, 1);
      const uint8_t* q = p.q + o * p.row_bytes;
      const c10::Half* s = p.s + o * p.groups;
      for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
        const int64_t nt = std::min(kTokenBlock, T - t0);
        const float* xs[kTokenBlock];
        for (int64_t t = 0; t < kTokenBlock; ++t) xs[t] = x + (t0 + std::min(t, nt - 1)) * p.in;
        float dots[kTokenBlock];
        if (p.bits == 4) {
          switch (nt) {
            case 1: row_dot<1, 4>(q, s, p.groups, chunks, xs, p.in, dots); break;
            case 2: row_dot<2, 4>(q, s, p.groups, chunks, xs, p.in, dots); break;
            case 3: row_dot<3, 4>(q, s, p.groups, chunks, xs, p.in, dots); break;
            default: row_dot<4, 4>(q, s, p.groups, chunks, xs, p.in, dots);
          }
        } else {
          switch (nt) {
            case 1: row_dot<1, 8>(q, s, p.groups, chunks, xs, p.in, dots); break;
            case 2: row_dot<2, 8>(q, s, p.groups, chunks, xs, p.in, dots); break;
            case 3: row_dot<3, 8>(q, s, p.groups, chunks, xs, p.in, dots); break;
            default: row_dot<4, 8>(q, s, p.groups, chunks, xs, p.in, dots);
          }
        }
        for (int64_t t = 0; t < nt; ++t)
          y[(t0 + t) * p.out + o] = dots[t] + row_offset(p, o, xsum + (t0 + t) * p.groups);
      }
    }
  });
}

}  // namespace

void group_sums(const Packed& p, const float* x, int64_t T, float* xsum) {
  for (int64_t t = 0; t < T; ++t, x += p.in, xsum += p.groups) {
    std::fill(xsum, xsum + p.groups, 0.f);
    const int64_t full = p.in / p.group;  // groups without padding
    for (int64_t k = 0; k < p.group; ++k)
      for (int64_t g = 0; g < full; ++g) xsum[g] += x[g * p.group + k];
    for (int64_t g = full; g < p.groups; ++g)
      for (int64_t k = g * p.group; k < p.in; ++k) xsum[g] += x[k];
  }
}

// One token: each member's hooks (if given) hear of each thread's blocks of kRowBlock rows, on that thread
// (row_dot's loop: of all a layer's blocks once it is done).
void gemv1(const Member* ms, int64_t n, const float* x, bool bf16, bool int8_dot) {
  const Packed& p = ms[0].p;
  c10::SmallVector<float, 64> xsum(static_cast<size_t>(p.groups), 0.f);
  group_sums(p, x, 1, xsum.data());
  if (dot1_reduced(ms, n, x, xsum.data(), bf16, int8_dot)) return;
#if defined(LORDBA_Q4_ROWS_OF_FOUR)
  // Decode of 4-bit rows in float32: blocks of 4 rows (rows_dot1; 0.5-0.75x the time of row_dot on
  // SmolLM2's layers). The 8-bit head is memory-bound and reads faster one row at a time (row_dot).
  if (p.bits == 4) {
    member_blocks(ms, n, [&](const Member& mb, int64_t o0, int64_t o1) {
      rows_by_four(
          mb.p, o0, o1, [&](int64_t o) { rows_dot1<4, 4>(mb.p, o, x, xsum.data(), mb.y); },
          [&](int64_t o) { rows_dot1<4, 1>(mb.p, o, x, xsum.data(), mb.y); });
    });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {  // 8-bit rows (the head), or a portable build: row_dot's loop, layer by layer
    const Member& mb = ms[i];
    gemv_rows(mb.p, x, 1, xsum.data(), mb.y);
    if (mb.hooks != nullptr) {
      mb.hooks->start(0, (mb.p.out + kRowBlock - 1) / kRowBlock);
      mb.hooks->done(0, (mb.p.out + kRowBlock - 1) / kRowBlock);
    }
  }
}

// Few tokens: gemv_rows; one token: gemv1 with p alone.
void gemv(const Packed& p, const float* x, int64_t T, float* y, bool bf16, bool int8_dot, const RowsHooks* hooks) {
  if (T == 1) {
    const Member one{p, y, hooks};
    return gemv1(&one, 1, x, bf16, int8_dot);
  }
  std::vector<float> xsum(T * p.groups, 0.f);
  group_sums(p, x, T, xsum.data());
  gemv_rows(p, x, T, xsum.data(), y);
}

// x as float32 rows [T, in], and the shape of the layer's output for x (x.size(-1) == in: the caller checks).
std::pair<at::Tensor, std::vector<int64_t>> input_rows(const at::Tensor& x, int64_t in, int64_t out) {
  auto shape = x.sizes().vec();
  shape.back() = out;
  return {x.reshape({-1, in}).to(at::kFloat).contiguous(), shape};
}

OneToken one_token_io(const at::Tensor& x, int64_t out) {
  c10::SmallVector<int64_t, 4> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  OneToken io{x.scalar_type() == at::kFloat ? x.expect_contiguous()
                                            : c10::MaybeOwned<at::Tensor>::owned(x.to(at::kFloat).contiguous()),
              at::empty(shape, x.options().dtype(at::kFloat))};
  return io;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& minus, int64_t in, int64_t gemm_min_tokens, int64_t bits, bool bf16,
                     bool int8_dot) {
  const bool one = x.numel() == in && 1 < gemm_min_tokens;  // one token (decode)
  if (one) lordba_warm::warm_tensors({{qweight}, {scale}, {minus}}, lordba_warm::enter(nullptr, 0));
  const Packed p = unpack_args(qweight, scale, minus, in, bits);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "lordba::q4_linear: x's last dimension must be ", in);
  if (one) {  // no reshaped copies, no new views
    const OneToken io = one_token_io(x, p.out);
    gemv(p, io.x->data_ptr<float>(), 1, io.y.data_ptr<float>(), bf16, int8_dot);
    return io.y.to(x.scalar_type());
  }
  const auto [x2, shape] = input_rows(x, in, p.out);
  const int64_t T = x2.size(0);
  at::Tensor y = at::empty({T, p.out}, x2.options());
  if (T == 0) return y.reshape(shape).to(x.scalar_type());
  if (T >= gemm_min_tokens) {
    gemm(p, x2, y, bf16);
  } else {
    gemv(p, x2.data_ptr<float>(), T, y.data_ptr<float>(), bf16, int8_dot);
  }
  return y.reshape(shape).to(x.scalar_type());
}

namespace {

// Whether the bfloat16 prefill's input pass runs on the tile unit (prefill.cpp) in this process.
bool q4_amx() { return amx_ready(); }

// Whether this build has the int8 decode kernel (AVX512-VNNI with VL, or AVX2); without it int8_dot is ignored.
bool q4_int8_dot() { return int8_dot_built(); }

// Whether this build has the bfloat16 decode kernel (AVX512_BF16); without it one token is float32.
bool q4_bf16_dot() { return bf16_dot_built(); }

}  // namespace

}  // namespace lordba_q4

TORCH_LIBRARY_FRAGMENT(lordba, lib) {
  lib.def(
      "q4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minus, int in_features, int gemm_min_tokens, "
      "int bits, bool bf16=False, bool int8_dot=False) -> Tensor");
  lib.def("q4_int8_dot() -> bool", &lordba_q4::q4_int8_dot);
  lib.def("q4_bf16_dot() -> bool", &lordba_q4::q4_bf16_dot);
  lib.def("q4_amx() -> bool", &lordba_q4::q4_amx);
  lib.def("q4_dequant(Tensor qweight, Tensor scale, Tensor minus, int in_features, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) {
  lib.impl("q4_linear", &lordba_q4::q4_linear);
  lib.impl("q4_dequant", &lordba_q4::q4_dequant);
}

using lordba_shim::optional;
using lordba_shim::result;
using lordba_shim::tensor;

LORDBA_SHIM aoti_torch_cpu_q4_linear(AtenTensorHandle x, AtenTensorHandle qweight, AtenTensorHandle scale,
                                     AtenTensorHandle minus, int64_t in, int64_t gemm_min_tokens, int64_t bits,
                                     int32_t bf16, int32_t int8_dot, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    result(lordba_q4::q4_linear(tensor(x), tensor(qweight), tensor(scale), tensor(minus), in, gemm_min_tokens, bits,
                                bf16 != 0, int8_dot != 0),
           ret);
  });
}

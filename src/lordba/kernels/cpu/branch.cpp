// CPU kernels of the packed double-binary branch (lordba; see docs/kernels.md).
//
//   y = [base +] s * a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))      S_A: r×in, S_B: out×r, 1 bit per sign
//
// Signs are read straight from the stored bit layout (SPEC §6: row-major, MSB first, bit 1 = +1).
// Two strategies, chosen per call by the number of tokens T (`sign_max_tokens` from Python):
//
// * sign path (decode, small T): the five stages fused in one call, no unpacking.
//     stage 1: z = b ⊙ x is stored with each group of 8 reversed, so that a little-endian load of
//              2 sign bytes is directly the AVX-512 lane mask of 16 floats. h = 2·Σ_{bit=1} z − Σ z
//              (one masked add per 16 signs). Portable build: a ±1 table per byte, 8 floats at once.
//     stage 2: T-MAC-style lookup tables: for every group of 8 rank components and every byte value
//              v the partial sum Σ ±(m ⊙ h)_k is tabulated (256 entries from two 16-entry nibble
//              tables), then each output sums r/8 table entries picked by its sign bytes.
//     stage 3: y = s · a ⊙ acc (+ base), rounded once to the output dtype.
// * unpack path (prefill, large T): unpack into a reused per-thread buffer with the scales folded
//   in, A' = S_A diag(b) (r×in), B' = s diag(a) S_B diag(m) (out×r), then two BLAS calls
//   (the second one adds the base output: addmm).
//
// Rows that do not start on a byte boundary (in or r not a multiple of 8) are re-aligned into a
// scratch row; activations are zero-padded so bits past a row's end never contribute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "branch.h"

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "branch_internal.h"

namespace lordba::impl {
namespace {

// ---------------------------------------------------------------- the unpack path
// kRev[v]: v with its 8 bits reversed (MSB-first sign byte → AVX-512 lane mask).
struct Reverse {
  uint8_t v[256];
  Reverse() {
    for (int b = 0; b < 256; ++b) {
      int x = 0;
      for (int k = 0; k < 8; ++k) x |= ((b >> k) & 1) << (7 - k);
      v[b] = static_cast<uint8_t>(x);
    }
  }
};
const Reverse kRev;

// kSignMsb[v][k] = +1 if bit 7-k of v is set (MSB first), else -1.
struct SignTableMsb {
  alignas(64) float v[256][8];
  SignTableMsb() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> (7 - k)) & 1) ? 1.f : -1.f;
  }
};
const SignTableMsb kSignMsb;

// dst[i][k] = ±row_scale[i]·col_scale[k] (row_scale null: 1) for `rows` sign rows of `cols` bits;
// the sign is applied as a multiplication by ±1 (exact).
template <typename t_t>
void unpack_rows(const uint8_t* p, int64_t nbytes, int64_t rows, int64_t cols, const float* row_scale,
                 const float* col_scale, t_t* dst) {
  const int64_t len = round_up(cols, 8) / 8;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / cols), [=](int64_t r0, int64_t r1) {
    std::vector<uint8_t> scratch;
    std::vector<float> tmp(static_cast<size_t>(cols));
    for (int64_t i = r0; i < r1; ++i) {
      const uint8_t* row = sign_row(p, i * cols, len, nbytes, scratch);
      const float rs = row_scale != nullptr ? row_scale[i] : 1.f;
      t_t* d = dst + i * cols;
      float* f = std::is_same_v<t_t, float> ? reinterpret_cast<float*>(d) : tmp.data();
      int64_t k = 0;
#if defined(__AVX512F__)
      const __m512 vrs = _mm512_set1_ps(rs);
      const __m512 minus = _mm512_set1_ps(-1.f);
      for (; k + 16 <= cols; k += 16) {
        const __mmask16 mask = static_cast<__mmask16>(kRev.v[row[k >> 3]] | (kRev.v[row[(k >> 3) + 1]] << 8));
        const __m512 v = _mm512_mul_ps(vrs, _mm512_loadu_ps(col_scale + k));
        _mm512_storeu_ps(f + k, _mm512_mask_blend_ps(mask, _mm512_mul_ps(v, minus), v));
      }
#endif
#if defined(__AVX2__)
      const __m256 vrs8 = _mm256_set1_ps(rs);
      for (; k + 8 <= cols; k += 8) {
        const __m256 v = _mm256_mul_ps(vrs8, _mm256_loadu_ps(col_scale + k));
        _mm256_storeu_ps(f + k, _mm256_mul_ps(_mm256_load_ps(kSignMsb.v[row[k >> 3]]), v));
      }
#endif
      for (; k < cols; ++k) {
        const float v = rs * col_scale[k];
        f[k] = ((row[k >> 3] >> (7 - (k & 7))) & 1) ? v : -1.f * v;
      }
      if constexpr (!std::is_same_v<t_t, float>)
        for (int64_t q = 0; q < cols; ++q) d[q] = static_cast<t_t>(f[q]);
    }
  });
}

// The folded factors A' = S_A diag(b) into A [r, in] and B' = s diag(a) S_B diag(m) into B [out, r]:
// the unpack path's, and folded_factors' for q4.cpp's prefill GEMM. An infinite s·a[o] (a broken adapter: every
// output of o is infinite or NaN anyway) makes all r terms of output o infinite, of both signs: NaN here where
// the sign path and the reference give ±inf (left so: a check in the GEMMs' place would cost every prefill).
template <typename t_t>
void fold_factors(const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb, int64_t nbytes_b, const float* b,
                  const float* m, const float* a, int64_t r, int64_t in, int64_t out, float scaling, t_t* A, t_t* B) {
  thread_local std::vector<float> sa_row;
  sa_row.resize(static_cast<size_t>(out));
  for (int64_t o = 0; o < out; ++o) sa_row[o] = scaling * a[o];
  unpack_rows<t_t>(sa, nbytes_a, r, in, nullptr, b, A);
  unpack_rows<t_t>(sb, nbytes_b, out, r, sa_row.data(), m, B);
}

template <typename x_t>
at::Tensor unpack_path(const at::Tensor& x2, const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb,
                       int64_t nbytes_b, const float* b, const float* m, const float* a, int64_t r, int64_t out,
                       float scaling, const c10::optional<at::Tensor>& base2, bool into_base) {
  const int64_t in = x2.size(1);
  thread_local std::vector<x_t> buf;  // reused: A' then B'
  buf.resize(static_cast<size_t>(r * in + out * r));
  x_t* A = buf.data();
  x_t* B = buf.data() + r * in;
  fold_factors<x_t>(sa, nbytes_a, sb, nbytes_b, b, m, a, r, in, out, scaling, A, B);
  const auto opts = x2.options();
  const at::Tensor At = at::from_blob(A, {r, in}, opts);
  const at::Tensor Bt = at::from_blob(B, {out, r}, opts);
  const at::Tensor h = at::mm(x2, At.t());
  if (!base2.has_value()) return at::mm(h, Bt.t());
  if (base2->scalar_type() == x2.scalar_type()) {
    if (into_base) {  // the same GEMM (beta = 1) on base's own memory: no new output, no copy of base
      at::Tensor into = *base2;
      return into.addmm_(h, Bt.t());
    }
    return at::addmm(*base2, h, Bt.t());
  }
  return at::add(*base2, at::mm(h, Bt.t()).to(base2->scalar_type()));
}


template <typename x_t, typename out_t>
void run_sign(const at::Tensor& x2, int64_t T, const at::Tensor& sa, const at::Tensor& sb, const float* b,
              const float* m, const float* a, int64_t r, int64_t out, float scaling, const at::Tensor* base2,
              at::Tensor& y) {
  sign_path<x_t, out_t>(x2.data_ptr<x_t>(), T, x2.size(-1), sa.data_ptr<uint8_t>(), sa.numel(),
                        sb.data_ptr<uint8_t>(), sb.numel(), b, m, a, r, out, scaling,
                        base2 ? base2->data_ptr<out_t>() : nullptr, y.data_ptr<out_t>());
}

template <typename x_t>
void dispatch_out(const at::Tensor& x2, int64_t T, const at::Tensor& sa, const at::Tensor& sb, const float* b,
                  const float* m, const float* a, int64_t r, int64_t out, float scaling, const at::Tensor* base2,
                  at::Tensor& y) {
  switch (y.scalar_type()) {
    case at::kFloat: return run_sign<x_t, float>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    case at::kBFloat16: return run_sign<x_t, c10::BFloat16>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    case at::kHalf: return run_sign<x_t, c10::Half>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    default: check(false, "the output dtype must be float32, bfloat16 or float16");
  }
}

template <typename T>
const float* converted(const at::Tensor& t, std::vector<float>& buf, float divisor) {
  const T* v = t.data_ptr<T>();
  buf.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(v[i]) / divisor;
  return buf.data();
}

const float* codes_float(const at::Tensor& t, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(t.numel()));
  codes_to_float(t.data_ptr<int8_t>(), t.numel(), buf.data());
  return buf.data();
}

// Whether `base` has x's leading dimensions and `out` as its last.
bool base_shape_ok(const at::Tensor& x, const at::Tensor& base, int64_t out) {
  if (base.dim() != x.dim() || base.size(-1) != out) return false;
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    if (base.size(d) != x.size(d)) return false;
  return true;
}

}  // namespace

// d[i] = v[i] / 127 for n int8 codes (scales16 / scale_at).
void codes_to_float(const int8_t* v, int64_t n, float* d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, scales16(v + i));
#elif defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, scales8(v + i));
#endif
  for (; i < n; ++i) d[i] = scale_at(v, i);
}

// A scale vector as float32: the tensor itself, or its values converted into `buf`. int8 holds codes
// meaning code / 127 (the int8 scale format of docs/format.md); the division is the one torch does,
// so a compact adapter computes exactly what its decoded float32 form computes (x / 1 is exact).
const float* as_float(const at::Tensor& t, std::vector<float>& buf) {
  switch (t.scalar_type()) {
    case at::kFloat: return t.data_ptr<float>();
    case at::kChar: return codes_float(t, buf);
    case at::kHalf: return converted<c10::Half>(t, buf, 1.f);
    default: return converted<c10::BFloat16>(t, buf, 1.f);
  }
}

bool scale_dtype_ok(const at::Tensor& t, bool codes) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || (codes && d == at::kChar);
}

// The adapter's own tensors: uint8 signs of the scale vectors' sizes, scales of a supported dtype.
void check_factors(const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                   const at::Tensor& a) {
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  check(r > 0, "an adapter's rank (scale_mid's length) must be at least 1");
  check(sign_A.scalar_type() == at::kByte && sign_B.scalar_type() == at::kByte, "signs must be uint8");
  check(sign_A.numel() == (r * in + 7) / 8 && sign_B.numel() == (out * r + 7) / 8,
        "packed sign sizes do not match the scale vectors");
  check(scale_dtype_ok(b, true) && scale_dtype_ok(m, false) && scale_dtype_ok(a, true),
        "scales must be float32, float16 or bfloat16 (b and a also int8 codes)");
}

namespace {

at::Tensor branch_impl(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                       const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                       const c10::optional<at::Tensor>& base, bool into_base) {
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  check(x.dim() >= 1 && x.size(-1) == in, "x's last dimension must equal scale_in's length");
  check_factors(sign_A, sign_B, b, m, a);
  const auto st = x.scalar_type();
  check(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "x must be float32, bfloat16 or float16");
  check(!base.has_value() || base_shape_ok(x, *base, out), "base must have the output's shape");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (x.numel() == 0) return base.has_value() ? base->clone() : at::zeros(shape, x.options());  // no tokens, or in = 0
  const int64_t T = x.numel() / in;
  const at::Tensor sa = sign_A.contiguous(), sb = sign_B.contiguous();
  const at::Tensor bc = b.contiguous(), mc = m.contiguous(), ac = a.contiguous();
  thread_local std::vector<float> bbuf, mbuf, abuf;  // conversions of stored scales, reused between calls
  const float* bp = as_float(bc, bbuf);
  const float* mp = as_float(mc, mbuf);
  const float* ap = as_float(ac, abuf);
  const float s = static_cast<float>(scaling);
  if (T > sign_max_tokens) {
    const at::Tensor x2 = x.reshape({-1, in}).contiguous();
    c10::optional<at::Tensor> base2;
    if (base.has_value()) base2 = base->reshape({-1, out}).contiguous();
    at::Tensor y;
    switch (st) {
      case at::kFloat:
        y = unpack_path<float>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp, mp,
                               ap, r, out, s, base2, into_base);
        break;
      case at::kBFloat16:
        y = unpack_path<c10::BFloat16>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(),
                                       bp, mp, ap, r, out, s, base2, into_base);
        break;
      default:
        y = unpack_path<c10::Half>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp,
                                   mp, ap, r, out, s, base2, into_base);
    }
    return y.reshape(shape);
  }
  // The sign path reads rows through data pointers: no reshaped views. With into_base, the output
  // is base's own memory (each element read, then written, by the same lane).
  const at::Tensor x2 = x.contiguous();
  c10::optional<at::Tensor> base2;
  if (base.has_value()) base2 = base->contiguous();
  const bool in_place = into_base && base2.has_value();  // base itself, or a contiguous copy of it
  at::Tensor y = in_place ? *base2 : at::empty(shape, base2.has_value() ? base2->options() : x2.options());
  const at::Tensor* bptr = base2.has_value() ? &*base2 : nullptr;
  switch (st) {
    case at::kFloat: dispatch_out<float>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y); break;
    case at::kBFloat16: dispatch_out<c10::BFloat16>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y); break;
    default: dispatch_out<c10::Half>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y);
  }
  return y;
}

}  // namespace

// The `branch` op.
at::Tensor branch(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                  const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                  const c10::optional<at::Tensor>& base) {
  return branch_impl(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, base, false);
}

}  // namespace lordba::impl

namespace lordba {
namespace {

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

using namespace impl;

at::Tensor branch_add(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                      const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                      const c10::optional<at::Tensor>& base, bool into_base) {
  return branch_impl(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, base, into_base);
}

std::pair<at::Tensor, at::Tensor> folded_factors(const at::Tensor& sign_A, const at::Tensor& sign_B,
                                                 const at::Tensor& b, const at::Tensor& m, const at::Tensor& a,
                                                 double scaling) {
  check_factors(sign_A, sign_B, b, m, a);
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  const at::Tensor sa = sign_A.contiguous(), sb = sign_B.contiguous();
  const at::Tensor bc = b.contiguous(), mc = m.contiguous(), ac = a.contiguous();
  std::vector<float> bbuf, mbuf, abuf;
  const float* bp = as_float(bc, bbuf);
  const float* mp = as_float(mc, mbuf);
  const float* ap = as_float(ac, abuf);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = at::empty({r, in}, opts), B = at::empty({out, r}, opts);
  fold_factors<float>(sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp, mp, ap, r, in, out,
                      static_cast<float>(scaling), A.data_ptr<float>(), B.data_ptr<float>());
  return {A, B};
}

}  // namespace lordba

TORCH_LIBRARY(lordba, lib) {
  lib.def(
      "branch(Tensor x, Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, Tensor a, float scaling, "
      "int sign_max_tokens, Tensor? base=None) -> Tensor");
  lib.def(
      "branch_rows(Tensor x, Tensor index, Tensor[] sign_A, Tensor[] sign_B, Tensor[] b, Tensor[] m, Tensor[] a, "
      "float[] scaling, int[] sign_max_tokens, Tensor base) -> Tensor");
  lib.def("isa() -> str", &lordba::isa);
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) {
  lib.impl("branch", &lordba::impl::branch);
  lib.impl("branch_rows", &lordba::impl::branch_rows);
}

// A q4 layer and its LoRDBA adapter in one op (`q4_branch`): the one-token GEMV with the branch inside
// its parallel loop (RowBranch), the bfloat16 prefill GEMM with the branch joining it, else the two ops'
// own code one after the other; and the folded factors the prefill keeps (`q4_prefill_factors`).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include "branch.h"
#include "q4.h"
#include "shim.h"
#include "warm.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

namespace lordba_q4 {
namespace {

constexpr size_t kMembers = 4;  // q4_group's members held without the heap (q/k/v: 3, gate/up: 2)

// One token through layers that share in, group and bits (gemv1: every layer's rows in one parallel loop),
// each adapted layer's branch added to its own rows inside the loop: each thread runs its share of the
// branch's first stage before its rows, then adds the layer's bias (bias: one float32 pointer or null per
// layer, or empty) and the branch's output stage to the rows it has just computed (RowBranch: only b ⊙ x
// runs before the loop). Per layer the same arithmetic as the q4 call, the bias add and branch_add, bit for
// bit. y: [..., Σ out] float32. Nothing is computed (an undefined tensor returned) where a branch cannot run
// inside the loop (x not contiguous float32, among others). The adapter lists are empty (no layer adapted) or one
// per layer.
at::Tensor one_token(c10::ArrayRef<Packed> ps, const at::Tensor& x, bool bf16, bool int8_dot, at::TensorList sign_A,
                     at::TensorList sign_B, at::TensorList b, at::TensorList m, at::TensorList a,
                     c10::ArrayRef<double> scaling, int64_t sign_max_tokens, c10::ArrayRef<const float*> bias = {}) {
  const int64_t n = static_cast<int64_t>(ps.size());
  const bool adapted = !sign_A.empty();
  if (adapted && (x.scalar_type() != at::kFloat || !x.is_contiguous())) return {};  // as RowBranch::prepare
  c10::SmallVector<int64_t, kMembers + 1> first(static_cast<size_t>(n) + 1, 0);  // member i's: [first[i], first[i+1])
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + ps[i].out;
  lordba::RowBranch held[kMembers];  // the branches, on the stack up to kMembers (RowBranch cannot move)
  std::unique_ptr<lordba::RowBranch[]> more(adapted && n > kMembers ? new lordba::RowBranch[n] : nullptr);
  lordba::RowBranch* branches = more ? more.get() : held;
  OneToken io = one_token_io(x, first[n]);
  for (int64_t i = 0; adapted && i < n; ++i)
    if (!branches[i].prepare(*io.x, sign_A[i], sign_B[i], b[i], m[i], a[i], scaling[i], sign_max_tokens, ps[i].out, i))
      return {};
  float* yp = io.y.data_ptr<float>();
  auto hooks_of = [&](int64_t i) {
    lordba::RowBranch* branch = &branches[i];
    float* yi = yp + first[i];
    const float* bi = bias.empty() ? nullptr : bias[i];
    const int64_t out = ps[i].out;
    return std::make_pair([branch](int64_t k0, int64_t k1) { branch->start(k0, k1); },
                          [branch, yi, bi, out](int64_t k0, int64_t k1) {
                            if (bi != nullptr)
                              for (int64_t o = k0 * kRowBlock; o < std::min(out, k1 * kRowBlock); ++o) yi[o] += bi[o];
                            branch->add_rows(k0, k1, yi);
                          });
  };
  c10::SmallVector<decltype(hooks_of(0)), kMembers> calls;  // the hooks' callables, alive for the loop
  c10::SmallVector<RowsHooks, kMembers> hooks;
  c10::SmallVector<Member, kMembers> members;
  calls.reserve(static_cast<size_t>(n));
  hooks.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const RowsHooks* h = nullptr;
    if (adapted) {
      calls.push_back(hooks_of(i));
      hooks.push_back(RowsHooks{calls.back().first, calls.back().second});
      h = &hooks.back();
    }
    members.push_back(Member{ps[i], yp + first[i], h});
  }
  gemv1(members.data(), n, io.x->data_ptr<float>(), bf16, int8_dot);
  return std::move(io.y);
}

// Before a one-token call reads them: asks for the layers' and adapters' tensors at once (warm.h) and for the
// buffers of one branch per adapter (one tensor or a list each: q4_branch, q4_group; the adapter lists may be empty),
// the call entered as a site (keyed by its first weight) whose lines the call before it asks for next time.
void warm_one_token(at::TensorList qweight, at::TensorList scale, at::TensorList minus, at::TensorList sign_A,
                    at::TensorList sign_B, at::TensorList b, at::TensorList m, at::TensorList a) {
  const int64_t slots = static_cast<int64_t>(sign_A.size());
  lordba_warm::Site* site = lordba_warm::enter(slots > 0 ? qweight[0].unsafeGetTensorImpl() : nullptr, slots);
  lordba_warm::warm_tensors({{qweight}, {scale}, {minus}, {sign_A}, {sign_B}, {a}, {b, lordba_warm::kScaleBytes},
                             {m, lordba_warm::kScaleBytes}},
                            site);
  lordba::RowBranch::warm_buffers(slots);
  if (site != nullptr)
    for (at::TensorList inside : {sign_A, sign_B, a}) lordba_warm::remember(inside, lordba_warm::kScaleBytes, site);
}

// q4_branch's folded factors for the bfloat16 prefill GEMM, A' = S_A diag(b) [r, in] and
// B' = s diag(a) S_B diag(m) [out, r], in bfloat16 (the GEMM rounds them so). A layer keeps them between
// prompts (Q4Linear.forward_with_branch): folding them again costs ~15 us a layer and call.
std::tuple<at::Tensor, at::Tensor> q4_prefill_factors(const at::Tensor& sign_A, const at::Tensor& sign_B,
                                                      const at::Tensor& b, const at::Tensor& m, const at::Tensor& a,
                                                      double scaling) {
  auto [A, B] = lordba::folded_factors(sign_A, sign_B, b, m, a, scaling);
  return {A.to(at::kBFloat16), B.to(at::kBFloat16)};
}

// The given folded factors (q4_prefill_factors') where they are the adapter's shapes, else folded here.
std::tuple<at::Tensor, at::Tensor> prefill_factors(const c10::optional<at::Tensor>& folded_A,
                                                   const c10::optional<at::Tensor>& folded_B, const at::Tensor& sign_A,
                                                   const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                                                   const at::Tensor& a, double scaling) {
  if (!folded_A.has_value() || !folded_B.has_value()) return q4_prefill_factors(sign_A, sign_B, b, m, a, scaling);
  const int64_t r = m.numel(), in = b.numel(), out = a.numel();
  TORCH_CHECK(r > 0, "lordba::q4_branch: an adapter's rank (m's length) must be at least 1");
  const at::Tensor &A = *folded_A, &B = *folded_B;
  TORCH_CHECK(A.scalar_type() == at::kBFloat16 && A.dim() == 2 && A.size(0) == r && A.size(1) == in,
              "lordba::q4_branch: folded_A must be bfloat16 [", r, ", ", in, "] (q4_prefill_factors')");
  TORCH_CHECK(B.scalar_type() == at::kBFloat16 && B.dim() == 2 && B.size(0) == out && B.size(1) == r,
              "lordba::q4_branch: folded_B must be bfloat16 [", out, ", ", r, "] (q4_prefill_factors')");
  return {A.contiguous(), B.contiguous()};
}

// folded_A' packed for the tile unit where the layer kept it (tile_A: tile_pack(folded_A)), else nullptr.
const uint32_t* kept_tiles(const c10::optional<at::Tensor>& tile_A, const at::Tensor& A) {
  if (!tile_A.has_value()) return nullptr;
  TORCH_CHECK(tile_A->scalar_type() == at::kInt && tile_A->dim() == 1 && tile_A->is_contiguous() &&
                  tile_A->numel() == tile_words(A.size(0), A.size(1)),
              "lordba::q4_branch: tile_A must be tile_pack(folded_A)");
  return reinterpret_cast<const uint32_t*>(tile_A->data_ptr<int32_t>());
}

// A q4 layer and its one LoRDBA adapter in one call: the layer's output (plus bias) and then the
// branch added by the `branch` op's own code — the same arithmetic, in the same order, as the two
// ops called one after the other (bit for bit), without a second dispatch per layer and token
// (decode calls ~210 layers per token; a custom op's call costs about what the branch computes).
// Except many tokens in bfloat16 (`fast` prefill) on the unpack path: there the branch joins the
// base's GEMM (gemm's branch), equal to the two calls up to bfloat16 rounding, not bit for bit; its
// folded factors are folded_A / folded_B where given (q4_prefill_factors', kept by the layer).
at::Tensor q4_branch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minus,
                     int64_t in, int64_t gemm_min_tokens, int64_t bits, bool bf16, bool int8_dot,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& sign_A, const at::Tensor& sign_B,
                     const at::Tensor& b, const at::Tensor& m, const at::Tensor& a, double scaling,
                     int64_t sign_max_tokens, const c10::optional<at::Tensor>& folded_A,
                     const c10::optional<at::Tensor>& folded_B, const c10::optional<at::Tensor>& tile_A) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "lordba::q4_branch: x's last dimension must be ", in);
  const int64_t T = in > 0 ? x.numel() / in : 0;
  if (bf16 && T >= gemm_min_tokens && T > sign_max_tokens) {
    const Packed p = unpack_args(qweight, scale, minus, in, bits);
    TORCH_CHECK(b.numel() == in && a.numel() == p.out,
                "lordba::branch: the adapter's scale vectors do not match the layer's in / out features");
    const auto [A, B] = prefill_factors(folded_A, folded_B, sign_A, sign_B, b, m, a, scaling);
    const auto [x2, shape] = input_rows(x, in, p.out);
    at::Tensor y = at::empty({T, p.out}, x2.options());
    gemm(p, x2, y, /*bf16=*/true, &A, &B, kept_tiles(tile_A, A));
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    return y.reshape(shape).to(x.scalar_type());
  }
  if (T == 1 && T < gemm_min_tokens) {
    warm_one_token(qweight, scale, minus, sign_A, sign_B, b, m, a);
    const Packed p = unpack_args(qweight, scale, minus, in, bits);
    at::Tensor bias_f;
    if (bias.has_value()) {
      TORCH_CHECK(bias->numel() == p.out, "lordba::q4_branch: the bias must have ", p.out, " elements");
      bias_f = bias->to(at::kFloat).contiguous();
    }
    const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
    at::Tensor y = one_token({p}, x, bf16, int8_dot, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, {bp});
    if (y.defined()) return y;
  }
  at::Tensor y = q4_linear(x, qweight, scale, minus, in, gemm_min_tokens, bits, bf16, int8_dot);
  if (bias.has_value()) y = at::add(y, bias->to(y.scalar_type()));
  return lordba::branch_add(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, y, /*into_base=*/true);
}

// Layers that read the same input (q/k/v, gate/up), each with its LoRDBA adapter or none of them with one,
// in one call: their outputs side by side in one tensor [..., Σ out]. The same values, bit for bit, as
// each layer's q4_branch (or q4_linear) call, concatenated. One token runs every member's rows in one
// parallel loop, the input prepared once (the --aot decode step calls it for q/k/v and for gate/up: four
// calls a transformer block instead of seven, lordba.nn.aot_group); other calls run the members one after
// the other.
at::Tensor q4_group(const at::Tensor& x, at::TensorList qweight, at::TensorList scale, at::TensorList minus,
                    int64_t in, int64_t gemm_min_tokens, int64_t bits, bool bf16, bool int8_dot,
                    at::TensorList sign_A, at::TensorList sign_B, at::TensorList b, at::TensorList m,
                    at::TensorList a, c10::ArrayRef<double> scaling, int64_t sign_max_tokens) {
  const size_t n = qweight.size();
  TORCH_CHECK(n > 0 && scale.size() == n && minus.size() == n,
              "lordba::q4_group: qweight, scale and minus must be lists of one or more layers' tensors, as long");
  const size_t k = sign_A.size();
  TORCH_CHECK((k == 0 || k == n) && sign_B.size() == k && b.size() == k && m.size() == k && a.size() == k &&
                  scaling.size() == k,
              "lordba::q4_group: the adapter lists (sign_A, sign_B, b, m, a, scaling) must be empty or one per layer");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "lordba::q4_group: x's last dimension must be ", in);
  const bool one = x.numel() == in && 1 < gemm_min_tokens;
  if (one) warm_one_token(qweight, scale, minus, sign_A, sign_B, b, m, a);
  c10::SmallVector<Packed, kMembers> ps;
  for (size_t i = 0; i < n; ++i) ps.push_back(unpack_args(qweight[i], scale[i], minus[i], in, bits));
  const bool shared = std::all_of(ps.begin(), ps.end(), [&](const Packed& p) {
    return p.groups == ps[0].groups && p.group == ps[0].group && p.row_bytes == ps[0].row_bytes;
  });
  if (one && shared) {
    at::Tensor y = one_token(ps, x, bf16, int8_dot, sign_A, sign_B, b, m, a, scaling, sign_max_tokens);
    if (y.defined()) return y.to(x.scalar_type());
  }
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < n; ++i)
    ys.push_back(k == 0 ? q4_linear(x, qweight[i], scale[i], minus[i], in, gemm_min_tokens, bits, bf16, int8_dot)
                        : q4_branch(x, qweight[i], scale[i], minus[i], in, gemm_min_tokens, bits, bf16, int8_dot,
                                    c10::nullopt, sign_A[i], sign_B[i], b[i], m[i], a[i], scaling[i],
                                    sign_max_tokens, c10::nullopt, c10::nullopt, c10::nullopt));
  return at::cat(ys, -1);
}

}  // namespace
}  // namespace lordba_q4

TORCH_LIBRARY_FRAGMENT(lordba, lib) {
  lib.def(
      "q4_branch(Tensor x, Tensor qweight, Tensor scale, Tensor minus, int in_features, int gemm_min_tokens, "
      "int bits, bool bf16, bool int8_dot, Tensor? bias, Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, "
      "Tensor a, float scaling, int sign_max_tokens, Tensor? folded_A=None, Tensor? folded_B=None, "
      "Tensor? tile_A=None) -> Tensor");
  lib.def(
      "q4_group(Tensor x, Tensor[] qweight, Tensor[] scale, Tensor[] minus, int in_features, int gemm_min_tokens, "
      "int bits, bool bf16, bool int8_dot, Tensor[] sign_A, Tensor[] sign_B, Tensor[] b, Tensor[] m, Tensor[] a, "
      "float[] scaling, int sign_max_tokens) -> Tensor");
  lib.def(
      "q4_prefill_factors(Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, Tensor a, float scaling) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) {
  lib.impl("q4_branch", &lordba_q4::q4_branch);
  lib.impl("q4_group", &lordba_q4::q4_group);
  lib.impl("q4_prefill_factors", &lordba_q4::q4_prefill_factors);
}

using lordba_shim::BorrowedList;
using lordba_shim::optional;
using lordba_shim::result;
using lordba_shim::tensor;

LORDBA_SHIM aoti_torch_cpu_q4_branch(AtenTensorHandle x, AtenTensorHandle qweight, AtenTensorHandle scale,
                                     AtenTensorHandle minus, int64_t in, int64_t gemm_min_tokens, int64_t bits,
                                     int32_t bf16, int32_t int8_dot, AtenTensorHandle* bias, AtenTensorHandle sign_A,
                                     AtenTensorHandle sign_B, AtenTensorHandle b, AtenTensorHandle m,
                                     AtenTensorHandle a, double scaling, int64_t sign_max_tokens,
                                     AtenTensorHandle* folded_A, AtenTensorHandle* folded_B, AtenTensorHandle* tile_A,
                                     AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    result(lordba_q4::q4_branch(tensor(x), tensor(qweight), tensor(scale), tensor(minus), in, gemm_min_tokens, bits,
                                bf16 != 0, int8_dot != 0, optional(bias), tensor(sign_A), tensor(sign_B), tensor(b),
                                tensor(m), tensor(a), scaling, sign_max_tokens, optional(folded_A),
                                optional(folded_B), optional(tile_A)),
           ret);
  });
}

LORDBA_SHIM aoti_torch_cpu_q4_group(AtenTensorHandle x, const AtenTensorHandle* qweight, int64_t n_qweight,
                                    const AtenTensorHandle* scale, int64_t n_scale, const AtenTensorHandle* minus,
                                    int64_t n_minus, int64_t in, int64_t gemm_min_tokens, int64_t bits, int32_t bf16,
                                    int32_t int8_dot, const AtenTensorHandle* sign_A, int64_t n_sign_A,
                                    const AtenTensorHandle* sign_B, int64_t n_sign_B, const AtenTensorHandle* b,
                                    int64_t n_b, const AtenTensorHandle* m, int64_t n_m, const AtenTensorHandle* a,
                                    int64_t n_a, const double* scaling, int64_t n_scaling, int64_t sign_max_tokens,
                                    AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const BorrowedList qw(qweight, n_qweight), sc(scale, n_scale), mi(minus, n_minus), sa(sign_A, n_sign_A),
        sb(sign_B, n_sign_B), bs(b, n_b), ms(m, n_m), as(a, n_a);
    result(lordba_q4::q4_group(tensor(x), qw, sc, mi, in, gemm_min_tokens, bits, bf16 != 0, int8_dot != 0, sa, sb, bs,
                               ms, as, c10::ArrayRef<double>(scaling, static_cast<size_t>(n_scaling)),
                               sign_max_tokens),
           ret);
  });
}

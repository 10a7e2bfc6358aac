// A dense (unquantized) linear layer and its one LoRDBA adapter in one call: `lordba::linear_branch`.
//
//   y = x W^T (+ bias) + s * a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))
//
// The layer's product is at::linear (what nn.Linear computes), and the branch is added into that
// fresh output by the `branch` op's own code: the same arithmetic, in the same order, as the layer and
// the op called one after the other (bit for bit), with one dispatch per layer and token instead of
// a module call and an op call (decode runs ~210 adapted layers per token).
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "branch.h"

namespace lordba_linear {
namespace {

at::Tensor linear_branch(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                         const at::Tensor& a, double scaling, int64_t sign_max_tokens) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "lordba::linear_branch: x's last dimension must be the weight's in_features");
  at::Tensor y = at::linear(x, weight, bias);
  return lordba::branch_add(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, y, /*into_base=*/true);
}

}  // namespace
}  // namespace lordba_linear

TORCH_LIBRARY_FRAGMENT(lordba, lib) {
  lib.def(
      "linear_branch(Tensor x, Tensor weight, Tensor? bias, Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, "
      "Tensor a, float scaling, int sign_max_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) { lib.impl("linear_branch", &lordba_linear::linear_branch); }

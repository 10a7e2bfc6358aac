// The sign branch's entry point for the other kernels of the library (q4.cpp's fused q4_branch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <utility>

namespace lordba {

// base + s · a ⊙ (S_B (m ⊙ (S_A (b ⊙ x)))): the `branch` op's implementation (branch.cpp). With
// into_base, many tokens (the unpack path) add into base's own memory (same arithmetic: the GEMM with
// beta = 1), for a caller whose base is its own fresh tensor.
at::Tensor branch_add(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                      const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                      const c10::optional<at::Tensor>& base, bool into_base = false);

// The branch's factors unpacked with every scale folded in, float32: A' = S_A diag(b) [r, in] and
// B' = s · diag(a) S_B diag(m) [out, r] (so the branch is B' (A' x)), for a caller that joins them to
// a GEMM of its own (q4.cpp's prefill). The same argument checks as branch_add's.
std::pair<at::Tensor, at::Tensor> folded_factors(const at::Tensor& sign_A, const at::Tensor& sign_B,
                                                 const at::Tensor& b, const at::Tensor& m, const at::Tensor& a,
                                                 double scaling);

}  // namespace lordba

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

// The sign path of one float32 token in two steps, for a caller that adds the branch inside its own
// parallel loop over the output rows (q4.cpp's one-token q4_branch: each thread adds it to the rows it
// has just computed): prepare() once, on the calling thread (stage 1 and the lookup tables, in that
// thread's buffers), then add_rows() for blocks of 16 outputs from any thread, before that thread's
// next prepare. The same arithmetic as branch_add into a float32 base (bit for bit).
class RowBranch {
 public:
  static constexpr int64_t kRows = 16;  // add_rows' block of outputs (one AVX-512 vector of them)
  // false (nothing prepared) where branch_add's own path runs instead: not an AVX-512 build, x not
  // one contiguous float32 token, or the unpack path. Raises on bad adapter tensors as branch_add does.
  bool prepare(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
               const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens, int64_t out);
  // y[o] += the branch's output o for o in [kRows·k0, min(kRows·k1, out)); y holds the base output.
  void add_rows(int64_t k0, int64_t k1, float* y) const;

 private:
  at::Tensor sb_, a_;  // kept alive for add_rows
  const float* nib_ = nullptr;
  const float* ap_ = nullptr;
  int64_t r_ = 0, out_ = 0;
  float scaling_ = 1.f;
};

}  // namespace lordba

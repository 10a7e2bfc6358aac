// The sign branch's entry point for the other kernels of the library (q4.cpp's fused q4_branch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <atomic>
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

// The sign path of one float32 token in parts, for a caller that adds the branch inside its own
// parallel loop over the output rows (q4.cpp's one-token q4_branch, linear.cpp's linear_branch): prepare()
// once on the calling thread (the checks and z = b ⊙ x, in that thread's buffers), then from each thread of
// the loop start() before it computes its blocks of 16 outputs and add_rows() once it has, before the
// calling thread's next prepare. Stage 1 and the lookup tables run in groups of 8 rank components, each
// claimed once by whichever thread comes first (start() takes an even share, add_rows() what is left and
// then waits for the groups other threads run), so the serial part before the loop is only z. The same
// arithmetic as branch_add into a float32 base (bit for bit), whichever thread runs which group.
class RowBranch {
 public:
  static constexpr int64_t kRows = 16;  // add_rows' block of outputs (one AVX-512 vector of them)
  // false (nothing prepared) where branch_add's own path runs instead: x not one contiguous float32
  // token, or the unpack path (every build: AVX-512, AVX2 and portable). Raises on bad adapter tensors as
  // branch_add does.
  // Branches prepared together on one thread (q4_group's members) each take their own `slot` (0, 1, ...):
  // a slot's buffers are reused by that thread's next prepare of the same slot.
  bool prepare(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
               const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens, int64_t out,
               int64_t slot = 0);
  // Asks (prefetch for writing) for this thread's buffers of slots [0, slots), which the token's stream of
  // weights has pushed out of the caches since their last call: before prepare(), beside the tensors.
  static void warm_buffers(int64_t slots);
  // Before this thread computes the blocks [k0, k1) of kRows outputs: asks for their output signs and
  // scales and runs this thread's share of stage 1 (optional: add_rows runs whatever is left).
  void start(int64_t k0, int64_t k1);
  // y[o] += the branch's output o for o in [kRows·k0, min(kRows·k1, out)); y holds the base output.
  void add_rows(int64_t k0, int64_t k1, float* y);

 private:
  bool claim();                   // runs one unclaimed group of stage 1; false when none is left
  void run_group(int64_t g);      // stage 1, m and the nibble tables of rank components [8g, 8g + 8)
  at::Tensor keep_[5];            // contiguous copies of the adapter's tensors, where they were not
  const uint8_t* sa_ = nullptr;   // S_A's and S_B's packed bytes
  const uint8_t* sb_ = nullptr;
  int64_t nbytes_a_ = 0, nbytes_b_ = 0;
  const float* z_ = nullptr;      // b ⊙ x, group-reversed (the calling thread's buffer)
  const float* m_ = nullptr;
  const float* a_ = nullptr;      // float32 output scales, or null with a8_ (int8 codes, converted per block)
  const int8_t* a8_ = nullptr;
  float* a_buf_ = nullptr;        // the codes converted, each thread writing its own blocks
  float* h1_ = nullptr;
  float* h2_ = nullptr;
  float* nib_ = nullptr;
  float total_ = 0.f;             // Σz
  int64_t in_ = 0, ld_ = 0, r_ = 0, out_ = 0, groups_ = 0, share_ = 1;
  float scaling_ = 1.f;
  std::atomic<int64_t> next_{0}, finished_{0};
};
}  // namespace lordba

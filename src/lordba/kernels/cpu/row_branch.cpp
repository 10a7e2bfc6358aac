// RowBranch (branch.h): the branch inside a one-token GEMV's parallel loop (q4.cpp, linear.cpp).
#include <ATen/Parallel.h>

#include "branch.h"
#include "branch_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

namespace lordba {
using namespace impl;

namespace {
// A prepared RowBranch's buffers, as branch_impl's: read by the loop's threads until this thread prepares
// that slot again.
struct Buffers {
  std::vector<float> z, mbuf, bbuf, abuf, h1, h2, nib;
};

// A spin-wait's pause (x86: PAUSE; elsewhere the thread yields).
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// This thread's buffers of `slot` (a deque: adding slots leaves the ones in use in place).
Buffers& buffers(int64_t slot) {
  thread_local std::deque<Buffers> slots;
  while (static_cast<int64_t>(slots.size()) <= slot) slots.emplace_back();
  return slots[static_cast<size_t>(slot)];
}
}  // namespace

void RowBranch::warm_buffers(int64_t slots) {
  for (int64_t i = 0; i < slots; ++i) {
    Buffers& buf = buffers(i);
    for (const std::vector<float>* v : {&buf.z, &buf.mbuf, &buf.bbuf, &buf.h1, &buf.h2}) {  // prepare's writes
      const char* c = reinterpret_cast<const char*>(v->data());
      const int64_t n = static_cast<int64_t>(v->size() * sizeof(float));
      for (int64_t k = 0; k < n; k += 64) __builtin_prefetch(c + k, 1, 3);
    }
  }
}

bool RowBranch::prepare(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                        const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                        int64_t out, int64_t slot) {
  const int64_t in = b.numel(), r = m.numel();
  if (x.scalar_type() != at::kFloat || !x.is_contiguous() || x.numel() != in || in == 0 || sign_max_tokens < 1)
    return false;
  check_factors(sign_A, sign_B, b, m, a);
  check(a.numel() == out, "base must have the output's shape");
  // the tensors as they are where contiguous (the caller holds them for the call), else copies kept here
  auto dense = [&](const at::Tensor& t, int i) -> const at::Tensor& {
    if (t.is_contiguous()) return t;
    keep_[i] = t.contiguous();
    return keep_[i];
  };
  const at::Tensor &sa = dense(sign_A, 0), &sb = dense(sign_B, 1), &bc = dense(b, 2), &mc = dense(m, 3);
  const at::Tensor& ac = dense(a, 4);
  sa_ = sa.data_ptr<uint8_t>();
  sb_ = sb.data_ptr<uint8_t>();
  nbytes_a_ = sa.numel();
  nbytes_b_ = sb.numel();
  in_ = in;
  r_ = r;
  out_ = out;
  ld_ = round_up(in, kChunk);
  groups_ = round_up(r, 8) / 8;
  scaling_ = static_cast<float>(scaling);
  Buffers& buf = buffers(slot);
  auto &z = buf.z, &mbuf = buf.mbuf, &bbuf = buf.bbuf, &abuf = buf.abuf, &h1 = buf.h1, &h2 = buf.h2, &nib = buf.nib;
  z.resize(static_cast<size_t>(ld_));
  if (bc.scalar_type() == at::kChar) {  // the codes divided as codes_float does, fused into b ⊙ x
    scale_reversed<float, int8_t>(x.data_ptr<float>(), bc.data_ptr<int8_t>(), in, ld_, z.data());
  } else {
    scale_reversed<float>(x.data_ptr<float>(), as_float(bc, bbuf), in, ld_, z.data());
  }
  z_ = z.data();
  m_ = as_float(mc, mbuf);
  a8_ = nullptr;
  if (ac.scalar_type() == at::kChar) {  // converted block by block by the threads that read them
    a8_ = ac.data_ptr<int8_t>();
    abuf.resize(static_cast<size_t>(out));
    a_buf_ = abuf.data();
    a_ = a_buf_;
  } else {
    a_ = as_float(ac, abuf);
  }
  total_ = kMasked ? z_total(z_, ld_) : 0.f;
  h1.assign(static_cast<size_t>(r), 0.f);
  h2.assign(static_cast<size_t>(8 * groups_), 0.f);
  nib.resize(static_cast<size_t>(32 * groups_));
  h1_ = h1.data();
  h2_ = h2.data();
  nib_ = nib.data();
  next_.store(0, std::memory_order_relaxed);
  finished_.store(0, std::memory_order_relaxed);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  share_ = (groups_ + threads - 1) / threads;
  return true;
}

void RowBranch::run_group(int64_t g) {
  const int64_t j0 = 8 * g, j1 = std::min(r_, j0 + 8);
  prefetch(sa_ + j0 * in_ / 8, (j1 - j0) * in_ / 8 + 1);
  // stage1's sums of these rows (each row's sums are the same whichever rows share its pass), then h ⊙ m
  tiled_sums(sa_, nbytes_a_, z_, 1, in_, ld_, r_, j0, j1, h1_);
  const bool finite = std::isfinite(total_);  // else the signed sums, as stage1's (inf − inf would be NaN)
  for (int64_t j = j0; j < j1; ++j) {
    const float h = !kMasked ? h1_[j] : finite ? 2.f * h1_[j] - total_ : signed_sum(sa_, nbytes_a_, z_, in_, j);
    h2_[j] = h * m_[j];
  }
  build_nibbles(h2_ + j0, 1, 8, nib_ + 32 * g);
}

bool RowBranch::claim() {
  const int64_t g = next_.fetch_add(1, std::memory_order_relaxed);
  if (g >= groups_) return false;
  run_group(g);
  finished_.fetch_add(1, std::memory_order_release);
  return true;
}

void RowBranch::start(int64_t k0, int64_t k1) {
  const int64_t o0 = std::min(out_, kRows * k0), o1 = std::min(out_, kRows * k1);
  prefetch(sb_ + o0 * r_ / 8, (o1 - o0) * r_ / 8 + 1);
  if (a8_ != nullptr) prefetch(a8_ + o0, o1 - o0);
  for (int64_t i = 0; i < share_ && claim(); ++i) {
  }
}

void RowBranch::add_rows(int64_t k0, int64_t k1, float* y) {
  while (claim()) {
  }
  const int64_t o0 = std::min(out_, kRows * k0), o1 = std::min(out_, kRows * k1);
  if (a8_ != nullptr) codes_to_float(a8_ + o0, o1 - o0, a_buf_ + o0);  // this thread's blocks of a
  while (finished_.load(std::memory_order_acquire) < groups_) spin_pause();
  stage2_blocks<float>(sb_, nbytes_b_, nib_, 1, r_, 8 * groups_, out_, a_, scaling_, y, y, k0, k1);
}


}  // namespace lordba

// The `branch_rows` op: the rows of one batch through their own adapters (see branch.cpp's overview).
#include <ATen/Parallel.h>
#include <ATen/ops/tensor.h>

#include "branch_internal.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace lordba::impl {

namespace {

// ---------------------------------------------------------------- many adapters in one batch
// Rows of one batch routed to their own adapters (S-LoRA/Punica's BGMV on packed signs): batch row i
// uses adapter index[i] (-1: none, the base output as it is). The rows of each adapter run as one
// group through the same path and the same fused `base +` as a call of `branch` on those rows alone,
// so each row's output equals its adapter's own, bit for bit. One call per layer instead of one
// Python-level branch call (and a gather and a scatter) per adapter.
template <typename x_t, typename out_t>
void rows_sign_group(const at::Tensor& x2, const at::Tensor& base2, at::Tensor& y, const std::vector<int64_t>& rows,
                     int64_t L, const at::Tensor& sa, const at::Tensor& sb, const float* b, const float* m,
                     const float* a, int64_t r, float s) {
  const int64_t in = x2.size(1), out = y.size(1), T = static_cast<int64_t>(rows.size()) * L;
  const x_t* xp = x2.data_ptr<x_t>();
  const out_t* bp = base2.data_ptr<out_t>();
  out_t* yp = y.data_ptr<out_t>();
  const uint8_t* pa = sa.data_ptr<uint8_t>();
  const uint8_t* pb = sb.data_ptr<uint8_t>();
  if (rows.size() == 1) {  // decode: one sequence per adapter, read and written in place
    const int64_t t0 = rows[0] * L;
    sign_path<x_t, out_t>(xp + t0 * in, L, in, pa, sa.numel(), pb, sb.numel(), b, m, a, r, out, s, bp + t0 * out,
                          yp + t0 * out);
    return;
  }
  thread_local std::vector<x_t> xg;
  thread_local std::vector<out_t> bg, yg;
  xg.resize(static_cast<size_t>(T * in));
  bg.resize(static_cast<size_t>(T * out));
  yg.resize(static_cast<size_t>(T * out));
  for (size_t j = 0; j < rows.size(); ++j) {
    std::memcpy(xg.data() + j * L * in, xp + rows[j] * L * in, sizeof(x_t) * L * in);
    std::memcpy(bg.data() + j * L * out, bp + rows[j] * L * out, sizeof(out_t) * L * out);
  }
  sign_path<x_t, out_t>(xg.data(), T, in, pa, sa.numel(), pb, sb.numel(), b, m, a, r, out, s, bg.data(), yg.data());
  for (size_t j = 0; j < rows.size(); ++j)
    std::memcpy(yp + rows[j] * L * out, yg.data() + j * L * out, sizeof(out_t) * L * out);
}

template <typename x_t>
void rows_sign_out(const at::Tensor& x2, const at::Tensor& base2, at::Tensor& y, const std::vector<int64_t>& rows,
                   int64_t L, const at::Tensor& sa, const at::Tensor& sb, const float* b, const float* m,
                   const float* a, int64_t r, float s) {
  switch (y.scalar_type()) {
    case at::kFloat: return rows_sign_group<x_t, float>(x2, base2, y, rows, L, sa, sb, b, m, a, r, s);
    case at::kBFloat16: return rows_sign_group<x_t, c10::BFloat16>(x2, base2, y, rows, L, sa, sb, b, m, a, r, s);
    case at::kHalf: return rows_sign_group<x_t, c10::Half>(x2, base2, y, rows, L, sa, sb, b, m, a, r, s);
    default: check(false, "the output dtype must be float32, bfloat16 or float16");
  }
}

// branch_rows runs its sign-path groups in parallel from this much work (tokens x r x (in + out)).
constexpr int64_t kRowsParallelWork = int64_t{1} << 20;

}  // namespace

at::Tensor branch_rows(const at::Tensor& x, const at::Tensor& index, at::TensorList sign_A, at::TensorList sign_B,
                       at::TensorList b, at::TensorList m, at::TensorList a, at::ArrayRef<double> scaling,
                       at::IntArrayRef sign_max_tokens, const at::Tensor& base) {
  const int64_t K = static_cast<int64_t>(sign_A.size());
  check(static_cast<int64_t>(sign_B.size()) == K && static_cast<int64_t>(b.size()) == K &&
            static_cast<int64_t>(m.size()) == K && static_cast<int64_t>(a.size()) == K &&
            static_cast<int64_t>(scaling.size()) == K && static_cast<int64_t>(sign_max_tokens.size()) == K,
        "branch_rows: one sign_A, sign_B, b, m, a, scaling and sign_max_tokens per adapter");
  check(x.dim() >= 1 && base.dim() == x.dim() && base.size(0) == x.size(0), "branch_rows: x and base need the same rows");
  check(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == x.size(0),
        "branch_rows: index must be int64 with one entry per batch row");
  const auto st = x.scalar_type();
  check(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t B = x.size(0), in = x.size(-1), out = base.size(-1);
  int64_t tokens = 1, base_tokens = 1;  // not numel / in: in may be 0
  for (int64_t d = 0; d + 1 < x.dim(); ++d) tokens *= x.size(d), base_tokens *= base.size(d);
  check(tokens == base_tokens, "branch_rows: x and base need the same tokens");
  const at::Tensor idx = index.cpu().contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(K));
  for (int64_t i = 0; i < B; ++i) {
    check(ip[i] >= -1 && ip[i] < K, "branch_rows: an index is outside [-1, number of adapters)");
    if (ip[i] >= 0) rows[static_cast<size_t>(ip[i])].push_back(i);
  }
  // No rows, rows of no tokens, in = 0 or out = 0: no branch to add, the base as it is (as `branch` gives it;
  // the sign path divided by its zero tokens: SIGFPE killed the process).
  if (x.numel() == 0 || base.numel() == 0) return base.clone(at::MemoryFormat::Contiguous);
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const at::Tensor base2 = base.reshape({-1, out}).contiguous();
  const int64_t L = x2.size(0) / B;  // tokens per batch row
  at::Tensor y = base2.clone();
  check(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf,
        "the output dtype must be float32, bfloat16 or float16");
  struct Group {
    int64_t k;
    at::Tensor sa, sb, b, m, a;
  };
  std::vector<Group> groups;  // adapters on the sign path, run below (in parallel with several threads)
  auto prefetch_group = [](const Group& g) {
    for (const at::Tensor* t : {&g.sa, &g.sb, &g.b, &g.m, &g.a}) prefetch(t->data_ptr(), t->nbytes());
  };
  std::vector<int64_t> unpacked;  // adapters on the unpack path (many tokens: prefill)
  for (int64_t k = 0; k < K; ++k) {
    const auto& group = rows[static_cast<size_t>(k)];
    if (group.empty()) continue;
    const int64_t r = m[k].numel();
    check(b[k].numel() == in && a[k].numel() == out, "branch_rows: an adapter's scales do not match x and base");
    check(m[k].numel() > 0, "an adapter's rank (scale_mid's length) must be at least 1");
    check(sign_A[k].scalar_type() == at::kByte && sign_B[k].scalar_type() == at::kByte, "signs must be uint8");
    check(sign_A[k].numel() == (r * in + 7) / 8 && sign_B[k].numel() == (out * r + 7) / 8,
          "packed sign sizes do not match the scale vectors");
    check(scale_dtype_ok(b[k], true) && scale_dtype_ok(m[k], false) && scale_dtype_ok(a[k], true),
          "scales must be float32, float16 or bfloat16 (b and a also int8 codes)");
    const int64_t T = static_cast<int64_t>(group.size()) * L;
    if (T > sign_max_tokens[k]) {  // many tokens (prefill): the unpack path, run below
      unpacked.push_back(k);
      continue;
    }
    groups.push_back({k, sign_A[k].contiguous(), sign_B[k].contiguous(), b[k].contiguous(), m[k].contiguous(),
                      a[k].contiguous()});
  }
  // The unpack path, exactly as `branch` runs it on the adapter's rows, one adapter after the other
  // (its GEMMs use every thread, as the adapter's own call does: a GEMM run on one thread inside a
  // parallel region over the adapters is blocked differently by the BLAS and differs in the last bits).
  auto unpack_one = [&](int64_t k) {
    const auto& group = rows[static_cast<size_t>(k)];
    std::vector<int64_t> tokens;
    tokens.reserve(group.size() * static_cast<size_t>(L));
    for (int64_t i : group)
      for (int64_t t = 0; t < L; ++t) tokens.push_back(i * L + t);
    const at::Tensor ti = at::tensor(tokens, at::kLong);
    const at::Tensor yk = branch(x2.index_select(0, ti), sign_A[k], sign_B[k], b[k], m[k], a[k], scaling[k],
                                 sign_max_tokens[k], base2.index_select(0, ti));
    y.index_copy_(0, ti, yk);  // rows of this adapter only
  };
  for (int64_t k : unpacked) unpack_one(k);
  // Each group writes its own rows of y: groups run independently, each exactly as alone.
  auto run = [&](const Group& g) {
    thread_local std::vector<float> bbuf, mbuf, abuf;
    const float* bp = as_float(g.b, bbuf);
    const float* mp = as_float(g.m, mbuf);
    const float* ap = as_float(g.a, abuf);
    const auto& group = rows[static_cast<size_t>(g.k)];
    const int64_t r = g.m.numel();
    const float s = static_cast<float>(scaling[g.k]);
    switch (st) {
      case at::kFloat: rows_sign_out<float>(x2, base2, y, group, L, g.sa, g.sb, bp, mp, ap, r, s); break;
      case at::kBFloat16: rows_sign_out<c10::BFloat16>(x2, base2, y, group, L, g.sa, g.sb, bp, mp, ap, r, s); break;
      default: rows_sign_out<c10::Half>(x2, base2, y, group, L, g.sa, g.sb, bp, mp, ap, r, s);
    }
  };
  // A parallel region only for work that pays for it: a decode step's rows (one token per adapter)
  // take a few microseconds each, and a parallel region of that size costs more than it saves
  // whenever the cores are shared (a server's HTTP threads, its clients): its second thread must be
  // scheduled, and spins meanwhile. The single-adapter path's grains decide the same (stage1, stage2).
  const int64_t n = static_cast<int64_t>(groups.size());
  int64_t work = 0;  // sign operations: tokens x r x (in + out)
  for (const auto& g : groups)
    work += static_cast<int64_t>(rows[static_cast<size_t>(g.k)].size()) * L * g.m.numel() * (in + out);
  if (n > 1 && at::get_num_threads() > 1 && work >= kRowsParallelWork) {
    at::parallel_for(0, n, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) run(groups[static_cast<size_t>(g)]);
    });
  } else {
    // Serving many adapters, each group's few kB of signs and scales usually come from memory, not
    // cache: the next group's are fetched while this one computes.
    for (int64_t j = 0; j < n; ++j) {
      if (j + 1 < n) prefetch_group(groups[static_cast<size_t>(j + 1)]);
      run(groups[static_cast<size_t>(j)]);
    }
  }
  return y.reshape(base.sizes());
}

}  // namespace lordba::impl

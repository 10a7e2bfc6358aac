// CPU attention of one decoding position over a KV cache kept in float16, bfloat16 or float32
// (lordba; see docs/kernels.md).
//
//   out[b, h, g] = Σ_j softmax_j(scale · q[b, h, g] · k[b, h, j] + mask[j]) · v[b, h, j]
//
// q: [B, H, G, D] float32 — the G query heads that share key/value head h (grouped-query attention,
// packed as lordba.nn.attention packs them); k, v: [B, H, S, D], the whole static cache; mask: none,
// or [B or 1, 1, 1, S], bool (true: attend) or float (added to the scores). Decoding reads the whole
// cache every token, so its bytes are the cost: a float16 cache halves them against float32, and each
// key and value row is read once for the G query heads. Arithmetic is float32. The positions of a
// head are split into blocks run in parallel, merged by their log-sum-exp (flash-decoding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "shim.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lordba_attn {
namespace {

constexpr int64_t kBlock = 256;  // positions per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__)
// 16 elements of a cache row as float32.
template <typename kv_t>
inline __m512 load16(const kv_t* p) {
  if constexpr (std::is_same_v<kv_t, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else if constexpr (std::is_same_v<kv_t, c10::BFloat16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_loadu_ps(p);
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LORDBA_ATTN_AVX2 1
// 8 elements of a cache row as float32 (AVX2 builds: the generic block's loops below, 8 lanes).
template <typename kv_t>
inline __m256 load8(const kv_t* p) {
  if constexpr (std::is_same_v<kv_t, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<kv_t, c10::BFloat16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_loadu_ps(p);
  }
}

inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}
#endif

// dst[0, n) = src as float32.
template <typename kv_t>
inline void to_float(const kv_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16<kv_t>(src + i));
#elif defined(LORDBA_ATTN_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<kv_t>(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(LORDBA_ATTN_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  sum = sum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[0, n) += w · x
inline void axpy(float w, const float* x, int64_t n, float* y) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(LORDBA_ATTN_AVX2)
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

// exp_shifted's vector e^x (AVX-512 and AVX2 alike): arguments below kExpLow give 0; ln 2 in two parts; e^r's
// degree-6 Taylor coefficients, lowest first.
constexpr float kExpLow = -87.f, kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[7] = {1.f, 1.f, 0.5f, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720};

// s[j] = exp(s[j] − top) for j < n (arguments ≤ 0; −inf gives 0); returns Σ s[j].
inline float exp_shifted(float* s, int64_t n, float top) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  // e^x = 2^k · e^r, k = round(x·log2 e), r = x − k·ln 2 (two-part ln 2), e^r by its degree-6 Taylor
  // polynomial on |r| ≤ ln2/2 (relative error < 2e-7); 2^k by vscalefps. Below −87 the result is 0.
  const __m512 shift = _mm512_set1_ps(top), lo = _mm512_set1_ps(kExpLow);
  const __m512 log2e = _mm512_set1_ps(kLog2e), ln2_hi = _mm512_set1_ps(kLn2Hi), ln2_lo = _mm512_set1_ps(kLn2Lo);
  const float* c = kExpPoly;
  __m512 total = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + j), shift);
    const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    const __m512 xc = _mm512_max_ps(x, lo);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, xc));
    __m512 p = _mm512_set1_ps(c[6]);
    for (int q = 5; q >= 0; --q) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[q]));
    const __m512 e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k));
    _mm512_storeu_ps(s + j, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#elif defined(LORDBA_ATTN_AVX2)
  // The same e^x in 8 lanes; 2^k (k in [-126, 0] here) built in the exponent bits.
  const __m256 shift = _mm256_set1_ps(top), lo = _mm256_set1_ps(kExpLow);
  const __m256 log2e = _mm256_set1_ps(kLog2e), ln2_hi = _mm256_set1_ps(kLn2Hi), ln2_lo = _mm256_set1_ps(kLn2Lo);
  const float* c = kExpPoly;
  __m256 total = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + j), shift);
    const __m256 live = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    const __m256 xc = _mm256_max_ps(x, lo);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, xc));
    __m256 p = _mm256_set1_ps(c[6]);
    for (int q = 5; q >= 0; --q) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[q]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  sum = sum8(total);
#endif
  for (; j < n; ++j) {
    s[j] = s[j] == kNegInf ? 0.f : std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

// For each of G rows of n scores: top[g] = its maximum, the row replaced by exp(score − top) and
// total[g] = their sum; a row whose every position is masked (−inf) becomes zeros, total 0.
inline void softmax_parts(float* scores, int64_t G, int64_t n, float* top, float* total) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * n;
    top[g] = *std::max_element(s, s + n);
    if (top[g] == kNegInf) {
      std::fill(s, s + n, 0.f);  // no weight anywhere
      total[g] = 0.f;
    } else {
      total[g] = exp_shifted(s, n, top[g]);
    }
  }
}

struct Shape {
  int64_t B, H, G, S, D;
};

// One block [j0, j1) of head (b, h): for each query g, the block's maximum score, Σ exp and the
// unnormalized Σ exp · v (D floats) into part.
template <typename kv_t>
void block(const Shape& sh, const float* q, const kv_t* k, const kv_t* v, const float* mask, float scale, int64_t j0,
           int64_t j1, float* top, float* total, float* part) {
  const int64_t n = j1 - j0, G = sh.G, D = sh.D;
  thread_local std::vector<float> scores, row;
  scores.resize(static_cast<size_t>(G * n));
  row.resize(static_cast<size_t>(D));
  for (int64_t j = j0; j < j1; ++j) {
    const float add = mask != nullptr ? mask[j] : 0.f;
    if (add == kNegInf) {
      for (int64_t g = 0; g < G; ++g) scores[g * n + j - j0] = kNegInf;
      continue;
    }
    to_float(k + j * D, D, row.data());
    for (int64_t g = 0; g < G; ++g) scores[g * n + j - j0] = scale * dot(q + g * D, row.data(), D) + add;
  }
  softmax_parts(scores.data(), G, n, top, total);
  std::fill(part, part + G * D, 0.f);
  for (int64_t j = j0; j < j1; ++j) {
    bool any = false;
    for (int64_t g = 0; g < G; ++g) any = any || scores[g * n + j - j0] != 0.f;
    if (!any) continue;
    to_float(v + j * D, D, row.data());
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + j - j0], row.data(), D, part + g * D);
  }
}

#if defined(__AVX512F__)
// out[i] = Σ of the 16 lanes of v[i], for i < 16, as one vector: a transposing tree of unpacks and
// lane shuffles (45 instructions for 16 sums instead of ~8 per sum).
inline __m512 sum16(const __m512* v) {
  __m512 s1[8], s2[4];
  for (int p = 0; p < 8; ++p)
    s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  for (int q = 0; q < 4; ++q) {
    const __m512d c = _mm512_castps_pd(s1[2 * q]), d = _mm512_castps_pd(s1[2 * q + 1]);
    s2[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
  const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// part[gi·D ..] = Σ_j p[gi·n + j − j0] · v_j for GN queries, the sums in registers: each value row
// converted once for them all. Masked rows are never read.
template <typename kv_t, int NC, int GN>
void v_pass(const kv_t* v, const float* p, int64_t n, int64_t j0, int64_t j1, const float* mask, float* part) {
  constexpr int64_t D = 16 * NC;
  __m512 o[GN * NC];
  for (int i = 0; i < GN * NC; ++i) o[i] = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    if (mask != nullptr && mask[j] == kNegInf) continue;
    __m512 row[NC];
    for (int c = 0; c < NC; ++c) row[c] = load16<kv_t>(v + j * D + 16 * c);
    for (int gi = 0; gi < GN; ++gi) {
      const __m512 w = _mm512_set1_ps(p[gi * n + j - j0]);
      for (int c = 0; c < NC; ++c) o[gi * NC + c] = _mm512_fmadd_ps(w, row[c], o[gi * NC + c]);
    }
  }
  for (int gi = 0; gi < GN; ++gi)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(part + gi * D + 16 * c, o[gi * NC + c]);
}

// `block` for head size 16·NC: each key and value row converted once into registers (no copy);
// the G queries' products with 16 key rows summed by one transposing tree per query.
template <typename kv_t, int NC>
void block_vec(const Shape& sh, const float* q, const kv_t* k, const kv_t* v, const float* mask, float scale,
               int64_t j0, int64_t j1, float* top, float* total, float* part) {
  constexpr int64_t D = 16 * NC;
  const int64_t n = j1 - j0, G = sh.G;
  thread_local std::vector<float> scores;
  thread_local std::vector<__m512> acc;  // [g][16]: one row's 16 partial products per query
  scores.resize(static_cast<size_t>(G * n));
  acc.resize(static_cast<size_t>(G * 16));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = j0; t0 < j1; t0 += 16) {
    const int64_t rows = std::min<int64_t>(16, j1 - t0);
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t j = t0 + i;
      if (i >= rows || (mask != nullptr && mask[j] == kNegInf)) {  // never read
        for (int64_t g = 0; g < G; ++g) acc[g * 16 + i] = _mm512_setzero_ps();
        continue;
      }
      __m512 row[NC];
      for (int c = 0; c < NC; ++c) row[c] = load16<kv_t>(k + j * D + 16 * c);
      for (int64_t g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), row[0]);
        for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * c), row[c], a);
        acc[g * 16 + i] = a;
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1u);
    const __m512 add = mask != nullptr ? _mm512_maskz_loadu_ps(live, mask + t0) : _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(scores.data() + g * n + (t0 - j0), live,
                            _mm512_fmadd_ps(vscale, sum16(acc.data() + g * 16), add));
  }
  softmax_parts(scores.data(), G, n, top, total);
  constexpr int64_t GB = NC <= 4 ? 4 : 16 / NC;  // queries whose sums stay in registers
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const float* p = scores.data() + g0 * n;
    switch (std::min(GB, G - g0)) {
      case 1: v_pass<kv_t, NC, 1>(v, p, n, j0, j1, mask, part + g0 * D); break;
      case 2: v_pass<kv_t, NC, 2>(v, p, n, j0, j1, mask, part + g0 * D); break;
      case 3: v_pass<kv_t, NC, 3 <= GB ? 3 : 1>(v, p, n, j0, j1, mask, part + g0 * D); break;
      default: v_pass<kv_t, NC, 4 <= GB ? 4 : 1>(v, p, n, j0, j1, mask, part + g0 * D); break;
    }
  }
}
#endif

// The block function for this head size.
template <typename kv_t>
auto block_for(int64_t D) {
  using Fn = void (*)(const Shape&, const float*, const kv_t*, const kv_t*, const float*, float, int64_t, int64_t,
                      float*, float*, float*);
#if defined(__AVX512F__)
  switch (D) {
    case 64: return static_cast<Fn>(&block_vec<kv_t, 4>);
    case 128: return static_cast<Fn>(&block_vec<kv_t, 8>);
    case 256: return static_cast<Fn>(&block_vec<kv_t, 16>);
    default: break;
  }
#endif
  (void)D;
  return static_cast<Fn>(&block<kv_t>);
}

template <typename kv_t>
void attend(const Shape& sh, const float* q, const kv_t* k, const kv_t* v, const float* mask, int64_t mask_batch,
            float scale, float* out) {
  const int64_t blocks = (sh.S + kBlock - 1) / kBlock, items = sh.B * sh.H * blocks, G = sh.G, D = sh.D;
  std::vector<float> top(static_cast<size_t>(items * G)), total(top.size()), part(static_cast<size_t>(items * G * D));
  const auto run = block_for<kv_t>(D);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / blocks, c = i % blocks, b = bh / sh.H;
      const int64_t j0 = c * kBlock, j1 = std::min(sh.S, j0 + kBlock);
      const float* mk = mask != nullptr ? mask + (mask_batch == 1 ? 0 : b) * sh.S : nullptr;
      run(sh, q + bh * G * D, k + bh * sh.S * D, v + bh * sh.S * D, mk, scale, j0, j1, top.data() + i * G,
                  total.data() + i * G, part.data() + i * G * D);
    }
  });
  for (int64_t bh = 0; bh < sh.B * sh.H; ++bh)
    for (int64_t g = 0; g < G; ++g) {
      float best = kNegInf;
      for (int64_t c = 0; c < blocks; ++c) best = std::max(best, top[(bh * blocks + c) * G + g]);
      float* o = out + (bh * G + g) * D;
      std::fill(o, o + D, 0.f);
      if (best == kNegInf) continue;  // every position masked: zeros
      float denom = 0.f;
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t it = bh * blocks + c;
        if (top[it * G + g] == kNegInf) continue;  // a fully masked block adds nothing
        const float w = std::exp(top[it * G + g] - best);
        denom += w * total[it * G + g];
        axpy(w, part.data() + (it * G + g) * D, D, o);
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= denom;
    }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lordba::decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "lordba::decode_attention: q must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "lordba::decode_attention: k and v must have one dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "lordba::decode_attention: k and v must have one shape");
  const Shape sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == sh.B && k.size(1) == sh.H && k.size(3) == sh.D,
              "lordba::decode_attention: k must be [B, H, S, D] for q [B, H, G, D]");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  std::vector<float> additive;  // the mask as a float added to the scores
  int64_t mask_batch = 1;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(2) == 1 && m.size(3) == sh.S &&
                    (m.size(0) == 1 || m.size(0) == sh.B),
                "lordba::decode_attention: mask must be [B or 1, 1, 1, S]");
    mask_batch = m.size(0);
    const at::Tensor mc = m.scalar_type() == at::kBool ? m.contiguous() : m.to(at::kFloat).contiguous();
    additive.resize(static_cast<size_t>(mask_batch * sh.S));
    if (m.scalar_type() == at::kBool) {
      const bool* keep = mc.data_ptr<bool>();
      for (size_t i = 0; i < additive.size(); ++i) additive[i] = keep[i] ? 0.f : kNegInf;
    } else {
      std::copy(mc.data_ptr<float>(), mc.data_ptr<float>() + additive.size(), additive.begin());
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  const float* mp = mask.has_value() ? additive.data() : nullptr;
  const float s = static_cast<float>(scale);
  switch (k.scalar_type()) {
    case at::kHalf:
      attend<c10::Half>(sh, qc.data_ptr<float>(), kc.data_ptr<c10::Half>(), vc.data_ptr<c10::Half>(), mp, mask_batch,
                        s, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      attend<c10::BFloat16>(sh, qc.data_ptr<float>(), kc.data_ptr<c10::BFloat16>(), vc.data_ptr<c10::BFloat16>(), mp,
                            mask_batch, s, out.data_ptr<float>());
      break;
    case at::kFloat:
      attend<float>(sh, qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), mp, mask_batch, s,
                    out.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "lordba::decode_attention: k and v must be float16, bfloat16 or float32");
  }
  return out;
}

}  // namespace
}  // namespace lordba_attn

TORCH_LIBRARY_FRAGMENT(lordba, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) { lib.impl("decode_attention", &lordba_attn::decode_attention); }

LORDBA_SHIM aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                            AtenTensorHandle* mask, double scale, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    lordba_shim::result(lordba_attn::decode_attention(lordba_shim::tensor(q), lordba_shim::tensor(k),
                                                      lordba_shim::tensor(v), lordba_shim::optional(mask), scale),
                        ret);
  });
}

// The one-token kernels on reduced-precision activations (decode with compute "fast" / "fast-int8"):
// bfloat16 (AVX512_BF16) and int8 (AVX512-VNNI, or AVX2). Layout and arithmetic in q4.cpp's header comment.

#include "q4.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lordba_q4 {
namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LORDBA_Q4_INT8 1
// acc + the sums of each 4 adjacent products u8 · s8 (32 products, 8 int32 lanes): one `vpdpbusd`.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LORDBA_Q4_INT8 1
// The same int32 sums on AVX2 (llama.cpp's Q8 dot there): `vpmaddubsw` adds pairs of products to int16 (a
// nibble times an int8 code, at most 2 · 15 · 127 = 3810 per pair: never saturated), `vpmaddwd` with ones adds
// pairs of those to int32. Exact integers either way, so the same results as the VNNI kernel, bit for bit.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

#if defined(LORDBA_Q4_INT8)
// One token, int8 activations (int8_dot): x is quantized per weight group to int8 codes (x ≈ dx_g ·
// x8, dx_g = max|x_g| / 127, as llama.cpp's Q8 blocks), and each 32-input chunk of a row is one
// dot_u8s8 of its 32 unsigned nibbles (one 16-byte load, shifted and masked into a 256-bit vector
// in input order) with the 32 int8 codes: 32 products per step, summed in int32 over the group,
// scaled once per group by s_g · dx_g. The offset term sum_g m_g · sum(x_g) uses the exact float32 sums.
// xq: the codes, zero past `in` (so padding needs no mask); dx: one step per group.
void row_dot1_i8(const Packed& p, int64_t o, const int8_t* xq, const float* dx, const float* xsum, float* y) {
  const int64_t chunks = p.group / kChunk;
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i shifts = _mm256_setr_epi64x(0, 0, 4, 4);  // low nibbles in the lower half, high in the upper
  const uint8_t* q = p.q + o * p.row_bytes;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0, k = 0; g < p.groups; ++g) {
    __m256i dot = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c, k += kChunk) {
      const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      const __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(both, shifts), low4);
      dot = dot_u8s8(dot, codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k)));
    }
    const __m256 f = _mm256_set1_ps(half_to_float(p.s[o * p.groups + g]) * dx[g]);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), f, acc);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  y[o] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1))) + row_offset(p, o, xsum);
}

// x (one token) → int8 codes per group (zero-padded to the padded row) and the group steps.
void quantize_groups(const Packed& p, const float* x, std::vector<int8_t>& xq, std::vector<float>& dx) {
  xq.assign(static_cast<size_t>(p.groups * p.group), 0);
  dx.assign(static_cast<size_t>(p.groups), 0.f);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min((g + 1) * p.group, p.in);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    if (amax == 0.f) continue;
    const float step = amax / 127.f, inv = 127.f / amax;
    dx[g] = step;
    for (int64_t k = k0; k < k1; ++k) xq[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LORDBA_Q4_BF16 1
// One token, bfloat16 activations (bf16, the `fast` decode): every 16 stored bytes of a row are
// broadcast to the four 128-bit lanes of a register, its 16-bit words shifted right by 0, 4, 8, 12 (one
// shift per lane) and masked to one nibble n each, OR-ed with 0x4300 — the bfloat16 of 128 + n, exact —
// and multiplied with 32 bfloat16 activations by one `vdpbf16ps` (float32 accumulation): 4 instructions
// per 32 products where the float32 kernel needs 8. x is rounded to bfloat16 once per call and laid out
// in that order (permute_bf16), so the weights need no shuffling; the 128 · Σx term is taken off per
// group. An 8-bit code is two nibbles (16 · high + low): the same kernel, 16 inputs per 16 bytes, the
// high nibble's activation 16 · x (exact in bfloat16).
struct XBf16 {
  std::vector<uint16_t> x;  // 32 bfloat16 words per 16 stored bytes, zero past `in`
  std::vector<float> sum;   // per group: the sum of its words (for the 128 · Σx term)
};

// Word i (0..7) of lane k (0..3) of a 16-byte chunk holds bytes 2i, 2i+1; shifted by 4k it exposes
// k = 0: low nibble of byte 2i, 1: its high nibble, 2: low nibble of byte 2i+1, 3: its high nibble.
void permute_bf16_scalar(const Packed& p, const float* x, XBf16& xb) {
  const int64_t stored_chunks = p.row_bytes / 16;
  xb.x.assign(static_cast<size_t>(stored_chunks * 32), 0);
  xb.sum.assign(static_cast<size_t>(p.groups), 0.f);
  const int64_t chunks_per_group = stored_chunks / p.groups;
  for (int64_t c = 0; c < stored_chunks; ++c) {
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < 8; ++i) {
        const int byte = 2 * i + (k >> 1), high = k & 1;
        int64_t input;
        float factor = 1.f;
        if (p.bits == 4) {
          input = c * 32 + byte + 16 * high;  // byte j: input j (low), j + 16 (high)
        } else {
          input = c * 16 + byte;  // one code per byte: 16 * high + low
          factor = high ? 16.f : 1.f;
        }
        if (input >= p.in) continue;
        const c10::BFloat16 b(x[input] * factor);
        xb.x[c * 32 + k * 8 + i] = b.x;
        xb.sum[c / chunks_per_group] += static_cast<float>(b);
      }
    }
  }
}

// permute_bf16_scalar's words and sums, the same bits: a 4-bit row's 32 inputs of a chunk rounded and
// permuted in registers (one vpermw), each group's sum added in the same order as there, the groups side
// by side. 8-bit rows (the head) take the scalar path.
void permute_bf16(const Packed& p, const float* x, XBf16& xb) {
  if (p.bits != 4) return permute_bf16_scalar(p, x, xb);
  const int64_t stored_chunks = p.row_bytes / 16;
  xb.x.resize(static_cast<size_t>(stored_chunks * 32));
  xb.sum.assign(static_cast<size_t>(p.groups), 0.f);
  // word j = 8k + i of a chunk holds input 2i + (k >> 1) + 16 (k & 1) (permute_bf16_scalar's order)
  alignas(64) static const auto order = [] {
    std::array<uint16_t, 32> o{};
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 8; ++i) o[8 * k + i] = static_cast<uint16_t>(2 * i + (k >> 1) + 16 * (k & 1));
    return o;
  }();
  const __m512i idx = _mm512_load_si512(order.data());
  uint16_t* w = xb.x.data();
  for (int64_t c = 0; c < stored_chunks; ++c) {
    const int64_t left = p.in - c * 32;
    const __mmask16 m0 = left >= 16 ? 0xFFFF : (left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0);
    const __mmask16 m1 = left >= 32 ? 0xFFFF : (left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0);
    const __m256i lo = bf16_words(_mm512_maskz_loadu_ps(m0, x + c * 32));
    const __m256i hi = bf16_words(_mm512_maskz_loadu_ps(m1, x + c * 32 + 16));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    _mm512_storeu_si512(w + c * 32, _mm512_permutexvar_epi16(idx, both));
  }
  const int64_t per_group = stored_chunks / p.groups * 32;  // words of a group, summed in order
  float* sum = xb.sum.data();
  for (int64_t j = 0; j < per_group; ++j)
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint32_t bits = static_cast<uint32_t>(w[g * per_group + j]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      sum[g] += v;
    }
}

// R rows at a time (R independent accumulator chains; each 32-input slice of x loaded once for the R
// rows), each row's arithmetic in the same order as one row alone. Four rows per step, measured on an
// Intel Xeon host (SmolLM2-135M's 211 layers, one token, the caches flushed before each sweep, paired
// in one process): 0.95x the time of one row at a time on 1 thread, 0.82x on 2; the whole --aot
// decode step 0.96x. (An AMD EPYC host had measured one row at a time best: its hardware
// prefetcher follows a single stream; these are 4 streams.)
template <int R>
void rows_dot1_bf16(const Packed& p, int64_t o, const XBf16& xb, const float* xsum, float* y) {
  const int64_t chunks = p.row_bytes / 16 / p.groups;
  const __m512i shifts = _mm512_set_epi64(0x000C000C000C000C, 0x000C000C000C000C, 0x0008000800080008,
                                          0x0008000800080008, 0x0004000400040004, 0x0004000400040004, 0, 0);
  const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  const uint8_t* q = p.q + o * p.row_bytes;
  const uint16_t* xw = xb.x.data();
  __m512 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    corr[r] = 0.f;
  }
  for (int64_t g = 0, b = 0; g < p.groups; ++g) {  // b: the stored byte
    __m512 part[R];
    for (int r = 0; r < R; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, b += 16) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xw + 2 * b);
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * p.row_bytes + b));
        const __m512i codes =
            _mm512_ternarylogic_epi32(_mm512_srlv_epi16(_mm512_broadcast_i32x4(bytes), shifts), nibble, bias, 0xEA);
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)codes, xv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float sg = half_to_float(p.s[(o + r) * p.groups + g]);
      acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(sg), acc[r]);
      corr[r] += sg * xb.sum[g];
    }
  }
  for (int r = 0; r < R; ++r)
    y[o + r] = _mm512_reduce_add_ps(acc[r]) - 128.f * corr[r] + row_offset(p, o + r, xsum);
}

// Rows [o, o1) in steps of 4, the rest one by one (rows_by_four).
void range_dot1_bf16(const Packed& p, int64_t o, int64_t o1, const XBf16& xb, const float* xsum, float* y) {
  rows_by_four(
      p, o, o1, [&](int64_t r) { rows_dot1_bf16<4>(p, r, xb, xsum, y); },
      [&](int64_t r) { rows_dot1_bf16<1>(p, r, xb, xsum, y); });
}
#endif

}  // namespace

bool dot1_reduced(const Member* ms, int64_t n, const float* x, const float* xsum, bool bf16, bool int8_dot) {
  const Packed& p = ms[0].p;  // the input's layout (in, group, bits: the members')
#if defined(LORDBA_Q4_BF16)
  if (bf16 && !(int8_dot && p.bits == 4)) {
    // this thread's, assigned per call and read by the loop's threads until it returns: the loop's lambdas
    // capture the reference (a thread_local named inside them would be each worker's own)
    thread_local XBf16 kept;
    XBf16& xb = kept;
    permute_bf16(p, x, xb);
    member_blocks(ms, n, [&](const Member& mb, int64_t o0, int64_t o1) {
      range_dot1_bf16(mb.p, o0, o1, xb, xsum, mb.y);
    });
    return true;
  }
#endif
#if defined(LORDBA_Q4_INT8)
  if (p.bits == 4 && int8_dot) {
    thread_local std::vector<int8_t> kept_q;  // as xb above
    thread_local std::vector<float> kept_d;
    std::vector<int8_t>& xq = kept_q;
    std::vector<float>& dx = kept_d;
    quantize_groups(p, x, xq, dx);
    member_blocks(ms, n, [&](const Member& mb, int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        prefetch_ahead(mb.p, o, 1);
        row_dot1_i8(mb.p, o, xq.data(), dx.data(), xsum, mb.y);
      }
    });
    return true;
  }
#endif
  return false;
}

bool bf16_dot_built() {
#if defined(LORDBA_Q4_BF16)
  return true;
#else
  return false;
#endif
}

bool int8_dot_built() {
#if defined(LORDBA_Q4_INT8)
  return true;
#else
  return false;
#endif
}

}  // namespace lordba_q4

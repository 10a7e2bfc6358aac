// Stage 2 of the sign path for blocks of 16 outputs (sign_stages.cpp's tables, build_nibbles): every token's
// acc[o] = Σ_g hi_g[v >> 4] + lo_g[v & 15] over the sign bytes v of S_B's row o, then s · a[o] · acc (+ base)
// rounded once. AVX-512: 16 outputs per vector (vpermps on the 16-entry tables); AVX2: 8 per vector (two
// vpermps on the tables' halves and a blend); portable: one output at a time. Every build sums each output in
// the same order (0, then each group's hi + lo), so they give the same bits as the portable stage 2.
#include "branch_internal.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace lordba::impl {
namespace {

// One output o for every token, from its sign row (`groups` bytes).
template <typename out_t>
inline void output_scalar(const uint8_t* row, int64_t o, int64_t T, int64_t groups, const float* nib, float sa,
                          int64_t out, const out_t* base, out_t* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* tab = nib + t * groups * 32;
    float acc = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned v = row[g];
      acc += tab[g * 32 + (v >> 4)] + tab[g * 32 + 16 + (v & 15)];
    }
    store_output<out_t>(sa * acc, base, y, t * out + o);
  }
}

// Outputs [o0, o1) one at a time (any rank; rows re-aligned where r is not a multiple of 8).
template <typename out_t>
void outputs_scalar(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t groups,
                    int64_t out, const float* a, float scaling, const out_t* base, out_t* y, int64_t o0, int64_t o1,
                    std::vector<uint8_t>& scratch) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = r % 8 == 0 ? sb + o * groups : sign_row(sb, o * r, groups, nbytes, scratch);
    output_scalar<out_t>(row, o, T, groups, nib, scaling * a[o], out, base, y);
  }
}

// Whether a block of outputs can take the vector path: byte-aligned sign rows of 1, 2 or 4k (≤ 64) bytes.
inline bool vector_rows(int64_t r, int64_t rb) { return r % 8 == 0 && (rb == 1 || rb == 2 || rb % 4 == 0) && rb <= 64; }

}  // namespace

#if defined(__AVX512F__)
namespace {

// 16 outputs o0..o0+15 at once: the nibble tables are single registers, looked up with vpermps.
// words[h] holds bytes 4h..4h+3 of each of the 16 sign rows (little-endian: byte 4h in bits 0-7).
inline int row_words(const uint8_t* sb, int64_t o0, int64_t rb, __m512i* words) {
  if (rb == 1) {
    words[0] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + o0)));
    return 1;
  }
  if (rb == 2) {
    words[0] = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 2 * o0)));
    return 1;
  }
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(rb)));
  const uint8_t* base = sb + o0 * rb;
  for (int64_t h = 0; h < rb / 4; ++h)
    words[h] = _mm512_i32gather_epi32(_mm512_add_epi32(offsets, _mm512_set1_epi32(static_cast<int>(4 * h))),
                                      base, 1);
  return static_cast<int>(rb / 4);
}

}  // namespace

// Outputs 16·k0 .. 16·k1 (the last block may be short) of every token.
template <typename out_t>
void stage2_blocks(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
                   const float* a, float scaling, const out_t* base, out_t* y, int64_t k0, int64_t k1) {
  const int64_t groups = rp / 8;
  const int64_t rb = groups;
  const bool vec = vector_rows(r, rb);
  std::vector<uint8_t> scratch;
  __m512i words[16];
  alignas(64) float tmp[16];
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t o0 = 16 * k;
    if (!vec || o0 + 16 > out) {
      outputs_scalar<out_t>(sb, nbytes, nib, T, r, groups, out, a, scaling, base, y, o0, std::min(o0 + 16, out),
                            scratch);
      continue;
    }
    const int nw = row_words(sb, o0, rb, words);
    const __m512 sa = _mm512_mul_ps(_mm512_loadu_ps(a + o0), _mm512_set1_ps(scaling));
    for (int64_t t = 0; t < T; ++t) {
      const float* tab = nib + t * groups * 32;
      __m512 acc = _mm512_setzero_ps();
      for (int w = 0; w < nw; ++w) {
        const int per = static_cast<int>(std::min<int64_t>(4, groups - 4 * w));
        for (int p = 0; p < per; ++p) {
          const float* gt = tab + (4 * w + p) * 32;
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(words[w], 8 * p + 4), low4);
          const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(words[w], 8 * p), low4);
          const __m512 part = _mm512_add_ps(_mm512_permutexvar_ps(hi, _mm512_loadu_ps(gt)),
                                            _mm512_permutexvar_ps(lo, _mm512_loadu_ps(gt + 16)));
          acc = _mm512_add_ps(acc, part);
        }
      }
      acc = _mm512_mul_ps(sa, acc);
      out_t* yt = y + t * out + o0;
      if constexpr (std::is_same_v<out_t, float>) {
        if (base != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(base + t * out + o0));
        _mm512_storeu_ps(yt, acc);
      } else {
        _mm512_store_ps(tmp, acc);
        for (int q = 0; q < 16; ++q) store_output<out_t>(tmp[q], base, y, t * out + o0 + q);
      }
    }
  }
}

#elif defined(__AVX2__)
namespace {

// 8 outputs o0..o0+7 at once. words[h] holds bytes 4h..4h+3 of each of the 8 sign rows (as row_words above).
inline int row_words8(const uint8_t* sb, int64_t o0, int64_t rb, __m256i* words) {
  if (rb == 1) {
    words[0] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + o0)));
    return 1;
  }
  if (rb == 2) {
    words[0] = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 2 * o0)));
    return 1;
  }
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int>(rb)));
  const int* base = reinterpret_cast<const int*>(sb + o0 * rb);
  for (int64_t h = 0; h < rb / 4; ++h)
    words[h] = _mm256_i32gather_epi32(base, _mm256_add_epi32(offsets, _mm256_set1_epi32(static_cast<int>(4 * h))), 1);
  return static_cast<int>(rb / 4);
}

// table[n] for 8 nibbles n (0..15, one per lane): vpermps on each half of the 16 entries, the half chosen by
// bit 3 of n (moved to the sign bit, which blendv reads).
inline __m256 lookup16(const float* table, __m256i n) {
  const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), n);
  const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), n);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(n, 28)));
}

// Outputs o0..o0+7 of every token (rows of rb bytes, vector_rows).
template <typename out_t>
void outputs8(const uint8_t* sb, const float* nib, int64_t T, int64_t groups, int64_t out, const float* a,
              float scaling, const out_t* base, out_t* y, int64_t o0) {
  __m256i words[16];
  const int nw = row_words8(sb, o0, groups, words);
  const __m256 sa = _mm256_mul_ps(_mm256_loadu_ps(a + o0), _mm256_set1_ps(scaling));
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t t = 0; t < T; ++t) {
    const float* tab = nib + t * groups * 32;
    __m256 acc = _mm256_setzero_ps();
    for (int w = 0; w < nw; ++w) {
      const int per = static_cast<int>(std::min<int64_t>(4, groups - 4 * w));
      for (int p = 0; p < per; ++p) {
        const float* gt = tab + (4 * w + p) * 32;
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(words[w], 8 * p + 4), low4);
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(words[w], 8 * p), low4);
        acc = _mm256_add_ps(acc, _mm256_add_ps(lookup16(gt, hi), lookup16(gt + 16, lo)));
      }
    }
    acc = _mm256_mul_ps(sa, acc);
    if constexpr (std::is_same_v<out_t, float>) {
      if (base != nullptr) acc = _mm256_add_ps(acc, _mm256_loadu_ps(base + t * out + o0));
      _mm256_storeu_ps(y + t * out + o0, acc);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc);
      for (int q = 0; q < 8; ++q) store_output<out_t>(tmp[q], base, y, t * out + o0 + q);
    }
  }
}

}  // namespace

// Outputs 16·k0 .. 16·k1 of every token, 8 at a time where the rows allow (the rest one at a time).
template <typename out_t>
void stage2_blocks(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
                   const float* a, float scaling, const out_t* base, out_t* y, int64_t k0, int64_t k1) {
  const int64_t groups = rp / 8;
  const int64_t o1 = std::min(16 * k1, out);
  int64_t o = 16 * k0;
  if (vector_rows(r, groups))
    for (; o + 8 <= o1; o += 8) outputs8<out_t>(sb, nib, T, groups, out, a, scaling, base, y, o);
  std::vector<uint8_t> scratch;
  outputs_scalar<out_t>(sb, nbytes, nib, T, r, groups, out, a, scaling, base, y, o, o1, scratch);
}

#else
// Outputs 16·k0 .. 16·k1 of every token, one output at a time.
template <typename out_t>
void stage2_blocks(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
                   const float* a, float scaling, const out_t* base, out_t* y, int64_t k0, int64_t k1) {
  std::vector<uint8_t> scratch;
  outputs_scalar<out_t>(sb, nbytes, nib, T, r, rp / 8, out, a, scaling, base, y, 16 * k0, std::min(16 * k1, out),
                        scratch);
}
#endif

#define LORDBA_STAGE2_BLOCKS(out_t)                                                                              \
  template void stage2_blocks<out_t>(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, \
                                     const float*, float, const out_t*, out_t*, int64_t, int64_t);
LORDBA_STAGE2_BLOCKS(float)
LORDBA_STAGE2_BLOCKS(c10::BFloat16)
LORDBA_STAGE2_BLOCKS(c10::Half)

}  // namespace lordba::impl

// The float32 row kernels of q4.cpp's decode (one token and a few tokens): each row's dot products with the
// unpacked codes in float32, per weight group, scaled once per group. AVX-512, AVX2 with FMA (laptops and
// desktops without AVX-512: Intel's client CPUs since Alder Lake, AMD before Zen 4), and portable C++.
// The layout is q4.cpp's: a 4-bit row's chunk of 32 inputs is 16 bytes, byte j holding input j in its low
// nibble and input j + 16 in its high one; an 8-bit row has one byte per input.
#pragma once

#include "q4.h"

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lordba_q4 {

#if defined(__AVX512F__)
#define LORDBA_Q4_ROWS_OF_FOUR 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LORDBA_Q4_ROWS_OF_FOUR 1
#define LORDBA_Q4_AVX2 1

namespace avx2 {
// The mask of lanes 0 .. n - 1 (0 < n < 8) for AVX2's masked loads and stores.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first n (none where n <= 0, all where n >= 8) of the 8 floats at p, the others zero: a padded chunk's
// inputs past `in` count as zero, and are never read.
inline __m256 load_first(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  if (n <= 0) return _mm256_setzero_ps();
  return _mm256_maskload_ps(p, first_lanes(n));
}

// The first n (none where n <= 0, all where n >= 8) of v's 8 lanes stored at p.
inline void store_first(float* p, __m256 v, int64_t n) {
  if (n >= 8) return _mm256_storeu_ps(p, v);
  if (n <= 0) return;
  _mm256_maskstore_ps(p, first_lanes(n), v);
}

// A chunk's 32 inputs (k .. k + 31 of x, `left` of them below `in`) as four vectors of 8.
inline void load_chunk(const float* x, int64_t k, int64_t left, __m256 v[4]) {
  if (left >= kChunk) {
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + k + 8 * j);
  } else {
    for (int j = 0; j < 4; ++j) v[j] = load_first(x + k + 8 * j, left - 8 * j);
  }
}

// A row's codes for the chunk at input k, as float32 in input order (four vectors of 8).
template <int BITS>
inline void codes(const uint8_t* row, int64_t k, __m256 w[4]) {
  if constexpr (BITS == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m256i b0 = _mm256_cvtepu8_epi32(bytes), b1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));
    const __m256i low4 = _mm256_set1_epi32(15);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low4));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
  } else {
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * j))));
  }
}

inline float sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
}  // namespace avx2
#endif

// One output row, up to NT tokens: out[t] = sum_g s_g (q_g . x_t,g) (the offset term is the caller's).
template <int NT, int BITS>
void row_dot(const uint8_t* qrow, const c10::Half* srow, int64_t groups, int64_t chunks_per_group,
             const float* const* xs, int64_t in, float* out) {
#if defined(__AVX512F__)
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi32(15);
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[NT];
    for (int t = 0; t < NT; ++t) part[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks_per_group; ++c, k += kChunk) {
      __m512 lo, hi;
      if constexpr (BITS == 4) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + k / 2)));
        lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low4));
        hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      } else {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + k))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + k + 16))));
      }
      const int64_t left = in - k;
      if (left >= kChunk) {
        for (int t = 0; t < NT; ++t) {
          part[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xs[t] + k), part[t]);
          part[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs[t] + k + 16), part[t]);
        }
      } else if (left > 0) {  // the padded tail: inputs past `in` count as zero
        const __mmask16 m0 = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
        const __mmask16 m1 = static_cast<__mmask16>(left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1 : 0);
        for (int t = 0; t < NT; ++t) {
          part[t] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(m0, xs[t] + k), part[t]);
          part[t] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(m1, xs[t] + k + 16), part[t]);
        }
      }
    }
    const __m512 s = _mm512_set1_ps(half_to_float(srow[g]));
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(part[t], s, acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(LORDBA_Q4_AVX2)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[NT];
    for (int t = 0; t < NT; ++t) part[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks_per_group; ++c, k += kChunk) {
      const int64_t left = in - k;
      if (left <= 0) continue;  // a whole padded chunk
      __m256 w[4];
      avx2::codes<BITS>(qrow, k, w);
      for (int t = 0; t < NT; ++t) {
        __m256 v[4];
        avx2::load_chunk(xs[t], k, left, v);
        for (int j = 0; j < 4; ++j) part[t] = _mm256_fmadd_ps(w[j], v[j], part[t]);
      }
    }
    const __m256 s = _mm256_set1_ps(half_to_float(srow[g]));
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(part[t], s, acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = avx2::sum(acc[t]);
#else
  // Portable: each of a chunk's 16 byte positions sums into its own lane (low and high nibble, or the two
  // halves' bytes, together), so the compiler can vectorize across the lanes (NEON, SSE) without reordering
  // any lane's sums; the lanes are added at the group's end. Inputs past `in` count as zero.
  for (int t = 0; t < NT; ++t) out[t] = 0.f;
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    float lane[NT][16] = {};
    for (int64_t c = 0; c < chunks_per_group; ++c, k += kChunk) {
      const uint8_t* q = BITS == 4 ? qrow + k / 2 : qrow + k;
      const int64_t left = in - k;
      for (int t = 0; t < NT; ++t) {
        const float* xt = xs[t] + k;
        if (left >= kChunk) {
          for (int j = 0; j < 16; ++j) {
            const float lo = static_cast<float>(BITS == 4 ? (q[j] & 15) : q[j]);
            const float hi = static_cast<float>(BITS == 4 ? (q[j] >> 4) : q[j + 16]);
            lane[t][j] += lo * xt[j] + hi * xt[j + 16];
          }
        } else {
          for (int j = 0; j < 16; ++j) {
            const float lo = j < left ? static_cast<float>(BITS == 4 ? (q[j] & 15) : q[j]) * xt[j] : 0.f;
            const float hi = j + 16 < left ? static_cast<float>(BITS == 4 ? (q[j] >> 4) : q[j + 16]) * xt[j + 16] : 0.f;
            lane[t][j] += lo + hi;
          }
        }
      }
    }
    const float s = half_to_float(srow[g]);
    for (int t = 0; t < NT; ++t) {
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += lane[t][j];
      out[t] += s * sum;
    }
  }
#endif
}

#if defined(LORDBA_Q4_ROWS_OF_FOUR)
// One token, R rows at once (decode): each 32-input chunk of x is loaded once for the R rows, and the
// 2R accumulators (low and high nibbles of each row on AVX-512, the chunk's two halves on AVX2) are
// independent FMA chains, so the loop is not bound by the FMA latency. The offset term
// sum_g m_g * sum(x_g) joins the same final reduction.
template <int BITS, int R>
void rows_dot1(const Packed& p, int64_t o, const float* x, const float* xsum, float* y) {
  const int64_t chunks = p.group / kChunk;
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = p.q + (o + r) * p.row_bytes;
#if defined(__AVX512F__)
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 lo_acc[R], hi_acc[R];
    for (int r = 0; r < R; ++r) lo_acc[r] = hi_acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, k += kChunk) {
      const int64_t left = p.in - k;
      if (left <= 0) continue;  // a whole padded chunk: its inputs count as zero
      __m512 x0, x1;
      if (left >= kChunk) {
        x0 = _mm512_loadu_ps(x + k);
        x1 = _mm512_loadu_ps(x + k + 16);
      } else {
        const __mmask16 m0 = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
        const __mmask16 m1 = static_cast<__mmask16>(left > 16 ? (1u << (left - 16)) - 1 : 0);
        x0 = _mm512_maskz_loadu_ps(m0, x + k);
        x1 = _mm512_maskz_loadu_ps(m1, x + k + 16);
      }
      for (int r = 0; r < R; ++r) {
        __m512 lo, hi;
        if constexpr (BITS == 4) {
          const __m512i bytes =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k / 2)));
          lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low4));
          hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        } else {
          lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k))));
          hi = _mm512_cvtepi32_ps(
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k + 16))));
        }
        lo_acc[r] = _mm512_fmadd_ps(lo, x0, lo_acc[r]);
        hi_acc[r] = _mm512_fmadd_ps(hi, x1, hi_acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(half_to_float(p.s[(o + r) * p.groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(lo_acc[r], hi_acc[r]), s, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[o + r] = _mm512_reduce_add_ps(acc[r]) + row_offset(p, o + r, xsum);
#else
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, k += kChunk) {
      const int64_t left = p.in - k;
      if (left <= 0) continue;
      __m256 v[4];
      avx2::load_chunk(x, k, left, v);
      for (int r = 0; r < R; ++r) {
        __m256 w[4];
        avx2::codes<BITS>(q[r], k, w);
        a0[r] = _mm256_fmadd_ps(w[0], v[0], a0[r]);
        a1[r] = _mm256_fmadd_ps(w[1], v[1], a1[r]);
        a0[r] = _mm256_fmadd_ps(w[2], v[2], a0[r]);
        a1[r] = _mm256_fmadd_ps(w[3], v[3], a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(half_to_float(p.s[(o + r) * p.groups + g]));
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(a0[r], a1[r]), s, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[o + r] = avx2::sum(acc[r]) + row_offset(p, o + r, xsum);
#endif
}
#endif

}  // namespace lordba_q4

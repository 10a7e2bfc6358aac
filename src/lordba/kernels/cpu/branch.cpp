// CPU kernels of the packed double-binary branch (lordba; see docs/kernels.md).
//
//   y = [base +] s * a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))      S_A: r×in, S_B: out×r, 1 bit per sign
//
// Signs are read straight from the stored bit layout (SPEC §6: row-major, MSB first, bit 1 = +1).
// Two strategies, chosen per call by the number of tokens T (`sign_max_tokens` from Python):
//
// * sign path (decode, small T): the five stages fused in one call, no unpacking.
//     stage 1: z = b ⊙ x is stored with each group of 8 reversed, so that a little-endian load of
//              2 sign bytes is directly the AVX-512 lane mask of 16 floats. h = 2·Σ_{bit=1} z − Σ z
//              (one masked add per 16 signs). Portable build: a ±1 table per byte, 8 floats at once.
//     stage 2: T-MAC-style lookup tables: for every group of 8 rank components and every byte value
//              v the partial sum Σ ±(m ⊙ h)_k is tabulated (256 entries from two 16-entry nibble
//              tables), then each output sums r/8 table entries picked by its sign bytes.
//     stage 3: y = s · a ⊙ acc (+ base), rounded once to the output dtype.
// * unpack path (prefill, large T): unpack into a reused per-thread buffer with the scales folded
//   in, A' = S_A diag(b) (r×in), B' = s diag(a) S_B diag(m) (out×r), then two BLAS calls
//   (the second one adds the base output: addmm).
//
// Rows that do not start on a byte boundary (in or r not a multiple of 8) are re-aligned into a
// scratch row; activations are zero-padded so bits past a row's end never contribute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "branch.h"

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lordba {
namespace {

constexpr int64_t kChunk = 16;  // floats per sign chunk (2 bytes of bits)

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// 8 bits starting at bit `pos` of an MSB-first stream of `nbytes` bytes; zeros past the end.
inline uint8_t bits8(const uint8_t* p, int64_t pos, int64_t nbytes) {
  const int64_t byte = pos >> 3;
  const int shift = static_cast<int>(pos & 7);
  const unsigned hi = byte < nbytes ? p[byte] : 0u;
  if (shift == 0) return static_cast<uint8_t>(hi);
  const unsigned lo = byte + 1 < nbytes ? p[byte + 1] : 0u;
  return static_cast<uint8_t>((hi << shift) | (lo >> (8 - shift)));
}

// Pointer to `len` bytes of a sign row starting at bit `pos`: the stored bytes when the row is
// byte-aligned and in bounds, else a re-aligned copy in `scratch`.
inline const uint8_t* sign_row(const uint8_t* p, int64_t pos, int64_t len, int64_t nbytes,
                               std::vector<uint8_t>& scratch) {
  if ((pos & 7) == 0 && (pos >> 3) + len <= nbytes) return p + (pos >> 3);
  scratch.resize(static_cast<size_t>(len));
  for (int64_t q = 0; q < len; ++q) scratch[q] = bits8(p, pos + 8 * q, nbytes);
  return scratch.data();
}

// kSign[v][k] = +1 if bit k (LSB numbering) of v is set, else -1 (for the group-reversed layout).
struct SignTable {
  alignas(64) float v[256][8];
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> k) & 1) ? 1.f : -1.f;
  }
};
const SignTable kSign;

// code / 127 for every int8 code, computed once: the same division as `converted`, read from a table.
struct Int8Codes {
  float v[256];
  Int8Codes() {
    for (int c = -128; c < 128; ++c) v[c + 128] = static_cast<float>(c) / 127.f;
  }
};
const Int8Codes kCodes;

// ---------------------------------------------------------------- stage 1: h[t][j] = Σ_i ±z[t][i]
// z: T rows of `ld` floats (group-reversed, zero-padded to a multiple of 16); a sign row: ld/8 bytes.
// block_sums handles NR sign rows × NT tokens in one pass over z (NR·NT independent accumulators).
#if defined(__AVX512F__)
// out[i*NT + t] = Σ_{bit set in rows[i]} z[t]: one masked add per 16 signs; h = 2·out − Σz.
template <int NR, int NT>
inline void block_sums(const uint8_t* const* rows, const float* z, int64_t ld, int64_t nchunks, float* out) {
  __m512 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nchunks; ++c) {
    __m512 zv[NT];
    for (int t = 0; t < NT; ++t) zv[t] = _mm512_loadu_ps(z + t * ld + kChunk * c);
    for (int i = 0; i < NR; ++i) {
      uint16_t bits;
      std::memcpy(&bits, rows[i] + 2 * c, 2);
      const __mmask16 mask = static_cast<__mmask16>(bits);
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_mask_add_ps(acc[i][t], mask, acc[i][t], zv[t]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) out[i * NT + t] = _mm512_reduce_add_ps(acc[i][t]);
}
constexpr bool kMasked = true;
#else
// out[i*NT + t] = Σ ±z[t] directly, 8 signs at a time: a ±1 row of the table times 8 floats of z
// (an exact add/subtract; AVX2: one table load and one FMA per 8 signs).
template <int NR, int NT>
inline void block_sums(const uint8_t* const* rows, const float* z, int64_t ld, int64_t nchunks, float* out) {
  const int64_t nbytes = 2 * nchunks;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
  for (int64_t q = 0; q < nbytes; ++q) {
    __m256 zv[NT];
    for (int t = 0; t < NT; ++t) zv[t] = _mm256_loadu_ps(z + t * ld + 8 * q);
    for (int i = 0; i < NR; ++i) {
      const __m256 s = _mm256_load_ps(kSign.v[rows[i][q]]);
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_fmadd_ps(s, zv[t], acc[i][t]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[i][t]);
      float sum = 0.f;
      for (int k = 0; k < 8; ++k) sum += lanes[k];
      out[i * NT + t] = sum;
    }
#else
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      const float* zt = z + t * ld;
      for (int64_t q = 0; q < nbytes; ++q) {
        const float* sg = kSign.v[rows[i][q]];
        for (int k = 0; k < 8; ++k) acc[k] += sg[k] * zt[8 * q + k];
      }
      float sum = 0.f;
      for (int k = 0; k < 8; ++k) sum += acc[k];
      out[i * NT + t] = sum;
    }
#endif
}
constexpr bool kMasked = false;
#endif

// Adds to acc[t*r + j] the sums of chunks [c0, c1) of rows [j0, j1) for tokens [t0, t0+NT), in
// blocks of 8/NT rows.
template <int NT>
void rows_for_tokens(const uint8_t* sa, int64_t nbytes, const float* z, int64_t ld, int64_t in, int64_t r,
                     int64_t j0, int64_t j1, int64_t t0, int64_t c0, int64_t c1, float* acc,
                     std::vector<uint8_t>* scratch) {
  constexpr int NR = 8 / NT;
  const int64_t len = ld / 8;
  const float* zt = z + t0 * ld + kChunk * c0;
  for (int64_t j = j0; j < j1;) {
    const int64_t n = std::min<int64_t>(NR, j1 - j);
    const uint8_t* rows[NR];
    for (int64_t i = 0; i < n; ++i) rows[i] = sign_row(sa, (j + i) * in, len, nbytes, scratch[i]) + 2 * c0;
    float part[NR * NT];
    if (n == NR) {
      block_sums<NR, NT>(rows, zt, ld, c1 - c0, part);
    } else {
      for (int64_t i = 0; i < n; ++i) block_sums<1, NT>(rows + i, zt, ld, c1 - c0, part + i * NT);
    }
    for (int64_t i = 0; i < n; ++i)
      for (int t = 0; t < NT; ++t) acc[(t0 + t) * r + j + i] += part[i * NT + t];
    j += n;
  }
}

// Rows [j0, j1) of `rows_bytes` for all tokens, tile by tile over `in` so that the tile of z of a
// block of tokens stays in L1 while every row block reads it.
void tiled_sums(const uint8_t* sa, int64_t nbytes, const float* z, int64_t T, int64_t in, int64_t ld, int64_t r,
                int64_t j0, int64_t j1, float* acc) {
  constexpr int64_t kTile = 128;  // chunks of 16 floats: 8 KiB of z per token
  std::vector<uint8_t> scratch[8];
  const int64_t nchunks = ld / kChunk;
  for (int64_t c0 = 0; c0 < nchunks; c0 += kTile) {
    const int64_t c1 = std::min(nchunks, c0 + kTile);
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) rows_for_tokens<4>(sa, nbytes, z, ld, in, r, j0, j1, t, c0, c1, acc, scratch);
    for (; t + 2 <= T; t += 2) rows_for_tokens<2>(sa, nbytes, z, ld, in, r, j0, j1, t, c0, c1, acc, scratch);
    for (; t < T; ++t) rows_for_tokens<1>(sa, nbytes, z, ld, in, r, j0, j1, t, c0, c1, acc, scratch);
  }
}

// Σz of one token, summed exactly as stage1 sums it (a row of all-ones signs).
float z_total(const float* z, int64_t ld) {
  thread_local std::vector<uint8_t> ones;
  if (ones.size() < static_cast<size_t>(ld / 8)) ones.assign(static_cast<size_t>(ld / 8), 0xFF);
  float total = 0.f;
  tiled_sums(ones.data(), ld / 8, z, 1, ld, ld, 1, 0, 1, &total);
  return total;
}

// Stage 1 for all r rows and T tokens: h1[t*r + j].
void stage1(const uint8_t* sa, int64_t nbytes, const float* z, int64_t T, int64_t in, int64_t ld, int64_t r,
            float* h1) {
  std::fill(h1, h1 + T * r, 0.f);
  thread_local std::vector<float> totals;
  totals.assign(static_cast<size_t>(T), 0.f);
  if (kMasked)
    for (int64_t t = 0; t < T; ++t) totals[t] = z_total(z + t * ld, ld);
  const int64_t grain = std::max<int64_t>(8, 262144 / std::max<int64_t>(1, in * T));
  at::parallel_for(0, r, grain, [&](int64_t j0, int64_t j1) { tiled_sums(sa, nbytes, z, T, in, ld, r, j0, j1, h1); });
  if (kMasked)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < r; ++j) h1[t * r + j] = 2.f * h1[t * r + j] - totals[t];
}

// ---------------------------------------------------------------- stage 2: lookup tables
// For every token t and group g of 8 rank components (h = h2[t][8g .. 8g+8)), two 16-entry tables:
//   nib[((t*G + g)*2 + 0)*16 + n] = Σ_{q<4} ±h[q]     (+ where bit 3-q of n is set)  high nibble
//   nib[((t*G + g)*2 + 1)*16 + n] = Σ_{q<4} ±h[4+q]                                   low nibble
// A sign byte v of an S_B row (MSB = component 8g) then contributes hi[v >> 4] + lo[v & 15].
void build_nibbles(const float* h2, int64_t T, int64_t rp, float* nib) {
  const int64_t groups = rp / 8;
#if defined(__AVX512F__)
  // The same sums in the same order, 16 entries at once: 0 + (±h[0]) + (±h[1]) + ... (±1·h is exact).
  alignas(64) static const struct Signs {
    float v[4][16];
    Signs() {
      for (int q = 0; q < 4; ++q)
        for (int n = 0; n < 16; ++n) v[q][n] = ((n >> (3 - q)) & 1) ? 1.f : -1.f;
    }
  } kNib;
  for (int64_t k = 0; k < T * groups; ++k) {
    const float* h = h2 + (k / groups) * rp + 8 * (k % groups);
    __m512 sh = _mm512_setzero_ps(), sl = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) {
      const __m512 sign = _mm512_load_ps(kNib.v[q]);
      sh = _mm512_add_ps(sh, _mm512_mul_ps(sign, _mm512_set1_ps(h[q])));
      sl = _mm512_add_ps(sl, _mm512_mul_ps(sign, _mm512_set1_ps(h[4 + q])));
    }
    _mm512_storeu_ps(nib + k * 32, sh);
    _mm512_storeu_ps(nib + k * 32 + 16, sl);
  }
#else
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* h = h2 + t * rp + 8 * g;
      float* hi = nib + (t * groups + g) * 32;
      for (int n = 0; n < 16; ++n) {
        float sh = 0.f, sl = 0.f;
        for (int q = 0; q < 4; ++q) {
          const bool plus = (n >> (3 - q)) & 1;
          sh += plus ? h[q] : -h[q];
          sl += plus ? h[4 + q] : -h[4 + q];
        }
        hi[n] = sh;
        hi[16 + n] = sl;
      }
    }
  }
#endif
}

template <typename out_t>
inline void store_output(float val, const out_t* base, out_t* y, int64_t idx) {
  if (base != nullptr) val += static_cast<float>(base[idx]);
  y[idx] = static_cast<out_t>(val);
}

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

#if defined(__AVX512F__)
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

// Outputs 16·k0 .. 16·k1 (the last block may be short) of every token.
template <typename out_t>
void stage2_blocks(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
                   const float* a, float scaling, const out_t* base, out_t* y, int64_t k0, int64_t k1) {
  const int64_t groups = rp / 8;
  const int64_t rb = groups;
  const bool vec = r % 8 == 0 && (rb == 1 || rb == 2 || rb % 4 == 0) && rb <= 64;
  std::vector<uint8_t> scratch;
  __m512i words[16];
  alignas(64) float tmp[16];
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t o0 = 16 * k;
    if (!vec || o0 + 16 > out) {
      for (int64_t o = o0; o < std::min(o0 + 16, out); ++o)
        output_scalar<out_t>(sign_row(sb, o * r, groups, nbytes, scratch), o, T, groups, nib, scaling * a[o],
                             out, base, y);
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

template <typename out_t>
void stage2(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
            const float* a, float scaling, const out_t* base, out_t* y) {
  const int64_t grain = std::max<int64_t>(16, 2048 / (rp / 8 * T));
  at::parallel_for(0, (out + 15) / 16, grain, [=](int64_t k0, int64_t k1) {
    stage2_blocks<out_t>(sb, nbytes, nib, T, r, rp, out, a, scaling, base, y, k0, k1);
  });
}
#else
// Portable: one 256-entry table per group (T-MAC style), laid out token-fastest so that a lookup
// serves every token with one vectorizable loop: lut[(g*256 + v)*T + t] = hi[v >> 4] + lo[v & 15].
template <typename out_t>
void stage2(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
            const float* a, float scaling, const out_t* base, out_t* y) {
  const int64_t groups = rp / 8;
  thread_local std::vector<float> lut;
  lut.resize(static_cast<size_t>(groups * 256 * T));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const float* tab = nib + (t * groups + g) * 32;
      for (int v = 0; v < 256; ++v) lut[(g * 256 + v) * T + t] = tab[v >> 4] + tab[16 + (v & 15)];
    }
  const float* lp = lut.data();
  const bool aligned = r % 8 == 0;
  const int64_t grain = std::max<int64_t>(256, 32768 / (groups * T));
  at::parallel_for(0, out, grain, [=](int64_t o0, int64_t o1) {
    std::vector<uint8_t> scratch;
    std::vector<float> acc(static_cast<size_t>(T));
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* row = aligned ? sb + o * groups : sign_row(sb, o * r, groups, nbytes, scratch);
      const float sa = scaling * a[o];
      if (T == 1) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) sum += lp[g * 256 + row[g]];
        store_output<out_t>(sa * sum, base, y, o);
        continue;
      }
      float* ac = acc.data();
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const float* e = lp + (g * 256 + row[g]) * T;
        for (int64_t t = 0; t < T; ++t) ac[t] += e[t];
      }
      for (int64_t t = 0; t < T; ++t) store_output<out_t>(sa * ac[t], base, y, t * out + o);
    }
  });
}
#endif

// ---------------------------------------------------------------- the sign path
// 16 scale values from b: float32 as stored, or int8 codes as code / 127 correctly rounded without a
// division: q = c · fl(1/127), then one Newton step on the exact residual c − 127·q (both FMAs). Checked
// for all 256 codes against the division (a test). scale_at: one value, the same.
#if defined(__AVX512F__)
inline __m512 scales16(const float* b) { return _mm512_loadu_ps(b); }
inline __m512 scales16(const int8_t* b) {
  const __m512 recip = _mm512_set1_ps(1.f / 127.f), divisor = _mm512_set1_ps(127.f);
  const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
  const __m512 q = _mm512_mul_ps(c, recip);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, divisor, c), recip, q);
}
#endif
inline float scale_at(const float* b, int64_t i) { return b[i]; }
inline float scale_at(const int8_t* b, int64_t i) { return kCodes.v[b[i] + 128]; }

// z[i'] = x[i] · b[i] with each group of 8 reversed (i' = 8⌊i/8⌋ + 7 − i mod 8), zeros up to `ld`; b float32
// or int8 codes (scales16 / scale_at).
template <typename x_t, typename b_t = float>
void scale_reversed(const x_t* __restrict x, const b_t* __restrict b, int64_t in, int64_t ld, float* __restrict z) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<x_t, float>) {
    const __m512i rev = _mm512_set_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 16 <= in; i += 16)
      _mm512_storeu_ps(z + i, _mm512_permutexvar_ps(rev, _mm512_mul_ps(_mm512_loadu_ps(x + i), scales16(b + i))));
  }
#endif
  for (int64_t k = i; k < ld; ++k) z[k] = 0.f;
  for (; i < in; ++i) z[(i & ~int64_t{7}) + 7 - (i & 7)] = static_cast<float>(x[i]) * scale_at(b, i);
}

// Stage 1 and the lookup tables of the sign path: the nibble tables (build_nibbles') of T tokens, in
// this thread's buffer (valid until its next call).
template <typename x_t>
const float* sign_tables(const x_t* x, int64_t T, int64_t in, const uint8_t* sa, int64_t nbytes_a, const float* b,
                         const float* m, int64_t r) {
  const int64_t ld = round_up(in, kChunk);
  const int64_t rp = round_up(r, 8);
  thread_local std::vector<float> z, h1, h2, nib;
  z.resize(static_cast<size_t>(T * ld));
  for (int64_t t = 0; t < T; ++t) scale_reversed<x_t>(x + t * in, b, in, ld, z.data() + t * ld);
  h1.resize(static_cast<size_t>(T * r));
  stage1(sa, nbytes_a, z.data(), T, in, ld, r, h1.data());
  h2.assign(static_cast<size_t>(T * rp), 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < r; ++j) h2[t * rp + j] = h1[t * r + j] * m[j];
  nib.resize(static_cast<size_t>(T * rp / 8 * 32));
  build_nibbles(h2.data(), T, rp, nib.data());
  return nib.data();
}

template <typename x_t, typename out_t>
void sign_path(const x_t* x, int64_t T, int64_t in, const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb,
               int64_t nbytes_b, const float* b, const float* m, const float* a, int64_t r, int64_t out,
               float scaling, const out_t* base, out_t* y) {
  const float* nib = sign_tables<x_t>(x, T, in, sa, nbytes_a, b, m, r);
  stage2<out_t>(sb, nbytes_b, nib, T, r, round_up(r, 8), out, a, scaling, base, y);
}

// ---------------------------------------------------------------- the unpack path
// kRev[v]: v with its 8 bits reversed (MSB-first sign byte → AVX-512 lane mask).
struct Reverse {
  uint8_t v[256];
  Reverse() {
    for (int b = 0; b < 256; ++b) {
      int x = 0;
      for (int k = 0; k < 8; ++k) x |= ((b >> k) & 1) << (7 - k);
      v[b] = static_cast<uint8_t>(x);
    }
  }
};
const Reverse kRev;

// kSignMsb[v][k] = +1 if bit 7-k of v is set (MSB first), else -1.
struct SignTableMsb {
  alignas(64) float v[256][8];
  SignTableMsb() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> (7 - k)) & 1) ? 1.f : -1.f;
  }
};
const SignTableMsb kSignMsb;

// dst[i][k] = ±row_scale[i]·col_scale[k] (row_scale null: 1) for `rows` sign rows of `cols` bits;
// the sign is applied as a multiplication by ±1 (exact).
template <typename t_t>
void unpack_rows(const uint8_t* p, int64_t nbytes, int64_t rows, int64_t cols, const float* row_scale,
                 const float* col_scale, t_t* dst) {
  const int64_t len = round_up(cols, 8) / 8;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / cols), [=](int64_t r0, int64_t r1) {
    std::vector<uint8_t> scratch;
    std::vector<float> tmp(static_cast<size_t>(cols));
    for (int64_t i = r0; i < r1; ++i) {
      const uint8_t* row = sign_row(p, i * cols, len, nbytes, scratch);
      const float rs = row_scale != nullptr ? row_scale[i] : 1.f;
      t_t* d = dst + i * cols;
      float* f = std::is_same_v<t_t, float> ? reinterpret_cast<float*>(d) : tmp.data();
      int64_t k = 0;
#if defined(__AVX512F__)
      const __m512 vrs = _mm512_set1_ps(rs);
      const __m512 minus = _mm512_set1_ps(-1.f);
      for (; k + 16 <= cols; k += 16) {
        const __mmask16 mask = static_cast<__mmask16>(kRev.v[row[k >> 3]] | (kRev.v[row[(k >> 3) + 1]] << 8));
        const __m512 v = _mm512_mul_ps(vrs, _mm512_loadu_ps(col_scale + k));
        _mm512_storeu_ps(f + k, _mm512_mask_blend_ps(mask, _mm512_mul_ps(v, minus), v));
      }
#endif
#if defined(__AVX2__)
      const __m256 vrs8 = _mm256_set1_ps(rs);
      for (; k + 8 <= cols; k += 8) {
        const __m256 v = _mm256_mul_ps(vrs8, _mm256_loadu_ps(col_scale + k));
        _mm256_storeu_ps(f + k, _mm256_mul_ps(_mm256_load_ps(kSignMsb.v[row[k >> 3]]), v));
      }
#endif
      for (; k < cols; ++k) {
        const float v = rs * col_scale[k];
        f[k] = ((row[k >> 3] >> (7 - (k & 7))) & 1) ? v : -1.f * v;
      }
      if constexpr (!std::is_same_v<t_t, float>)
        for (int64_t q = 0; q < cols; ++q) d[q] = static_cast<t_t>(f[q]);
    }
  });
}

// The folded factors A' = S_A diag(b) into A [r, in] and B' = s diag(a) S_B diag(m) into B [out, r]:
// the unpack path's, and folded_factors' for q4.cpp's prefill GEMM.
template <typename t_t>
void fold_factors(const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb, int64_t nbytes_b, const float* b,
                  const float* m, const float* a, int64_t r, int64_t in, int64_t out, float scaling, t_t* A, t_t* B) {
  thread_local std::vector<float> sa_row;
  sa_row.resize(static_cast<size_t>(out));
  for (int64_t o = 0; o < out; ++o) sa_row[o] = scaling * a[o];
  unpack_rows<t_t>(sa, nbytes_a, r, in, nullptr, b, A);
  unpack_rows<t_t>(sb, nbytes_b, out, r, sa_row.data(), m, B);
}

template <typename x_t>
at::Tensor unpack_path(const at::Tensor& x2, const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb,
                       int64_t nbytes_b, const float* b, const float* m, const float* a, int64_t r, int64_t out,
                       float scaling, const c10::optional<at::Tensor>& base2, bool into_base) {
  const int64_t in = x2.size(1);
  thread_local std::vector<x_t> buf;  // reused: A' then B'
  buf.resize(static_cast<size_t>(r * in + out * r));
  x_t* A = buf.data();
  x_t* B = buf.data() + r * in;
  fold_factors<x_t>(sa, nbytes_a, sb, nbytes_b, b, m, a, r, in, out, scaling, A, B);
  const auto opts = x2.options();
  const at::Tensor At = at::from_blob(A, {r, in}, opts);
  const at::Tensor Bt = at::from_blob(B, {out, r}, opts);
  const at::Tensor h = at::mm(x2, At.t());
  if (!base2.has_value()) return at::mm(h, Bt.t());
  if (base2->scalar_type() == x2.scalar_type()) {
    if (into_base) {  // the same GEMM (beta = 1) on base's own memory: no new output, no copy of base
      at::Tensor into = *base2;
      return into.addmm_(h, Bt.t());
    }
    return at::addmm(*base2, h, Bt.t());
  }
  return at::add(*base2, at::mm(h, Bt.t()).to(base2->scalar_type()));
}

// ---------------------------------------------------------------- the op
void check(bool ok, const char* what) { TORCH_CHECK(ok, "lordba::branch: ", what); }

template <typename x_t, typename out_t>
void run_sign(const at::Tensor& x2, int64_t T, const at::Tensor& sa, const at::Tensor& sb, const float* b,
              const float* m, const float* a, int64_t r, int64_t out, float scaling, const at::Tensor* base2,
              at::Tensor& y) {
  sign_path<x_t, out_t>(x2.data_ptr<x_t>(), T, x2.size(-1), sa.data_ptr<uint8_t>(), sa.numel(),
                        sb.data_ptr<uint8_t>(), sb.numel(), b, m, a, r, out, scaling,
                        base2 ? base2->data_ptr<out_t>() : nullptr, y.data_ptr<out_t>());
}

template <typename x_t>
void dispatch_out(const at::Tensor& x2, int64_t T, const at::Tensor& sa, const at::Tensor& sb, const float* b,
                  const float* m, const float* a, int64_t r, int64_t out, float scaling, const at::Tensor* base2,
                  at::Tensor& y) {
  switch (y.scalar_type()) {
    case at::kFloat: return run_sign<x_t, float>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    case at::kBFloat16: return run_sign<x_t, c10::BFloat16>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    case at::kHalf: return run_sign<x_t, c10::Half>(x2, T, sa, sb, b, m, a, r, out, scaling, base2, y);
    default: check(false, "the output dtype must be float32, bfloat16 or float16");
  }
}

template <typename T>
const float* converted(const at::Tensor& t, std::vector<float>& buf, float divisor) {
  const T* v = t.data_ptr<T>();
  buf.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(v[i]) / divisor;
  return buf.data();
}

// d[i] = v[i] / 127 for n int8 codes (scales16 / scale_at).
void codes_to_float(const int8_t* v, int64_t n, float* d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, scales16(v + i));
#endif
  for (; i < n; ++i) d[i] = scale_at(v, i);
}

const float* codes_float(const at::Tensor& t, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(t.numel()));
  codes_to_float(t.data_ptr<int8_t>(), t.numel(), buf.data());
  return buf.data();
}

// A scale vector as float32: the tensor itself, or its values converted into `buf`. int8 holds codes
// meaning code / 127 (the int8 scale format of docs/format.md); the division is the one torch does,
// so a compact adapter computes exactly what its decoded float32 form computes (x / 1 is exact).
const float* as_float(const at::Tensor& t, std::vector<float>& buf) {
  switch (t.scalar_type()) {
    case at::kFloat: return t.data_ptr<float>();
    case at::kChar: return codes_float(t, buf);
    case at::kHalf: return converted<c10::Half>(t, buf, 1.f);
    default: return converted<c10::BFloat16>(t, buf, 1.f);
  }
}

bool scale_dtype_ok(const at::Tensor& t, bool codes) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || (codes && d == at::kChar);
}

// Whether `base` has x's leading dimensions and `out` as its last.
bool base_shape_ok(const at::Tensor& x, const at::Tensor& base, int64_t out) {
  if (base.dim() != x.dim() || base.size(-1) != out) return false;
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    if (base.size(d) != x.size(d)) return false;
  return true;
}

// The adapter's own tensors: uint8 signs of the scale vectors' sizes, scales of a supported dtype.
void check_factors(const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                   const at::Tensor& a) {
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  check(sign_A.scalar_type() == at::kByte && sign_B.scalar_type() == at::kByte, "signs must be uint8");
  check(sign_A.numel() == (r * in + 7) / 8 && sign_B.numel() == (out * r + 7) / 8,
        "packed sign sizes do not match the scale vectors");
  check(scale_dtype_ok(b, true) && scale_dtype_ok(m, false) && scale_dtype_ok(a, true),
        "scales must be float32, float16 or bfloat16 (b and a also int8 codes)");
}

at::Tensor branch_impl(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                       const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                       const c10::optional<at::Tensor>& base, bool into_base) {
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  check(x.dim() >= 1 && x.size(-1) == in, "x's last dimension must equal scale_in's length");
  check_factors(sign_A, sign_B, b, m, a);
  const auto st = x.scalar_type();
  check(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "x must be float32, bfloat16 or float16");
  check(!base.has_value() || base_shape_ok(x, *base, out), "base must have the output's shape");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (x.numel() == 0) return base.has_value() ? base->clone() : at::zeros(shape, x.options());  // no tokens, or in = 0
  const int64_t T = x.numel() / in;
  const at::Tensor sa = sign_A.contiguous(), sb = sign_B.contiguous();
  const at::Tensor bc = b.contiguous(), mc = m.contiguous(), ac = a.contiguous();
  thread_local std::vector<float> bbuf, mbuf, abuf;  // conversions of stored scales, reused between calls
  const float* bp = as_float(bc, bbuf);
  const float* mp = as_float(mc, mbuf);
  const float* ap = as_float(ac, abuf);
  const float s = static_cast<float>(scaling);
  if (T > sign_max_tokens) {
    const at::Tensor x2 = x.reshape({-1, in}).contiguous();
    c10::optional<at::Tensor> base2;
    if (base.has_value()) base2 = base->reshape({-1, out}).contiguous();
    at::Tensor y;
    switch (st) {
      case at::kFloat:
        y = unpack_path<float>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp, mp,
                               ap, r, out, s, base2, into_base);
        break;
      case at::kBFloat16:
        y = unpack_path<c10::BFloat16>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(),
                                       bp, mp, ap, r, out, s, base2, into_base);
        break;
      default:
        y = unpack_path<c10::Half>(x2, sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp,
                                   mp, ap, r, out, s, base2, into_base);
    }
    return y.reshape(shape);
  }
  // The sign path reads rows through data pointers: no reshaped views. With into_base, the output
  // is base's own memory (each element read, then written, by the same lane).
  const at::Tensor x2 = x.contiguous();
  c10::optional<at::Tensor> base2;
  if (base.has_value()) base2 = base->contiguous();
  const bool in_place = into_base && base2.has_value();  // base itself, or a contiguous copy of it
  at::Tensor y = in_place ? *base2 : at::empty(shape, base2.has_value() ? base2->options() : x2.options());
  const at::Tensor* bptr = base2.has_value() ? &*base2 : nullptr;
  switch (st) {
    case at::kFloat: dispatch_out<float>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y); break;
    case at::kBFloat16: dispatch_out<c10::BFloat16>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y); break;
    default: dispatch_out<c10::Half>(x2, T, sa, sb, bp, mp, ap, r, out, s, bptr, y);
  }
  return y;
}

// The `branch` op.
at::Tensor branch(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                  const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                  const c10::optional<at::Tensor>& base) {
  return branch_impl(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, base, false);
}

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

// Asks for the cache lines of `n` bytes at `p` (a hint: no fault, no effect on results).
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// branch_rows runs its sign-path groups in parallel from this much work (tokens x r x (in + out)).
constexpr int64_t kRowsParallelWork = int64_t{1} << 20;

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
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const at::Tensor base2 = base.reshape({-1, out}).contiguous();
  check(B > 0 && x2.size(0) % B == 0 && base2.size(0) == x2.size(0), "branch_rows: x and base need the same tokens");
  const int64_t L = x2.size(0) / B;  // tokens per batch row
  at::Tensor y = base2.clone();
  const at::Tensor idx = index.cpu().contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(K));
  for (int64_t i = 0; i < B; ++i) {
    check(ip[i] >= -1 && ip[i] < K, "branch_rows: an index is outside [-1, number of adapters)");
    if (ip[i] >= 0) rows[static_cast<size_t>(ip[i])].push_back(i);
  }
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

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

at::Tensor branch_add(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                      const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                      const c10::optional<at::Tensor>& base, bool into_base) {
  return branch_impl(x, sign_A, sign_B, b, m, a, scaling, sign_max_tokens, base, into_base);
}

std::pair<at::Tensor, at::Tensor> folded_factors(const at::Tensor& sign_A, const at::Tensor& sign_B,
                                                 const at::Tensor& b, const at::Tensor& m, const at::Tensor& a,
                                                 double scaling) {
  check_factors(sign_A, sign_B, b, m, a);
  const int64_t in = b.numel(), r = m.numel(), out = a.numel();
  const at::Tensor sa = sign_A.contiguous(), sb = sign_B.contiguous();
  const at::Tensor bc = b.contiguous(), mc = m.contiguous(), ac = a.contiguous();
  std::vector<float> bbuf, mbuf, abuf;
  const float* bp = as_float(bc, bbuf);
  const float* mp = as_float(mc, mbuf);
  const float* ap = as_float(ac, abuf);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = at::empty({r, in}, opts), B = at::empty({out, r}, opts);
  fold_factors<float>(sa.data_ptr<uint8_t>(), sa.numel(), sb.data_ptr<uint8_t>(), sb.numel(), bp, mp, ap, r, in, out,
                      static_cast<float>(scaling), A.data_ptr<float>(), B.data_ptr<float>());
  return {A, B};
}

bool RowBranch::prepare(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                        const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                        int64_t out) {
#if defined(__AVX512F__)
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
  // as branch_impl's buffers: read by the loop's threads until this thread's next prepare
  thread_local std::vector<float> z, mbuf, bbuf, abuf, h1, h2, nib;
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
#else
  return false;
#endif
}

void RowBranch::run_group(int64_t g) {
#if defined(__AVX512F__)
  const int64_t j0 = 8 * g, j1 = std::min(r_, j0 + 8);
  prefetch(sa_ + j0 * in_ / 8, (j1 - j0) * in_ / 8 + 1);
  // stage1's sums of these rows (each row's sums are the same whichever rows share its pass), then h ⊙ m
  tiled_sums(sa_, nbytes_a_, z_, 1, in_, ld_, r_, j0, j1, h1_);
  for (int64_t j = j0; j < j1; ++j) {
    const float h = kMasked ? 2.f * h1_[j] - total_ : h1_[j];
    h2_[j] = h * m_[j];
  }
  build_nibbles(h2_ + j0, 1, 8, nib_ + 32 * g);
#endif
}

bool RowBranch::claim() {
  const int64_t g = next_.fetch_add(1, std::memory_order_relaxed);
  if (g >= groups_) return false;
  run_group(g);
  finished_.fetch_add(1, std::memory_order_release);
  return true;
}

void RowBranch::start(int64_t k0, int64_t k1) {
#if defined(__AVX512F__)
  const int64_t o0 = std::min(out_, kRows * k0), o1 = std::min(out_, kRows * k1);
  prefetch(sb_ + o0 * r_ / 8, (o1 - o0) * r_ / 8 + 1);
  if (a8_ != nullptr) prefetch(a8_ + o0, o1 - o0);
  for (int64_t i = 0; i < share_ && claim(); ++i) {
  }
#endif
}

void RowBranch::add_rows(int64_t k0, int64_t k1, float* y) {
#if defined(__AVX512F__)
  while (claim()) {
  }
  const int64_t o0 = std::min(out_, kRows * k0), o1 = std::min(out_, kRows * k1);
  if (a8_ != nullptr) codes_to_float(a8_ + o0, o1 - o0, a_buf_ + o0);  // this thread's blocks of a
  while (finished_.load(std::memory_order_acquire) < groups_) _mm_pause();
  stage2_blocks<float>(sb_, nbytes_b_, nib_, 1, r_, 8 * groups_, out_, a_, scaling_, y, y, k0, k1);
#endif
}

}  // namespace lordba

TORCH_LIBRARY(lordba, lib) {
  lib.def(
      "branch(Tensor x, Tensor sign_A, Tensor sign_B, Tensor b, Tensor m, Tensor a, float scaling, "
      "int sign_max_tokens, Tensor? base=None) -> Tensor");
  lib.def(
      "branch_rows(Tensor x, Tensor index, Tensor[] sign_A, Tensor[] sign_B, Tensor[] b, Tensor[] m, Tensor[] a, "
      "float[] scaling, int[] sign_max_tokens, Tensor base) -> Tensor");
  lib.def("isa() -> str", &lordba::isa);
}

TORCH_LIBRARY_IMPL(lordba, CPU, lib) {
  lib.impl("branch", &lordba::branch);
  lib.impl("branch_rows", &lordba::branch_rows);
}

// The sign path's stages (see branch.cpp's overview and docs/kernels.md): stage 1, h = S_A (b ⊙ x), by
// masked adds (AVX-512) or a ±1 table; stage 2, S_B (m ⊙ h), by T-MAC-style lookup tables; the output
// s · a ⊙ acc (+ base) rounded once. Stage 2's blocks of 16 outputs (one token's, in RowBranch) in sign_blocks.cpp.
#include <ATen/Parallel.h>

#include "branch_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lordba::impl {

namespace {

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

}  // namespace

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

// Row j of S_A times z, summed one signed term after the other (the portable build's sums): the masked sums' h for
// a token whose Σz is not finite, where 2·Σ_{bit=1} z − Σz gave inf − inf = NaN for an infinite z of a set bit
// (x or b ⊙ x infinite, or Σz overflowing), and the reference gives ±inf (stage1's and RowBranch's).
float signed_sum(const uint8_t* sa, int64_t nbytes, const float* z, int64_t in, int64_t j) {
  float h = 0.f;
  for (int64_t i = 0; i < in; ++i) {
    const int64_t pos = j * in + i;
    const float v = z[(i & ~int64_t{7}) + 7 - (i & 7)];  // z's groups of 8 are stored reversed
    h += (pos >> 3) < nbytes && ((sa[pos >> 3] >> (7 - (pos & 7))) & 1) ? v : -v;
  }
  return h;
}

namespace {

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
    for (int64_t t = 0; t < T; ++t) {
      if (std::isfinite(totals[t])) {
        for (int64_t j = 0; j < r; ++j) h1[t * r + j] = 2.f * h1[t * r + j] - totals[t];
      } else {  // an infinite (or NaN) z: the signed sums, as the reference (inf − inf would be NaN)
        for (int64_t j = 0; j < r; ++j) h1[t * r + j] = signed_sum(sa, nbytes, z + t * ld, in, j);
      }
    }
}

}  // namespace

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

#if defined(__AVX512F__)
namespace {

// Stage 2 and the outputs in blocks of 16 outputs (sign_blocks.cpp) over the threads.
template <typename out_t>
void stage2(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
            const float* a, float scaling, const out_t* base, out_t* y) {
  const int64_t grain = std::max<int64_t>(16, 2048 / (rp / 8 * T));
  at::parallel_for(0, (out + 15) / 16, grain, [=](int64_t k0, int64_t k1) {
    stage2_blocks<out_t>(sb, nbytes, nib, T, r, rp, out, a, scaling, base, y, k0, k1);
  });
}
}  // namespace

#else
namespace {

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
}  // namespace

#endif

namespace {

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

}  // namespace

template <typename x_t, typename out_t>
void sign_path(const x_t* x, int64_t T, int64_t in, const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb,
               int64_t nbytes_b, const float* b, const float* m, const float* a, int64_t r, int64_t out,
               float scaling, const out_t* base, out_t* y) {
  const float* nib = sign_tables<x_t>(x, T, in, sa, nbytes_a, b, m, r);
  stage2<out_t>(sb, nbytes_b, nib, T, r, round_up(r, 8), out, a, scaling, base, y);
}

// The instantiations the other files call.
#define LORDBA_SIGN_PATH(x_t, out_t)                                                                             \
  template void sign_path<x_t, out_t>(const x_t*, int64_t, int64_t, const uint8_t*, int64_t, const uint8_t*,    \
                                      int64_t, const float*, const float*, const float*, int64_t, int64_t, float, \
                                      const out_t*, out_t*);
#define LORDBA_SIGN_PATHS(x_t) \
  LORDBA_SIGN_PATH(x_t, float) LORDBA_SIGN_PATH(x_t, c10::BFloat16) LORDBA_SIGN_PATH(x_t, c10::Half)
LORDBA_SIGN_PATHS(float)
LORDBA_SIGN_PATHS(c10::BFloat16)
LORDBA_SIGN_PATHS(c10::Half)

}  // namespace lordba::impl

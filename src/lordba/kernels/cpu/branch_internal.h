// Internal to the branch kernels: what branch.cpp (the ops), sign_stages.cpp (the sign path's stages),
// branch_rows.cpp (many adapters in one batch) and row_branch.cpp (the branch inside a one-token GEMV)
// share. Not part of the extension's interface (branch.h is).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lordba::impl {

constexpr int64_t kChunk = 16;  // floats per sign chunk (2 bytes of bits)

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

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
inline const SignTable kSign;

// code / 127 for every int8 code, computed once: the same division as `converted`, read from a table.
struct Int8Codes {
  float v[256];
  Int8Codes() {
    for (int c = -128; c < 128; ++c) v[c + 128] = static_cast<float>(c) / 127.f;
  }
};
inline const Int8Codes kCodes;

// Whether stage 1 sums the z of set bits only (AVX-512: one masked add per 16 signs; then h = 2·sums − Σz)
// or ±z directly (the portable and AVX2 builds).
#if defined(__AVX512F__)
constexpr bool kMasked = true;
#else
constexpr bool kMasked = false;
#endif

inline void check(bool ok, const char* what) { TORCH_CHECK(ok, "lordba::branch: ", what); }

// Asks for the cache lines of `n` bytes at `p` (a hint: no fault, no effect on results).
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// ---------------------------------------------------------------- the sign path
// 16 scale values from b (scales8: 8, AVX2): float32 as stored, or int8 codes as code / 127 correctly rounded
// without a division: q = c · fl(1/127), then one Newton step on the exact residual c − 127·q (both FMAs).
// Checked for all 256 codes against the division (a test). scale_at: one value, the same.
#if defined(__AVX512F__)
inline __m512 scales16(const float* b) { return _mm512_loadu_ps(b); }
inline __m512 scales16(const int8_t* b) {
  const __m512 recip = _mm512_set1_ps(1.f / 127.f), divisor = _mm512_set1_ps(127.f);
  const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
  const __m512 q = _mm512_mul_ps(c, recip);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, divisor, c), recip, q);
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 scales8(const float* b) { return _mm256_loadu_ps(b); }
inline __m256 scales8(const int8_t* b) {  // scales16's arithmetic, 8 lanes
  const __m256 recip = _mm256_set1_ps(1.f / 127.f), divisor = _mm256_set1_ps(127.f);
  const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
  const __m256 q = _mm256_mul_ps(c, recip);
  return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, divisor, c), recip, q);
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
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<x_t, float>) {
    const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    for (; i + 8 <= in; i += 8)
      _mm256_storeu_ps(z + i, _mm256_permutevar8x32_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scales8(b + i)), rev));
  }
#endif
  for (int64_t k = i; k < ld; ++k) z[k] = 0.f;
  for (; i < in; ++i) z[(i & ~int64_t{7}) + 7 - (i & 7)] = static_cast<float>(x[i]) * scale_at(b, i);
}


// ---------------------------------------------------------------- sign_stages.cpp
// y[idx] = val (+ base[idx] where given), rounded once to out_t: how stage 2 writes an output.
template <typename out_t>
inline void store_output(float val, const out_t* base, out_t* y, int64_t idx) {
  if (base != nullptr) val += static_cast<float>(base[idx]);
  y[idx] = static_cast<out_t>(val);
}

// Stage 1 (h = S_A z) of rows [j0, j1) of the sign matrix for T tokens of z, added into acc[t*r + j].
void tiled_sums(const uint8_t* sa, int64_t nbytes, const float* z, int64_t T, int64_t in, int64_t ld, int64_t r,
                int64_t j0, int64_t j1, float* acc);
// Σz of one token, summed exactly as stage 1 sums it.
float z_total(const float* z, int64_t ld);
// Row j of S_A times z (z's groups of 8 reversed), one signed term after the other: the masked sums' h where Σz is
// not finite (2·Σ_{bit=1} z − Σz would be inf − inf = NaN).
float signed_sum(const uint8_t* sa, int64_t nbytes, const float* z, int64_t in, int64_t j);
// The nibble tables of stage 2 for T tokens of h2 (rp values each: r rounded up to 8).
void build_nibbles(const float* h2, int64_t T, int64_t rp, float* nib);
// Stage 2 and the output of blocks [k0, k1) of 16 outputs (float, BFloat16, Half outputs).
template <typename out_t>
void stage2_blocks(const uint8_t* sb, int64_t nbytes, const float* nib, int64_t T, int64_t r, int64_t rp, int64_t out,
                   const float* a, float scaling, const out_t* base, out_t* y, int64_t k0, int64_t k1);
// The five stages for T tokens (x_t, out_t: float, BFloat16, Half).
template <typename x_t, typename out_t>
void sign_path(const x_t* x, int64_t T, int64_t in, const uint8_t* sa, int64_t nbytes_a, const uint8_t* sb,
               int64_t nbytes_b, const float* b, const float* m, const float* a, int64_t r, int64_t out,
               float scaling, const out_t* base, out_t* y);

// ---------------------------------------------------------------- branch.cpp
void codes_to_float(const int8_t* v, int64_t n, float* d);  // d[i] = v[i] / 127 (scales16 / scale_at)
// A scale vector as float32: the tensor itself, or its values converted into `buf`.
const float* as_float(const at::Tensor& t, std::vector<float>& buf);
bool scale_dtype_ok(const at::Tensor& t, bool codes);
// The adapter's own tensors: uint8 signs of the scale vectors' sizes, scales of a supported dtype.
void check_factors(const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b, const at::Tensor& m,
                   const at::Tensor& a);
// The `branch` op.
at::Tensor branch(const at::Tensor& x, const at::Tensor& sign_A, const at::Tensor& sign_B, const at::Tensor& b,
                  const at::Tensor& m, const at::Tensor& a, double scaling, int64_t sign_max_tokens,
                  const c10::optional<at::Tensor>& base);

// ---------------------------------------------------------------- branch_rows.cpp
// The `branch_rows` op: batch row i through adapter index[i] (-1: the base output as it is).
at::Tensor branch_rows(const at::Tensor& x, const at::Tensor& index, at::TensorList sign_A, at::TensorList sign_B,
                       at::TensorList b, at::TensorList m, at::TensorList a, at::ArrayRef<double> scaling,
                       at::IntArrayRef sign_max_tokens, const at::Tensor& base);

}  // namespace lordba::impl

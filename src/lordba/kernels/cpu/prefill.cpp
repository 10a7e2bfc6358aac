// The input of q4.cpp's bfloat16 prefill GEMM with a LoRDBA branch, [x | h | 0] with h = x A'^T, in
// one pass over x on the CPU's tile unit (AMX-BF16), where the build and the CPU have it.
//
// The GEMM y = [x | h] [W | B']^T needs h first. oneDNN computes h = x A'^T (N = r, 16 or 32) as fast
// as its arithmetic allows, but every call first packs x for the tile unit: for SmolLM2's 512-token
// prefill that fixed cost was most of what the adapter added to a layer (~75 us of ~100 at 2 threads,
// docs/kernels.md). Here each block of 32 tokens is rounded to bfloat16 into the GEMM's input (the
// conversion the base GEMM needs anyway) and, while those rows are in L1, multiplied on the tile unit
// by A'^T, which is packed once per call in the tile unit's pair-interleaved layout (a transpose of
// r x in / 2 words of A' in bfloat16, which q4_prefill_factors makes and the layer keeps).
// The tile unit reads x's rows where they are: nothing is packed per token. The sums are float32 over
// bfloat16 products, as oneDNN's; h is rounded to bfloat16, as the GEMM's input is.
//
// Linux grants a process the tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it the
// tile instructions fault, so amx_ready() asks once and the caller falls back to at::mm where it is
// false (another OS, a build without AMX, a kernel that refuses).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "q4.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define LORDBA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lordba_q4 {
namespace {

#if defined(LORDBA_AMX)
constexpr int64_t kRows = 32;  // tokens per block: two 16-row tiles share each tile of A'^T

struct TileConfig {  // the tile unit's palette-1 configuration (64 bytes)
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A'^T [in, r] in the tile unit's layout, from A' (bfloat16 [r, in]), for column blocks of 16: block c,
// pair p (inputs 2p, 2p + 1), column j -> packed[(c * pairs + p) * 16 + j] = A'[16 c + j, 2p .. 2p + 1]
// (two bfloat16 in one 32-bit word, which is how they lie in A''s row), zero past r and in.
void pack_pairs(const uint16_t* A, int64_t r, int64_t in, int64_t pairs, std::vector<uint32_t>& packed) {
  packed.assign(static_cast<size_t>((r + 15) / 16 * pairs * 16), 0u);
  for (int64_t j = 0; j < r; ++j) {
    const uint16_t* row = A + j * in;
    uint32_t* dst = packed.data() + (j / 16) * pairs * 16 + j % 16;
    for (int64_t p = 0; p < in / 2; ++p) dst[p * 16] = row[2 * p] | static_cast<uint32_t>(row[2 * p + 1]) << 16;
    if (in % 2 != 0) dst[in / 2 * 16] = row[in - 1];
  }
}

// Rows [0, n) of x (float32, row stride in) rounded to bfloat16 into dst (row stride K), columns in..K zeroed.
void round_rows(const float* x, int64_t n, int64_t in, uint16_t* dst, int64_t K) {
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * in;
    uint16_t* row = dst + t * K;
    int64_t k = 0;
    for (; k + 16 <= in; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
    if (k < in) {
      const auto mask = static_cast<__mmask16>((1u << (in - k)) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + k));
      _mm256_mask_storeu_epi16(row + k, mask, v);
    }
    std::memset(row + in, 0, static_cast<size_t>(K - in) * sizeof(uint16_t));
  }
}

// h for one block of 32 rows of xin (row stride K; the first `steps` 32-column steps, zero past in),
// all column blocks of the packed A'^T, into hbuf [32][16 * blocks] float32. Tiles: 0-1 the sums of
// the two 16-row halves, 2-3 their rows of x, 4 the step's pairs of A'^T.
void block_h(const uint16_t* xin, int64_t K, const uint32_t* packed, int64_t pairs, int64_t blocks, int64_t steps,
             float* hbuf) {
  const int64_t stride = K * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t c = 0; c < blocks; ++c) {
    _tile_zero(0);
    _tile_zero(1);
    const uint32_t* bc = packed + c * pairs * 16;
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, bc + s * 16 * 16, 64);
      _tile_loadd(2, xin + s * 32, stride);
      _tile_loadd(3, xin + 16 * K + s * 32, stride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    const int64_t ld = 16 * blocks * static_cast<int64_t>(sizeof(float));
    _tile_stored(0, hbuf + 16 * c, ld);
    _tile_stored(1, hbuf + 16 * blocks * 16 + 16 * c, ld);
  }
}

bool request_tiles() {
  constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}
#endif

}  // namespace

bool amx_ready() {
#if defined(LORDBA_AMX)
  static const bool ready = request_tiles();
  return ready;
#else
  return false;
#endif
}

bool input_with_h(const float* x, int64_t T, int64_t in, const c10::BFloat16* A, int64_t r, c10::BFloat16* xin,
                  int64_t K) {
#if defined(LORDBA_AMX)
  if (!amx_ready() || r < 1 || K < in + r) return false;
  const int64_t steps = (in + 31) / 32, pairs = steps * 16, blocks = (r + 15) / 16;
  if (steps * 32 > K) return false;  // the tiles read 32 columns a step; zeros past in, inside the row
  std::vector<uint32_t> packed;
  pack_pairs(reinterpret_cast<const uint16_t*>(A), r, in, pairs, packed);
  auto* out = reinterpret_cast<uint16_t*>(xin);
  at::parallel_for(0, (T + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    TileConfig config;
    for (int i = 0; i < 5; ++i) {
      config.rows[i] = 16;
      config.colsb[i] = 64;
    }
    _tile_loadconfig(&config);
    std::vector<float> hbuf(static_cast<size_t>(kRows * 16 * blocks));
    std::vector<uint16_t> tail;  // the last block's rows padded to 32 with zeros
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kRows, n = std::min(kRows, T - t0);
      uint16_t* rows = out + t0 * K;
      if (n < kRows) {
        tail.assign(static_cast<size_t>(kRows * K), 0);
        rows = tail.data();
      }
      round_rows(x + t0 * in, n, in, rows, K);
      block_h(rows, K, packed.data(), pairs, blocks, steps, hbuf.data());
      for (int64_t t = 0; t < n; ++t) {
        uint16_t* dst = out + (t0 + t) * K;
        if (rows != out + t0 * K) std::memcpy(dst, rows + t * K, static_cast<size_t>(K) * sizeof(uint16_t));
        const float* hrow = hbuf.data() + t * 16 * blocks;
        for (int64_t j = 0; j < r; ++j) dst[in + j] = c10::BFloat16(hrow[j]).x;
      }
    }
    _tile_release();
  });
  return true;
#else
  (void)x, (void)T, (void)in, (void)A, (void)r, (void)xin, (void)K;
  return false;
#endif
}

}  // namespace lordba_q4

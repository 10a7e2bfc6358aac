// The CPU's tile unit (AMX-BF16) for an adapter's branch over many tokens, where the build and the CPU have it:
//
// * input_with_h: the input of q4.cpp's bfloat16 prefill GEMM with a LoRDBA branch, [x | h | 0] with
//   h = x A'^T, in one pass over x. The GEMM y = [x | h] [W | B']^T needs h first. oneDNN computes h as
//   fast as its arithmetic allows, but every call first packs x for the tile unit: for SmolLM2's 512-token
//   prefill that fixed cost was most of what the adapter added to a layer (~75 us of ~100 at 2 threads,
//   docs/kernels.md). Here each block of 32 tokens is rounded to bfloat16 into the GEMM's input (the
//   conversion the base GEMM needs anyway) and, while those rows are in L1, multiplied on the tile unit by
//   A'^T in the tile unit's pair-interleaved layout (pack_tiles: a transpose of r x in / 2 words of A' in
//   bfloat16; kept by the layer, or packed per call).
// * add_branch: a dense (float32) base's prompt branch, y += h B'^T after the base's own float32 GEMM, block
//   by block of 32 tokens: x rounded to bfloat16, h on the tile unit and rounded to bfloat16, then y's rows
//   loaded into the tile unit's accumulators, summed into with h B'^T and stored back (the `fast` branch
//   compute: about half the cost of folding per call and two float32 GEMMs, docs/kernels.md).
//
// The tile unit reads x's rows where they are: nothing is packed per token. The sums are float32 over
// bfloat16 products, as oneDNN's; h is rounded to bfloat16, as the GEMM's input is.
//
// Linux grants a process the tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it the
// tile instructions fault, so amx_ready() asks once and the callers fall back (at::mm, the float32
// branch) where it is false (another OS, a build without AMX, a kernel that refuses).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "q4.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

// GCC spells the AMX macros __AMX_TILE__ / __AMX_BF16__, clang (14 at least) __AMXTILE__ / __AMXBF16__
#if (defined(__AMX_TILE__) || defined(__AMXTILE__)) && (defined(__AMX_BF16__) || defined(__AMXBF16__)) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define LORDBA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lordba_q4 {
namespace {

// M^T [cols, rows] in the tile unit's layout, from M (bfloat16 [rows, cols]), for column blocks of 16: block c,
// pair p (columns 2p, 2p + 1 of M), column j -> dst[(c * pairs + p) * 16 + j] = M[16 c + j, 2p .. 2p + 1] (two
// bfloat16 in one 32-bit word, which is how they lie in M's row), zero past rows and cols; pairs >= cols / 2.
void pack_pairs(const uint16_t* M, int64_t rows, int64_t cols, int64_t pairs, uint32_t* dst) {
  std::fill(dst, dst + (rows + 15) / 16 * pairs * 16, 0u);
  for (int64_t j = 0; j < rows; ++j) {
    const uint16_t* row = M + j * cols;
    uint32_t* col = dst + (j / 16) * pairs * 16 + j % 16;
    for (int64_t p = 0; p < cols / 2; ++p) col[p * 16] = row[2 * p] | static_cast<uint32_t>(row[2 * p + 1]) << 16;
    if (cols % 2 != 0) col[cols / 2 * 16] = row[cols - 1];
  }
}


#if defined(LORDBA_AMX)
constexpr int64_t kRows = 32;  // tokens per block: two 16-row tiles share each tile of A'^T

struct TileConfig {  // the tile unit's palette-1 configuration (64 bytes)
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

// One block of 32 rows on the tile unit: c [32][16 * cblocks] (float32, row stride ldc) = (accumulate ? c : 0) +
// a [32][32 * steps] (bfloat16, row stride lda; zero past the real columns) times the packed M^T (pack_pairs,
// `pairs` pairs per column block). Tiles: 0-1 the sums of the two 16-row halves, 2-3 their rows of a, 4 the
// step's pairs of M^T. h = x A'^T into a buffer (input_with_h, add_branch); y += h B'^T (add_branch).
void tile_product(const uint16_t* a, int64_t lda, const uint32_t* packed, int64_t pairs, int64_t cblocks,
                  int64_t steps, float* c, int64_t ldc, bool accumulate) {
  const int64_t astride = lda * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t cstride = ldc * static_cast<int64_t>(sizeof(float));
  for (int64_t blk = 0; blk < cblocks; ++blk) {
    float* cb = c + 16 * blk;
    if (accumulate) {
      _tile_loadd(0, cb, cstride);
      _tile_loadd(1, cb + 16 * ldc, cstride);
    } else {
      _tile_zero(0);
      _tile_zero(1);
    }
    const uint32_t* pb = packed + blk * pairs * 16;
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, pb + s * 16 * 16, 64);
      _tile_loadd(2, a + s * 32, astride);
      _tile_loadd(3, a + 16 * lda + s * 32, astride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, cb, cstride);
    _tile_stored(1, cb + 16 * ldc, cstride);
  }
}

// The columns of y past its whole blocks of 16, [16 * cfull, out), for n rows: the same sums as tile_product's.
void tail_out(const uint16_t* hb, int64_t R, int64_t r, const uint32_t* packedB, int64_t cfull, int64_t out,
              int64_t n, float* y, int64_t ldy) {
  const int64_t rpairs = R / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = cfull * 16; o < out; ++o) {
      const uint32_t* col = packedB + (o / 16) * rpairs * 16 + o % 16;
      float sum = 0.f;
      for (int64_t j = 0; j < r; ++j) {
        const auto w = static_cast<uint16_t>(col[(j / 2) * 16] >> (16 * (j % 2)));
        sum += static_cast<float>(c10::BFloat16(hb[t * R + j], c10::BFloat16::from_bits())) *
               static_cast<float>(c10::BFloat16(w, c10::BFloat16::from_bits()));
      }
      y[t * ldy + o] += sum;
    }
}

void config_tiles() {  // five tiles of 16 rows x 64 bytes
  TileConfig config;
  for (int i = 0; i < 5; ++i) {
    config.rows[i] = 16;
    config.colsb[i] = 64;
  }
  _tile_loadconfig(&config);
}

bool request_tiles() {
  constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}
#endif

}  // namespace

bool amx_ready() {
#if defined(LORDBA_AMX)
  // LORDBA_AMX=0 keeps the tile unit unused (the oneDNN path of CPUs without it), read once per process
  static const bool ready = [] {
    const char* env = std::getenv("LORDBA_AMX");
    return !(env != nullptr && std::strcmp(env, "0") == 0) && request_tiles();
  }();
  return ready;
#else
  return false;
#endif
}

bool input_with_h(const float* x, int64_t T, int64_t in, const c10::BFloat16* A, int64_t r, c10::BFloat16* xin,
                  int64_t K, const uint32_t* packedA) {
#if defined(LORDBA_AMX)
  if (!amx_ready() || r < 1 || K < in + r) return false;
  const int64_t steps = (in + 31) / 32, pairs = steps * 16, blocks = (r + 15) / 16;
  if (steps * 32 > K) return false;  // the tiles read 32 columns a step; zeros past in, inside the row
  std::vector<uint32_t> own;  // A'^T packed here where the caller has not kept it packed
  if (packedA == nullptr) {
    own.resize(static_cast<size_t>(blocks * pairs * 16));
    pack_pairs(reinterpret_cast<const uint16_t*>(A), r, in, pairs, own.data());
    packedA = own.data();
  }
  auto* out = reinterpret_cast<uint16_t*>(xin);
  at::parallel_for(0, (T + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    config_tiles();
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
      tile_product(rows, K, packedA, pairs, blocks, steps, hbuf.data(), 16 * blocks, false);
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
  (void)x, (void)T, (void)in, (void)A, (void)r, (void)xin, (void)K, (void)packedA;
  return false;
#endif
}

int64_t tile_words(int64_t rows, int64_t cols) { return (rows + 15) / 16 * ((cols + 31) / 32 * 16) * 16; }

void pack_tiles(const c10::BFloat16* M, int64_t rows, int64_t cols, uint32_t* dst) {
  pack_pairs(reinterpret_cast<const uint16_t*>(M), rows, cols, (cols + 31) / 32 * 16, dst);
}

bool add_branch(const float* x, int64_t T, int64_t in, const uint32_t* packedA, const uint32_t* packedB, int64_t r,
                int64_t out, float* y) {
#if defined(LORDBA_AMX)
  if (!amx_ready() || r < 1 || in < 1 || out < 1) return false;
  const int64_t steps = (in + 31) / 32, pairs = steps * 16, blocks = (r + 15) / 16;
  const int64_t rsteps = (r + 31) / 32, cfull = out / 16, K = steps * 32, R = 32 * rsteps;
  at::parallel_for(0, (T + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    config_tiles();
    std::vector<uint16_t> xs(static_cast<size_t>(kRows * K), 0), hb(static_cast<size_t>(kRows * R), 0);
    std::vector<float> hbuf(static_cast<size_t>(kRows * 16 * blocks)), tail;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kRows, n = std::min(kRows, T - t0);
      if (n < kRows) std::fill(xs.begin(), xs.end(), uint16_t{0});
      round_rows(x + t0 * in, n, in, xs.data(), K);
      tile_product(xs.data(), K, packedA, pairs, blocks, steps, hbuf.data(), 16 * blocks, false);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < r; ++j) hb[t * R + j] = c10::BFloat16(hbuf[t * 16 * blocks + j]).x;
      float* rows = y + t0 * out;
      if (n < kRows) {  // the last block's rows, padded to 32 with zeros (their sums are dropped)
        tail.assign(static_cast<size_t>(kRows * out), 0.f);
        std::memcpy(tail.data(), rows, static_cast<size_t>(n * out) * sizeof(float));
        rows = tail.data();
      }
      tile_product(hb.data(), R, packedB, R / 2, cfull, rsteps, rows, out, true);  // y += h B'^T
      tail_out(hb.data(), R, r, packedB, cfull, out, n, rows, out);
      if (n < kRows) std::memcpy(y + t0 * out, rows, static_cast<size_t>(n * out) * sizeof(float));
    }
    _tile_release();
  });
  return true;
#else
  (void)x, (void)T, (void)in, (void)packedA, (void)packedB, (void)r, (void)out, (void)y;
  return false;
#endif
}

}  // namespace lordba_q4

// Weight-only matrix products for CPU decode: y[M, N] = x[M, K] (float32) . W[N, K]^T, W stored as
//   bf16                     (exact bf16 -> fp32 conversion),
//   int8 per output channel  (W = q * scale[n]),
//   int4 group-wise          (W = (q - 8) * scale[n, g], groups of G consecutive k; 16 bytes per group of 32 hold
//                             element j in the low nibble of byte j and element j + 16 in its high nibble).
// Accumulation is float32, so each kernel computes what "dequantize to float32, then matmul" computes, up to the
// order of the additions. Decode is memory-bound: the weights stream once per call while a few activation rows
// stay in L1. AVX-512 intrinsics where the compiler targets it (-march=native), else AVX2 + FMA + F16C intrinsics,
// else plain loops; isa() says which.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define WMM_AVX2 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define WMM_Q8_SIMD 1     // the int8-activation kernels' intrinsics (AVX2 hosts and AVX-512 hosts alike)
#endif
#if defined(WMM_Q8_SIMD) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define WMM_VNNI 1        // and on AVX-512 VNNI hosts, two blocks per 512-bit dpbusd
#endif

namespace {

// Rows of W are read one after the other (one sequential stream the hardware prefetcher follows, plus a software
// prefetch ahead); a tile of up to MT activation rows is multiplied by each weight row while it is in L1.
constexpr int MT = 8;
// bf16 activations are reordered in blocks of EO values (``prep_x``): two vectors of float32.
#if defined(__AVX512F__)
constexpr int64_t EO = 32;
#else
constexpr int64_t EO = 16;
#endif

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float f16_to_f32(uint16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

#if defined(__AVX512F__)
inline __m512 load_w(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#endif

inline float wval(const uint16_t* w, int64_t k) { return bf16_to_f32(w[k]); }
inline float wval(const int8_t* w, int64_t k) { return float(w[k]); }

// y[i * N] (i < mt) = scale * sum_k W_row[k] * x[i * ldx + k]
template <typename W, int mt>
void row_dense(const float* x, int64_t ldx, int64_t K, const W* wr, float scale, float* y, int64_t N) {
  int64_t k = 0;
  float out[MT];
#if defined(__AVX512F__)
  constexpr int64_t PF = 1024 / sizeof(W);      // prefetch 1 KiB ahead in the weight stream
  __m512 a0[mt], a1[mt];
  for (int i = 0; i < mt; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char*)(wr + k + PF), _MM_HINT_T0);
    const __m512 w0 = load_w(wr + k), w1 = load_w(wr + k + 16);
    for (int i = 0; i < mt; ++i) {
      a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
      a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + k + 16), a1[i]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 w0 = load_w(wr + k);
    for (int i = 0; i < mt; ++i) a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
  }
  for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#else
  for (int i = 0; i < mt; ++i) out[i] = 0.f;
#endif
  for (int i = 0; i < mt; ++i) {
    float s = out[i];
    for (int64_t kk = k; kk < K; ++kk) s += wval(wr, kk) * x[i * ldx + kk];
    y[i * N] = s * scale;
  }
}

// int4: groups of G (a multiple of 32) along k, 16 bytes per 32 values (low nibbles: the first 16), one float16
// scale per group; W = (q - 8) * s, computed as fma(q, s, -8 s): the same single rounding as the reference.
template <int mt>
void row_int4(const float* x, int64_t ldx, int64_t K, const uint8_t* wr, const uint16_t* sr, int64_t G, float* y,
              int64_t N) {
#if defined(__AVX512F__)
  __m512 a0[mt], a1[mt];
  for (int i = 0; i < mt; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  const __m128i lo4 = _mm_set1_epi8(0x0F);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const float s = f16_to_f32(sr[g]);
    // the group's 16 possible weights (q - 8) * s, each rounded once like the reference; looked up by q
    const __m512 lut = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(-8.f * s));
    for (int64_t j = 0; j < G; j += 32) {
      const int64_t k = g * G + j;
      _mm_prefetch((const char*)(wr + k / 2 + 1024), _MM_HINT_T0);
      const __m128i b = _mm_loadu_si128((const __m128i*)(wr + k / 2));
      const __m512 wl = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, lo4)), lut);
      const __m512 wh = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lo4)), lut);
      for (int i = 0; i < mt; ++i) {
        a0[i] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
        a1[i] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(x + i * ldx + k + 16), a1[i]);
      }
    }
  }
  for (int i = 0; i < mt; ++i) y[i * N] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#else
  for (int i = 0; i < mt; ++i) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / G, e = k % 32;
      const uint8_t byte = wr[(k - e) / 2 + (e % 16)];
      const int q = e < 16 ? (byte & 15) : (byte >> 4);
      const float sc = f16_to_f32(sr[g]);
      acc += std::fma(float(q), sc, -8.f * sc) * x[i * ldx + k];
    }
    y[i * N] = acc;
  }
#endif
}

#define DISPATCH_MT(FN, mt, ...)                                                  \
  switch (mt) {                                                                   \
    case 1: FN<1>(__VA_ARGS__); break; case 2: FN<2>(__VA_ARGS__); break;         \
    case 3: FN<3>(__VA_ARGS__); break; case 4: FN<4>(__VA_ARGS__); break;         \
    case 5: FN<5>(__VA_ARGS__); break; case 6: FN<6>(__VA_ARGS__); break;         \
    case 7: FN<7>(__VA_ARGS__); break; default: FN<8>(__VA_ARGS__); break;        \
  }

// bf16 rows read 32 values (64 bytes) at a time as 16 32-bit lanes: lane j holds w[2j] in its low half and
// w[2j + 1] in its high half, so "<< 16" gives the even values and "& 0xFFFF0000" the odd ones as float32 (both
// exact). The activations were permuted to match (``prep_x``): in every full block of 32, the 16 even-indexed
// values, then the 16 odd-indexed ones.
template <int mt> void row_bf16(const float* x, int64_t ldx, int64_t K, const uint16_t* wr, float, float* y,
                                int64_t N) {
  int64_t k = 0;
  float out[MT];
#if defined(__AVX512F__)
  __m512 a0[mt], a1[mt];
  for (int i = 0; i < mt; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char*)(wr + k + 512), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512((const void*)(wr + k));
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int i = 0; i < mt; ++i) {
      a0[i] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
      a1[i] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + i * ldx + k + 16), a1[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#else
  for (int i = 0; i < mt; ++i) out[i] = 0.f;
  for (; k + EO <= K; k += EO)
    for (int i = 0; i < mt; ++i)
      for (int j = 0; j < EO / 2; ++j)
        out[i] += bf16_to_f32(wr[k + 2 * j]) * x[i * ldx + k + j] +
                  bf16_to_f32(wr[k + 2 * j + 1]) * x[i * ldx + k + EO / 2 + j];
#endif
  for (int i = 0; i < mt; ++i) {
    float s = out[i];
    for (int64_t kk = k; kk < K; ++kk) s += bf16_to_f32(wr[kk]) * x[i * ldx + kk];
    y[i * N] = s;
  }
}

template <int mt> void row_int8(const float* x, int64_t ldx, int64_t K, const int8_t* w, float s, float* y,
                                int64_t N) { row_dense<int8_t, mt>(x, ldx, K, w, s, y, N); }

template <typename F>
void run_rows(int64_t M, int64_t N, F&& f) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += MT) f(n, m0, int(std::min<int64_t>(MT, M - m0)));
  });
}

// Activations as float32 rows of ldx >= K floats: with M > 1 rows are padded by 16 floats, because a row stride
// of a multiple of 4 KiB (K = 1024, 2048, ...) maps every row to the same L1 set and they evict each other.
// For bf16 (``even_odd``) each full block of EO values is reordered as (even-indexed values, odd-indexed values),
// the tail kept as is. Plain loops: a decode step's
// few rows cost less than the dispatch of torch ops.
torch::Tensor prep_x(const torch::Tensor& x, int64_t K, int64_t& ldx, bool even_odd) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  auto xc = x.to(torch::kFloat32).contiguous();
  const int64_t M = xc.size(0);
  ldx = (M > 1 && (K * 4) % 4096 == 0) ? K + 16 : K;
  if (!even_odd && ldx == K) return xc;
  auto p = torch::empty({M, ldx}, xc.options());
  const float* src = xc.data_ptr<float>();
  float* dst = p.data_ptr<float>();
  const int64_t KB = even_odd ? K / EO * EO : 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* s = src + m * K;
    float* t = dst + m * ldx;
    for (int64_t b = 0; b < KB; b += EO)
      for (int64_t j = 0; j < EO / 2; ++j) {
        t[b + j] = s[b + 2 * j];
        t[b + EO / 2 + j] = s[b + 2 * j + 1];
      }
    std::memcpy(t + KB, s + KB, (K - KB) * sizeof(float));
  }
  return p;
}

// Shared by the AVX2 float-activation kernels and the int8-activation kernels: a horizontal sum, the number of
// independent accumulators per activation row at MR rows (see below), and the loop over weight rows and row tiles.
#if defined(WMM_Q8_SIMD)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
template <int MR> constexpr int n_acc() { return MR == 1 ? 4 : MR == 2 ? 2 : 1; }

// every weight row n, the activation rows in tiles of up to 4: row(n, MR tag, m0)
template <class Row>
void run_tiles(int64_t M, int64_t N, Row row) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: row(n, std::integral_constant<int, 1>(), m0); break;
          case 2: row(n, std::integral_constant<int, 2>(), m0); break;
          case 3: row(n, std::integral_constant<int, 3>(), m0); break;
          default: row(n, std::integral_constant<int, 4>(), m0); break;
        }
      }
  });
}

#if defined(WMM_AVX2)
// AVX2 + FMA + F16C (16 registers of 8 floats). One weight row at a time (a single sequential weight stream,
// prefetched 1 KiB ahead; interleaving 3-4 rows' streams measured 1.2-2x slower on the AVX2 host) against a tile
// of MR <= 4 activation rows, so each decoded weight vector feeds MR rows. An FMA has a latency of 4 cycles and two
// issue each cycle: one accumulator per row made every row a single dependency chain (~6 G weights/s whatever the
// format), so at 1 and 2 rows each row has 4 / 2 independent accumulators (3-4 rows are already 3-4 chains; two per
// row there measured 1.3x slower, register pressure).

// bf16, 16 values as 8 32-bit lanes: "<< 16" gives the even-indexed values, "& 0xFFFF0000" the odd ones (exact);
// the activations are permuted to match (``prep_x`` with blocks of 16). int8 per channel: the sum of q * x, times
// the row's scale at the end. Each decoder turns the 8 * V values of its row from k on into V vectors of exact
// float32 weights.
struct DecBf16 {
  static constexpr int V = 4;     // 32 values, 64 bytes
  static constexpr int64_t R = 16;  // the rest in blocks of 16: prep_x's permutation
  static __m256 w(const uint16_t* p, int64_t k, int v) {
    const __m256i r = _mm256_loadu_si256((const __m256i*)(p + k + 16 * (v / 2)));
    return _mm256_castsi256_ps(v % 2 == 0 ? _mm256_slli_epi32(r, 16)
                                          : _mm256_and_si256(r, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
  }
  static float tail(const uint16_t* p, int64_t k) { return bf16_to_f32(p[k]); }
};
struct DecInt8 {
  static constexpr int V = 8;     // 64 values, 64 bytes
  static constexpr int64_t R = 8;   // the rest in vectors of 8
  static __m256 w(const int8_t* p, int64_t k, int v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + k + 8 * v))));
  }
  static float tail(const int8_t* p, int64_t k) { return float(p[k]); }
};

// y[m * N] = scale * sum_k W[k] x[m * ldx + k] for m < MR, one weight row W (bf16 or int8)
template <int MR, class D, class T>
void tile_dense(const T* wr, float scale, const float* x, int64_t ldx, int64_t K, float* y, int64_t N) {
  constexpr int A = n_acc<MR>(), S = 8 * D::V;
  __m256 acc[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    _mm_prefetch((const char*)(wr + k) + 1024, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int v = 0; v < D::V; ++v) {
      const __m256 wv = D::w(wr, k, v);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        acc[m][v % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * v), acc[m][v % A]);
    }
  }
  // the rest in the decoder's blocks of R, then scalars
  for (; k + D::R <= K; k += D::R)
    for (int v = 0; v < D::R / 8; ++v) {
      const __m256 wv = D::w(wr, k, v);
      for (int m = 0; m < MR; ++m)
        acc[m][v % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * v), acc[m][v % A]);
    }
  for (int m = 0; m < MR; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    float out = hsum(s);
    for (int64_t kk = k; kk < K; ++kk) out += D::tail(wr, kk) * x[m * ldx + kk];
    y[m * N] = out * scale;
  }
}

// int4, groups of 32 (16 bytes: value j in the low nibble of byte j, value j + 16 in its high nibble), a float16
// scale s per group: the group's sum of (q - 8) * x (q - 8 exact in int8, then exact in float32), times s. The
// reference rounds (q - 8) * s (exact) and sums its products with x; here the products with x are rounded before the
// scaling: the same error bound, a different rounding.
template <int MR>
void tile_int4(const uint8_t* wr, const uint16_t* sr, const float* x, int64_t ldx, int64_t K, float* y, int64_t N) {
  constexpr int A = MR <= 2 ? 2 : 1;
  __m256 acc[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  const __m128i lo4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const int64_t ng = K / 32;
#pragma GCC unroll 4
  for (int64_t g = 0; g < ng; ++g) {
    if (g % 4 == 0) _mm_prefetch((const char*)(wr + 16 * g) + 1024, _MM_HINT_T0);
    const __m128i b = _mm_loadu_si128((const __m128i*)(wr + 16 * g));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, lo4), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), lo4), eight);
    __m256 wv[4];
    wv[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    wv[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    wv[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    wv[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
    const __m256 sc = _mm256_cvtph_ps(_mm_set1_epi16(int16_t(sr[g])));
    const float* xg = x + 32 * g;
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const float* xm = xg + m * ldx;
      __m256 p = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xm));
      p = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xm + 8), p);
      p = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xm + 16), p);
      p = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xm + 24), p);
      acc[m][g % A] = _mm256_fmadd_ps(sc, p, acc[m][g % A]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    y[m * N] = hsum(s);
  }
}

// every weight row n, the activation rows in tiles of up to 4: row(n, MR tag, x of the tile, y of the tile)
template <class Row>
void run_avx2(int64_t M, int64_t N, const float* x, int64_t ldx, float* y, Row row) {
  run_tiles(M, N, [&](int64_t n, auto mr, int64_t m0) { row(n, mr, x + m0 * ldx, y + m0 * N + n); });
}
#endif


// -- int8 activations (int8 and int4 weights) -------------------------------------------------------------------
// What llama.cpp does for Q8_0 / Q4_0 on CPU: each activation row is quantized in blocks of 32 values to int8 with
// one float32 scale per block (d = amax / 127, q = round-half-even(x * (127 / amax))), and a block's products with
// the weights are summed exactly in int32 before scaling: the integer dot product does 32 weights in a handful of
// instructions, where converting every weight to float32 made the kernels compute-bound below the memory bandwidth.
// y[m, n] = sw[n] * sum_b d[m, b] * sum_{k in b} q[m, k] W[n, k]          (int8 weights, per-row scale sw)
// y[m, n] =         sum_b d[m, b] * s[n, b] * sum_{k in b} q[m, k] (Q[n, k] - 8)     (int4, a scale per 32)
// ``reference_q8`` in moe/compute.py computes the same in torch (tests).
void quant_q8_row(const float* x, int64_t K, int8_t* q, float* d, float* c) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    int8_t* qb = q + 32 * b;
#if defined(WMM_Q8_SIMD)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    d[b] = amax / 127.f;
    const __m256 id = _mm256_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));   // round half to even
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    // packs work within 128-bit lanes: dwords come out as 0 2 4 6 1 3 5 7 of the 8 groups of 4 values
    _mm256_storeu_si256((__m256i*)qb, _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    d[b] = amax / 127.f;
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    for (int j = 0; j < 32; ++j) qb[j] = int8_t(std::nearbyint(xb[j] * id));
#endif
    if (c == nullptr) continue;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) sum += qb[j];
    c[b] = -8.f * float(sum) * d[b];     // int4: sum q (Q - 8) = sum q Q - 8 sum q
  }
}

// the activations of one call: q [M, K] int8, d [M, K / 32] float32, and for int4 weights (``int4``) the
// correction c [M, K / 32]
struct Q8 {
  torch::Tensor q, d, c;
  Q8(const torch::Tensor& x, int64_t K, bool int4) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % 32 == 0, "x must be [M, ", K, "], K a multiple of 32");
    auto xc = x.to(torch::kFloat32).contiguous();
    const int64_t M = xc.size(0);
    q = torch::empty({M, K}, xc.options().dtype(torch::kInt8));
    d = torch::empty({M, K / 32}, xc.options());
    if (int4) c = torch::empty({M, K / 32}, xc.options());
    for (int64_t m = 0; m < M; ++m) {
      int8_t* qm = q.data_ptr<int8_t>() + m * K;
      quant_q8_row(xc.data_ptr<float>() + m * K, K, qm, d.data_ptr<float>() + m * (K / 32),
                   int4 ? c.data_ptr<float>() + m * (K / 32) : nullptr);
#if defined(WMM_Q8_SIMD)
      // int4: each pair of blocks (b, b + 1) reordered as (b[0:16], b+1[0:16], b[16:32], b+1[16:32]), the order of
      // the low and the high nibbles of the pair's 32 weight bytes (see tile_q8); an odd last block stays as is
      if (int4)
        for (int64_t b = 0; b + 2 <= K / 32; b += 2) {
          const __m256i x0 = _mm256_loadu_si256((const __m256i*)(qm + 32 * b));
          const __m256i x1 = _mm256_loadu_si256((const __m256i*)(qm + 32 * b + 32));
          _mm256_storeu_si256((__m256i*)(qm + 32 * b), _mm256_permute2x128_si256(x0, x1, 0x20));
          _mm256_storeu_si256((__m256i*)(qm + 32 * b + 32), _mm256_permute2x128_si256(x0, x1, 0x31));
        }
#endif
    }
  }
};

#if defined(WMM_Q8_SIMD)
// the 32 products of a block summed in int32 lanes: |x| (u8) times sign(x) w (s8) with maddubs, so no pair
// overflows 16 bits (127 * 127 * 2 < 32768; w = -128 never occurs: int8 weights are in [-127, 127], int4 in [-8, 7])
inline __m256 dot32(__m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
// int4: the 16 bytes of a block of 32 as 32 unsigned values Q in order (low nibbles first), multiplied as they are
// (maddubs: Q u8 times q s8, 15 * 127 * 2 < 32768); the -8 of every weight is added per block as -8 d sum(q)
inline __m256 dot32_u4(const uint8_t* p, __m256i x) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p), lo4 = _mm_set1_epi8(0x0F);
  const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), lo4), _mm_and_si128(b, lo4));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
#endif
#if defined(WMM_VNNI)
// int8 weights, two blocks (b, b + 1) per 512-bit vector: lanes 0-7 hold block b's int32 partial sums, lanes 8-15
// block b + 1's. dpbusd multiplies unsigned by signed bytes, so the activations are offset to x + 128 (u8) and
// 128 sum(w) is subtracted, in int32 (exact). Used from 2 activation rows up, where it measured 1.2-1.5x the 256-bit
// path on Zen 4 (at one row, and for int4 weights, the 256-bit path was as fast or faster: 512-bit ops run as two
// halves there, and the weights' memory stream, not the arithmetic, bounds one row).
inline __m512 pair_scale(const float* s) {     // a pair's two scales as [s0 x 8, s1 x 8]
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)s))));
}
#endif

// MR activation rows against one weight row of nb blocks. W8: int8 weights (wr, scale sw at the end); else int4
// (wr the packed nibbles, ws the float16 scales per block). A accumulators per row as in tile_dense.
template <int MR, bool W8>
void tile_q8(const void* wr, const uint16_t* ws, float sw, const int8_t* xq, const float* xd, const float* xc,
             int64_t K, float* y, int64_t N) {
  const int64_t nb = K / 32;
#if defined(WMM_Q8_SIMD)
  constexpr int A = n_acc<MR>();
  __m256 acc[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  float corr[MR] = {};
  // int4: s_b d_b of the next 8 blocks per row, each 4 times, as pairs [b x 4, b+1 x 4]: block b's at 4 * (b % 8)
  alignas(32) float sd2[MR][32];
  auto scales = [&](int64_t b) {
    const bool full = b + 8 <= nb;
    const __m256 s8 = full ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + b))) : _mm256_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      __m256 v;
      if (full) {
        v = _mm256_mul_ps(s8, _mm256_loadu_ps(xd + m * nb + b));
      } else {
        alignas(32) float t[8] = {};
        for (int64_t j = b; j < nb; ++j) t[j - b] = _cvtsh_ss(ws[j]) * xd[m * nb + j];
        v = _mm256_load_ps(t);
      }
      for (int j = 0; j < 4; ++j)
        _mm256_store_ps(sd2[m] + 8 * j, _mm256_permutevar8x32_ps(
            v, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1)));
    }
  };
  // int4, blocks b and b + 1 (b even) at once: the 32 bytes' low nibbles are (b[0:16], b+1[0:16]) and their high
  // nibbles (b[16:32], b+1[16:32]), the order Q8 stored the activations in; two maddubs, one add (|sum| <= 4 * 15 *
  // 127 fits int16), one madd: int32 lanes 0-3 hold block b's partial sums, 4-7 block b + 1's
  auto pair4 = [&](int64_t b, int a) {
    const uint8_t* p = (const uint8_t*)wr + 16 * b;
    if (b % 4 == 0) _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);
    if (b % 8 == 0) scales(b);
    const __m256i v = _mm256_loadu_si256((const __m256i*)p), lo4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const int8_t* xm = xq + m * K + 32 * b;
      const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xm)),
                                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xm + 32))));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
      acc[m][a] = _mm256_fmadd_ps(dot, _mm256_load_ps(sd2[m] + 4 * (b % 8)), acc[m][a]);
    }
  };
  auto block = [&](int64_t b, int a) {
    if constexpr (W8) {
      const int8_t* p = (const int8_t*)wr + 32 * b;
      if (b % 2 == 0) _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256((const __m256i*)p);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m256 dot = dot32(w, _mm256_loadu_si256((const __m256i*)(xq + m * K + 32 * b)));
        acc[m][a] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(xd + m * nb + b), acc[m][a]);
      }
    } else {     // int4: only an odd last block (pairs go through pair4)
      const uint8_t* p = (const uint8_t*)wr + 16 * b;
      if (b % 8 == 0) scales(b);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m256 dot = dot32_u4(p, _mm256_loadu_si256((const __m256i*)(xq + m * K + 32 * b)));
        acc[m][a] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&sd2[m][4 * (b % 8)]), acc[m][a]);
      }
    }
  };
  int64_t b = 0;
#if defined(WMM_VNNI)
  __m512 acc2[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc2[m][a] = _mm512_setzero_ps();
  auto pair = [&](int64_t b, int a) {    // int8 weights, blocks b, b + 1 (b even)
    const int8_t* p = (const int8_t*)wr + 32 * b;
    _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);
    const __m512i w = _mm512_loadu_si512((const void*)p);
    const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(),
                                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(char(0x80)), w));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512i xu = _mm512_xor_si512(_mm512_loadu_si512((const void*)(xq + m * K + 32 * b)),
                                          _mm512_set1_epi8(char(0x80)));
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base, xu, w));
      acc2[m][a] = _mm512_fmadd_ps(dot, pair_scale(xd + m * nb + b), acc2[m][a]);
    }
  };
  if constexpr (W8 && MR >= 2) {
    for (; b + 2 * A <= nb; b += 2 * A)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) pair(b + 2 * a, a);
    for (; b + 2 <= nb; b += 2) pair(b, 0);
  }
#endif
  if constexpr (!W8) {
    for (; b + 2 * A <= nb; b += 2 * A)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) pair4(b + 2 * a, a);
    for (; b + 2 <= nb; b += 2) pair4(b, 0);
  }
  for (; b + A <= nb; b += A)
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) block(b + a, a);
  for (; b < nb; ++b) block(b, 0);
  if constexpr (!W8) {     // the -8 of the weights: sum_b s_b * (-8 d_b sum q), 8 blocks at a time
    for (int m = 0; m < MR; ++m) {
      __m256 c = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= nb; j += 8)
        c = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + j))),
                            _mm256_loadu_ps(xc + m * nb + j), c);
      corr[m] = hsum(c);
      for (; j < nb; ++j) corr[m] += _cvtsh_ss(ws[j]) * xc[m * nb + j];
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
#if defined(WMM_VNNI)
    __m512 s2 = acc2[m][0];
    for (int a = 1; a < A; ++a) s2 = _mm512_add_ps(s2, acc2[m][a]);
    s = _mm256_add_ps(s, _mm256_add_ps(_mm512_castps512_ps256(s2), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s2), 1))));
#endif
    y[m * N] = (hsum(s) + corr[m]) * sw;
  }
#else
  (void)xc;
  for (int m = 0; m < MR; ++m) {
    float out = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t dot = 0;
      const int8_t* xb = xq + m * K + 32 * b;
      for (int j = 0; j < 32; ++j) {
        int wv;
        if constexpr (W8) {
          wv = ((const int8_t*)wr)[32 * b + j];
        } else {
          const uint8_t byte = ((const uint8_t*)wr)[16 * b + (j % 16)];
          wv = int(j < 16 ? (byte & 15) : (byte >> 4)) - 8;
        }
        dot += wv * int(xb[j]);
      }
      out += float(dot) * (W8 ? xd[m * nb + b] : f16_to_f32(ws[b]) * xd[m * nb + b]);
    }
    y[m * N] = out * sw;
  }
#endif
}

// int4 weights repacked in groups of 8 rows (layout "x8", ``compute.interleave8``), for one row of activations
// or a few: per block of 32 the 8 rows' 16 nibble bytes lie in 128 bytes as 4 chunks of 32, chunk c holding bytes
// 4c..4c+3 of row 0, then of row 1, ..., row 7 (a 32-bit lane per row); the 8 rows' block scales are 8 float16
// in a row. The low nibbles of chunk c are weights 4c..4c+3 of each row, the high nibbles weights 16+4c..16+4c+3,
// so four activation bytes broadcast to every lane meet all 8 rows at once: 8 maddubs and 7 int16 adds (|sum| <=
// 8 * 2 * 15 * 127 < 32768) and one madd give each row's exact block sum in its own int32 lane, minus 8 sum(q)
// (the weights' -8, also exact); a lane's float accumulator is its row's output, so no horizontal sums, no
// per-row scale shuffles, and one stream of weight bytes for 8 rows (as llama.cpp's repacked Q4_0 on CPU).
// xs8[m, b] = 8 * sum of row m's block b of quantized activations.
template <int MR>
void tile_x8(const uint8_t* wg, const uint16_t* sg, const int8_t* xq, const float* xd, const int32_t* xs8,
             int64_t K, float* y, int64_t N) {
  const int64_t nb = K / 32;
#if defined(WMM_Q8_SIMD)
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  auto bc = [](const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); };
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = wg + 128 * b;
    _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);
    _mm_prefetch((const char*)p + 1088, _MM_HINT_T0);
    __m256i lo[4], hi[4];
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * c));
      lo[c] = _mm256_and_si256(v, lo4);
      hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sg + 8 * b)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const int8_t* xb = xq + m * K + 32 * b;
      __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], bc(xb)), _mm256_maddubs_epi16(hi[0], bc(xb + 16)));
      __m256i u = _mm256_add_epi16(_mm256_maddubs_epi16(lo[1], bc(xb + 4)), _mm256_maddubs_epi16(hi[1], bc(xb + 20)));
      t = _mm256_add_epi16(t, _mm256_add_epi16(_mm256_maddubs_epi16(lo[2], bc(xb + 8)),
                                               _mm256_maddubs_epi16(hi[2], bc(xb + 24))));
      u = _mm256_add_epi16(u, _mm256_add_epi16(_mm256_maddubs_epi16(lo[3], bc(xb + 12)),
                                               _mm256_maddubs_epi16(hi[3], bc(xb + 28))));
      const __m256i d32 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_add_epi16(t, u), ones),
                                           _mm256_set1_epi32(xs8[m * nb + b]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32), _mm256_mul_ps(s, _mm256_set1_ps(xd[m * nb + b])), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(y + m * N, acc[m]);
#else
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 8; ++r) {
      float out = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = wg + 128 * b;
        const int8_t* xb = xq + m * K + 32 * b;
        int32_t dot = 0;
        for (int c = 0; c < 4; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = p[32 * c + 4 * r + j];
            dot += int(byte & 15) * xb[4 * c + j] + int(byte >> 4) * xb[16 + 4 * c + j];
          }
        out += float(dot - xs8[m * nb + b]) * (f16_to_f32(sg[8 * b + r]) * xd[m * nb + b]);
      }
      y[m * N + r] = out;
    }
#endif
}

}  // namespace

torch::Tensor mm_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  int64_t ldx;
  auto xc = prep_x(x, K, ldx, true);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
#if defined(WMM_AVX2)
  run_avx2(M, N, xp, ldx, yp, [&](int64_t n, auto mr, const float* xm, float* ym) {
    tile_dense<decltype(mr)::value, DecBf16>(wp + n * K, 1.f, xm, ldx, K, ym, N);
  });
#else
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_bf16, mt, xp + m0 * ldx, ldx, K, wp + n * K, 1.f, yp + m0 * N + n, N);
  });
#endif
  return y;
}

torch::Tensor mm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, bool q8) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "scale: contiguous float32 [N]");
  const int64_t N = w.size(0), K = w.size(1);
  if (q8 && K % 32 == 0) {
    const Q8 a(x, K, false);
    const int64_t M = a.q.size(0);
    auto y = torch::empty({M, N}, a.d.options());
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    const int8_t* xq = a.q.data_ptr<int8_t>();
    const float* xd = a.d.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    run_tiles(M, N, [&](int64_t n, auto mr, int64_t m0) {
      tile_q8<decltype(mr)::value, true>(wp + n * K, nullptr, sp[n], xq + m0 * K, xd + m0 * (K / 32), nullptr,
                                         K, yp + m0 * N + n, N);
    });
    return y;
  }
  int64_t ldx;
  auto xc = prep_x(x, K, ldx, false);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(WMM_AVX2)
  run_avx2(M, N, xp, ldx, yp, [&](int64_t n, auto mr, const float* xm, float* ym) {
    tile_dense<decltype(mr)::value, DecInt8>(wp + n * K, sp[n], xm, ldx, K, ym, N);
  });
#else
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int8, mt, xp + m0 * ldx, ldx, K, wp + n * K, sp[n], yp + m0 * N + n, N);
  });
#endif
  return y;
}

torch::Tensor mm_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t G, bool q8) {
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "K must be a multiple of the group size, a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && scale.is_contiguous() && scale.numel() == N * (K / G),
              "scale: contiguous float16 [N, K/G]");
  if (q8) {
    const Q8 a(x, K, true);
    const int64_t M = a.q.size(0);
    auto y = torch::empty({M, N}, a.d.options());
    auto s32 = G == 32 ? scale : scale.view({N, K / G, 1}).expand({N, K / G, G / 32}).reshape({N, K / 32});
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(s32.data_ptr<at::Half>());
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const int8_t* xq = a.q.data_ptr<int8_t>();
    const float* xd = a.d.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    run_tiles(M, N, [&](int64_t n, auto mr, int64_t m0) {
      tile_q8<decltype(mr)::value, false>(wp + n * (K / 2), sp + n * (K / 32), 1.f, xq + m0 * K, xd + m0 * (K / 32),
                                          a.c.data_ptr<float>() + m0 * (K / 32), K, yp + m0 * N + n, N);
    });
    return y;
  }
  int64_t ldx;
  auto xc = prep_x(x, K, ldx, false);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#if defined(WMM_AVX2)
  // one scale per 32 values (a larger group repeats its scale: the same values)
  auto s32 = G == 32 ? scale : scale.view({N, K / G, 1}).expand({N, K / G, G / 32}).reshape({N, K / 32});
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s32.data_ptr<at::Half>());
  run_avx2(M, N, xp, ldx, yp, [&](int64_t n, auto mr, const float* xm, float* ym) {
    tile_int4<decltype(mr)::value>(wp + n * (K / 2), sp + n * (K / 32), xm, ldx, K, ym, N);
  });
#else
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int4, mt, xp + m0 * ldx, ldx, K, wp + n * (K / 2), sp + n * (K / G), G, yp + m0 * N + n, N);
  });
#endif
  return y;
}

// int4 weights in the x8 layout (N a multiple of 8; one float16 scale per 32 values, x8-ordered), int8 activations
torch::Tensor mm_int4x8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && w.size(0) % 8 == 0,
              "w: contiguous uint8 [N, K/2] in the x8 layout, N a multiple of 8");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && scale.scalar_type() == torch::kFloat16 && scale.is_contiguous() &&
              scale.numel() == N * (K / 32), "scale: contiguous float16, one per 32 values");
  const Q8 a(x, K, false);
  const int64_t M = a.q.size(0), nb = K / 32;
  auto y = torch::empty({M, N}, a.d.options());
  auto xs8 = torch::empty({M, nb}, a.d.options().dtype(torch::kInt32));
  const int8_t* xq = a.q.data_ptr<int8_t>();
  int32_t* s8 = xs8.data_ptr<int32_t>();
  for (int64_t i = 0; i < M * nb; ++i) {
    int32_t t = 0;
    for (int j = 0; j < 32; ++j) t += xq[32 * i + j];
    s8[i] = 8 * t;
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const float* xd = a.d.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 8, 2, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* wg = wp + g * 8 * (K / 2);
      const uint16_t* sg = sp + g * 8 * nb;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        float* ym = yp + m0 * N + 8 * g;
        const int8_t* xm = xq + m0 * K;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: tile_x8<1>(wg, sg, xm, xd + m0 * nb, s8 + m0 * nb, K, ym, N); break;
          case 2: tile_x8<2>(wg, sg, xm, xd + m0 * nb, s8 + m0 * nb, K, ym, N); break;
          case 3: tile_x8<3>(wg, sg, xm, xd + m0 * nb, s8 + m0 * nb, K, ym, N); break;
          default: tile_x8<4>(wg, sg, xm, xd + m0 * nb, s8 + m0 * nb, K, ym, N); break;
        }
      }
    }
  });
  return y;
}

std::string isa() {
#if defined(WMM_VNNI)
  return "avx512-vnni";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(WMM_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor expert_swiglu(torch::Tensor x, torch::Tensor gu, torch::Tensor gus, torch::Tensor dn,
                            torch::Tensor dns, int64_t kind, int64_t G, bool q8);
std::vector<torch::Tensor> route_topk(torch::Tensor x, torch::Tensor w, int64_t k, bool norm);
torch::Tensor combine_one(torch::Tensor y, torch::Tensor w);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm_bf16", &mm_bf16, "x[M,K] f32 . W[N,K] bf16 ^T");
  m.def("mm_int8", &mm_int8, "x[M,K] f32 . (W int8 * scale[N]) ^T; q8: x quantized to int8 in blocks of 32");
  m.def("mm_int4", &mm_int4, "x[M,K] f32 . ((W int4 - 8) * scale[N,K/G]) ^T; q8: x quantized as for mm_int8");
  m.def("mm_int4x8", &mm_int4x8, "x[M,K] f32 . int4 W[N,K] in the x8 layout ^T (int8 activations)");
  m.def("rms_norm", &rms_norm, "w * (x * rsqrt(mean(x^2, -1) + eps)), float32");
  m.def("rope", &rope, "x[N,H,Dh] * cos + rotate_half(x) * sin (sin signed), float32");
  m.def("expert_swiglu", &expert_swiglu, "down(silu(gu x)[:F] * (gu x)[F:]), packed weights of kind 0 bf16 1 int8 2 int4");
  m.def("route_topk", &route_topk, "softmax top-k router: (logits, ids, weights), as Router.forward");
  m.def("combine_one", &combine_one, "sum_i y[i] * w[i] in row order, [1, D] (one token's combine)");
  m.def("decode_attention", &decode_attention, "one query per sequence and head against a KV cache view (GQA)");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
}

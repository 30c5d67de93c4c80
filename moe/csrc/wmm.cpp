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
#include <cstring>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define WMM_AVX2 1
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

#if defined(WMM_AVX2)
// AVX2 + FMA (16 registers of 8 floats): a tile of NR weight rows x MR activation rows with NR * MR accumulators,
// so each decoded weight vector feeds MR rows and each activation vector NR weight rows. A weight decoder turns
// the S values of row ``p`` from k on into V vectors of 8 float32, each exactly the dequantized weight.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// bf16, 16 values as 8 32-bit lanes: "<< 16" gives the even-indexed values, "& 0xFFFF0000" the odd ones (exact);
// the activations are permuted to match (``prep_x`` with blocks of 16).
struct DecBf16 {
  static constexpr int S = 16, V = 2;
  const uint16_t* p;
  float scale = 1.f;
  __m256 w(int64_t k, int v) const {
    const __m256i r = _mm256_loadu_si256((const __m256i*)(p + k));
    return _mm256_castsi256_ps(v == 0 ? _mm256_slli_epi32(r, 16)
                                      : _mm256_and_si256(r, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
  }
  const void* at(int64_t k) const { return p + k; }
  float tail(int64_t k) const { return bf16_to_f32(p[k]); }
};

// int8 per channel: the sum of q * x, times the row's scale at the end.
struct DecInt8 {
  static constexpr int S = 8, V = 1;
  const int8_t* p;
  float scale;
  __m256 w(int64_t k, int) const {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + k))));
  }
  const void* at(int64_t k) const { return p + k; }
  float tail(int64_t k) const { return float(p[k]); }
};

// int4, groups of 32 (16 bytes: value j in the low nibble of byte j, value j + 16 in its high nibble), a float16
// scale per group: (q - 8) * s as fma(q, s, -8 s), exact (a 4-bit integer times an 11-bit significand).
struct DecInt4 {
  static constexpr int S = 32, V = 4;
  const uint8_t* p;
  const uint16_t* s;
  float scale = 1.f;
  __m256 w(int64_t k, int v) const {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + k / 2 + (v & 1) * 8)));
    const __m256i q = v < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4);
    const float sc = _cvtsh_ss(s[k / 32]);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(sc), _mm256_set1_ps(-8.f * sc));
  }
  const void* at(int64_t k) const { return p + k / 2; }
  float tail(int64_t) const { return 0.f; }     // K is a multiple of 32
};

// y[m * N + r] = scale_r * sum_k W_r[k] x[m * ldx + k] for r < NR, m < MR; each of the NR weight streams is
// prefetched 1 KiB ahead (the loops over r, m and v are unrolled completely, so the accumulators stay in registers)
template <int NR, int MR, class D>
void tile(const D* dp, const float* x, int64_t ldx, int64_t K, float* y, int64_t N) {
  D d[NR];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) d[r] = dp[r];
  __m256 acc[NR][MR];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + D::S <= K; k += D::S) {
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)d[r].at(k) + 1024, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int v = 0; v < D::V; ++v) {
      __m256 wv[NR];
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) wv[r] = d[r].w(k, v);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k + 8 * v);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
  }
  float out[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r][m] = hsum(acc[r][m]);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      for (int64_t kk = k; kk < K; ++kk) out[r][m] += d[r].tail(kk) * x[m * ldx + kk];
      y[m * N + r] = out[r][m] * d[r].scale;
    }
}

template <int NR, class D>
void tiles(const D* d, int64_t M, const float* x, int64_t ldx, int64_t K, float* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * ldx;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: tile<NR, 1>(d, xm, ldx, K, ym, N); break;
      case 2: tile<NR, 2>(d, xm, ldx, K, ym, N); break;
      case 3: tile<NR, 3>(d, xm, ldx, K, ym, N); break;
      default: tile<NR, 4>(d, xm, ldx, K, ym, N); break;
    }
  }
}

// One weight row at a time (NR = 1: a single sequential weight stream; interleaving 3-4 rows' streams, NR = 3-4,
// measured 1.2-2x slower on the AVX2 host at 1 and 4 activation rows), the activation rows in tiles of 4.
template <class MakeDec>
void run_avx2(int64_t M, int64_t N, const float* x, int64_t ldx, int64_t K, float* y, MakeDec dec) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const decltype(dec(0)) d[1] = {dec(n)};
      tiles<1>(d, M, x, ldx, K, y + n, N);
    }
  });
}
#endif

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
  run_avx2(M, N, xp, ldx, K, yp, [&](int64_t n) { return DecBf16{wp + n * K}; });
#else
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_bf16, mt, xp + m0 * ldx, ldx, K, wp + n * K, 1.f, yp + m0 * N + n, N);
  });
#endif
  return y;
}

torch::Tensor mm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "scale: contiguous float32 [N]");
  const int64_t N = w.size(0), K = w.size(1);
  int64_t ldx;
  auto xc = prep_x(x, K, ldx, false);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(WMM_AVX2)
  run_avx2(M, N, xp, ldx, K, yp, [&](int64_t n) { return DecInt8{wp + n * K, sp[n]}; });
#else
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int8, mt, xp + m0 * ldx, ldx, K, wp + n * K, sp[n], yp + m0 * N + n, N);
  });
#endif
  return y;
}

torch::Tensor mm_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t G) {
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "K must be a multiple of the group size, a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && scale.is_contiguous() && scale.numel() == N * (K / G),
              "scale: contiguous float16 [N, K/G]");
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
  run_avx2(M, N, xp, ldx, K, yp, [&](int64_t n) { return DecInt4{wp + n * (K / 2), sp + n * (K / 32)}; });
#else
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int4, mt, xp + m0 * ldx, ldx, K, wp + n * (K / 2), sp + n * (K / G), G, yp + m0 * N + n, N);
  });
#endif
  return y;
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(WMM_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm_bf16", &mm_bf16, "x[M,K] f32 . W[N,K] bf16 ^T");
  m.def("mm_int8", &mm_int8, "x[M,K] f32 . (W int8 * scale[N]) ^T");
  m.def("mm_int4", &mm_int4, "x[M,K] f32 . ((W int4 - 8) * scale[N,K/G]) ^T");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
}

// Weight-only matrix products for CPU decode: y[M, N] = x[M, K] (float32) . W[N, K]^T, W stored as
//   bf16                     (exact bf16 -> fp32 conversion),
//   int8 per output channel  (W = q * scale[n]),
//   int4 group-wise          (W = (q - 8) * scale[n, g], groups of G consecutive k; 16 bytes per group of 32 hold
//                             element j in the low nibble of byte j and element j + 16 in its high nibble).
// Accumulation is float32, so each kernel computes what "dequantize to float32, then matmul" computes, up to the
// order of the additions. Decode is memory-bound: the weights stream once per call while a few activation rows
// stay in L1. AVX-512 intrinsics where the compiler targets it (-march=native), plain loops otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Rows of W are read one after the other (one sequential stream the hardware prefetcher follows, plus a software
// prefetch ahead); a tile of up to MT activation rows is multiplied by each weight row while it is in L1.
constexpr int MT = 8;

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
// exact). The activations were permuted to match (``even_odd``): in every full block of 32, the 16 even-indexed
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
  for (; k + 32 <= K; k += 32)
    for (int i = 0; i < mt; ++i)
      for (int j = 0; j < 16; ++j)
        out[i] += bf16_to_f32(wr[k + 2 * j]) * x[i * ldx + k + j] + bf16_to_f32(wr[k + 2 * j + 1]) * x[i * ldx + k + 16 + j];
#endif
  for (int i = 0; i < mt; ++i) {
    float s = out[i];
    for (int64_t kk = k; kk < K; ++kk) s += bf16_to_f32(wr[kk]) * x[i * ldx + kk];
    y[i * N] = s;
  }
}

// x [M, K] -> [M, ldx] with each full block of 32 as (even-indexed values, odd-indexed values); the tail as is.
torch::Tensor even_odd(const torch::Tensor& xc, int64_t K, int64_t& ldx) {
  const int64_t M = xc.size(0), K32 = K / 32 * 32;
  ldx = (M > 1 && (K * 4) % 4096 == 0) ? K + 16 : K;
  auto p = torch::empty({M, ldx}, xc.options());
  if (K32)
    p.narrow(1, 0, K32).view({M, K32 / 32, 2, 16}).copy_(
        xc.narrow(1, 0, K32).reshape({M, K32 / 32, 16, 2}).transpose(2, 3));
  if (K > K32) p.narrow(1, K32, K - K32).copy_(xc.narrow(1, K32, K - K32));
  return p;
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
torch::Tensor check_x(const torch::Tensor& x, int64_t K, int64_t& ldx) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  auto xc = x.to(torch::kFloat32).contiguous();
  ldx = K;
  if (xc.size(0) > 1 && (K * 4) % 4096 == 0) {
    ldx = K + 16;
    auto p = torch::empty({xc.size(0), ldx}, xc.options());
    p.narrow(1, 0, K).copy_(xc);
    return p;
  }
  return xc;
}

}  // namespace

torch::Tensor mm_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  int64_t ldx;
  auto xc = even_odd(x.to(torch::kFloat32).contiguous(), K, ldx);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_bf16, mt, xp + m0 * ldx, ldx, K, wp + n * K, 1.f, yp + m0 * N + n, N);
  });
  return y;
}

torch::Tensor mm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "scale: contiguous float32 [N]");
  const int64_t N = w.size(0), K = w.size(1);
  int64_t ldx;
  auto xc = check_x(x, K, ldx);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int8, mt, xp + m0 * ldx, ldx, K, wp + n * K, sp[n], yp + m0 * N + n, N);
  });
  return y;
}

torch::Tensor mm_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t G) {
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "K must be a multiple of the group size, a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && scale.is_contiguous() && scale.numel() == N * (K / G),
              "scale: contiguous float16 [N, K/G]");
  int64_t ldx;
  auto xc = check_x(x, K, ldx);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  run_rows(M, N, [&](int64_t n, int64_t m0, int mt) {
    DISPATCH_MT(row_int4, mt, xp + m0 * ldx, ldx, K, wp + n * (K / 2), sp + n * (K / G), G, yp + m0 * N + n, N);
  });
  return y;
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2-autovec";
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

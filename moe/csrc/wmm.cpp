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

constexpr int NR = 4;   // weight rows per block
constexpr int MT = 4;   // activation rows per tile

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float f16_to_f32(uint16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

#if defined(__AVX512F__)
inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#endif

// Rows n0..n0+nr of the bf16 / int8 weight against activation rows m0..m0+mt.
template <typename W, int nr, int mt>
void block_dense_t(const float* x, int64_t ldx, int64_t K, const W* w, int64_t n0, int64_t m0, int64_t N,
                   const float* scale, float* y) {
#if defined(__AVX512F__)
  __m512 acc[nr][mt];
  for (int r = 0; r < nr; ++r) for (int i = 0; i < mt; ++i) acc[r][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[mt];
    for (int i = 0; i < mt; ++i) xv[i] = _mm512_loadu_ps(x + (m0 + i) * ldx + k);
    for (int r = 0; r < nr; ++r) {
      __m512 wv;
      if constexpr (std::is_same_v<W, uint16_t>) wv = load_bf16(w + (n0 + r) * K + k);
      else wv = load_i8(w + (n0 + r) * K + k);
      for (int i = 0; i < mt; ++i) acc[r][i] = _mm512_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int i = 0; i < mt; ++i) {
      float s = _mm512_reduce_add_ps(acc[r][i]);
      for (int64_t kk = k; kk < K; ++kk) {
        float wv;
        if constexpr (std::is_same_v<W, uint16_t>) wv = bf16_to_f32(w[(n0 + r) * K + kk]);
        else wv = float(w[(n0 + r) * K + kk]);
        s += wv * x[(m0 + i) * ldx + kk];
      }
      y[(m0 + i) * N + n0 + r] = scale ? s * scale[n0 + r] : s;
    }
#else
  for (int r = 0; r < nr; ++r)
    for (int i = 0; i < mt; ++i) {
      const float* xr = x + (m0 + i) * ldx;
      const W* wr = w + (n0 + r) * K;
      float s = 0.f;
      for (int64_t kk = 0; kk < K; ++kk) {
        float wv;
        if constexpr (std::is_same_v<W, uint16_t>) wv = bf16_to_f32(wr[kk]);
        else wv = float(wr[kk]);
        s += wv * xr[kk];
      }
      y[(m0 + i) * N + n0 + r] = scale ? s * scale[n0 + r] : s;
    }
#endif
}

template <int nr, int mt>
void block_int4_t(const float* x, int64_t ldx, int64_t K, const uint8_t* w, const uint16_t* sc, int64_t G, int64_t n0,
                  int64_t m0, int64_t N, float* y) {
  const int64_t ng = K / G, rowb = K / 2;
#if defined(__AVX512F__)
  if (G % 32 == 0) {
    __m512 acc[nr][mt];
    for (int r = 0; r < nr; ++r) for (int i = 0; i < mt; ++i) acc[r][i] = _mm512_setzero_ps();
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < ng; ++g) {
      for (int64_t j = 0; j < G; j += 32) {
        const int64_t k = g * G + j;
        __m512 xl[mt], xh[mt];
        for (int i = 0; i < mt; ++i) {
          xl[i] = _mm512_loadu_ps(x + (m0 + i) * ldx + k);
          xh[i] = _mm512_loadu_ps(x + (m0 + i) * ldx + k + 16);
        }
        for (int r = 0; r < nr; ++r) {
          const float s = f16_to_f32(sc[(n0 + r) * ng + g]);
          const __m512 sv = _mm512_set1_ps(s), m8 = _mm512_set1_ps(-8.f * s);
          __m128i b = _mm_loadu_si128((const __m128i*)(w + (n0 + r) * rowb + k / 2));
          __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, lo4)));
          __m512 wh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lo4)));
          wl = _mm512_fmadd_ps(wl, sv, m8);   // (q - 8) * s, rounded once
          wh = _mm512_fmadd_ps(wh, sv, m8);
          for (int i = 0; i < mt; ++i) {
            acc[r][i] = _mm512_fmadd_ps(wl, xl[i], acc[r][i]);
            acc[r][i] = _mm512_fmadd_ps(wh, xh[i], acc[r][i]);
          }
        }
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int i = 0; i < mt; ++i) y[(m0 + i) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][i]);
    return;
  }
#endif
  for (int r = 0; r < nr; ++r)
    for (int i = 0; i < mt; ++i) {
      const float* xr = x + (m0 + i) * ldx;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / G, j = k % G, blk = j / 32, e = j % 32;
        const uint8_t byte = w[(n0 + r) * rowb + (g * G + blk * 32) / 2 + (e % 16)];
        const int q = e < 16 ? (byte & 15) : (byte >> 4);
        const float sc_ = f16_to_f32(sc[(n0 + r) * ng + g]);
        s += std::fma(float(q), sc_, -8.f * sc_) * xr[k];
      }
      y[(m0 + i) * N + n0 + r] = s;
    }
}

#define DISPATCH(FN, ...)                                                                    \
  switch (nr * 8 + mt) {                                                                   \
    case 8 + 1: FN<1, 1>(__VA_ARGS__); break; case 8 + 2: FN<1, 2>(__VA_ARGS__); break;    \
    case 8 + 3: FN<1, 3>(__VA_ARGS__); break; case 8 + 4: FN<1, 4>(__VA_ARGS__); break;    \
    case 16 + 1: FN<2, 1>(__VA_ARGS__); break; case 16 + 2: FN<2, 2>(__VA_ARGS__); break;  \
    case 16 + 3: FN<2, 3>(__VA_ARGS__); break; case 16 + 4: FN<2, 4>(__VA_ARGS__); break;  \
    case 24 + 1: FN<3, 1>(__VA_ARGS__); break; case 24 + 2: FN<3, 2>(__VA_ARGS__); break;  \
    case 24 + 3: FN<3, 3>(__VA_ARGS__); break; case 24 + 4: FN<3, 4>(__VA_ARGS__); break;  \
    case 32 + 1: FN<4, 1>(__VA_ARGS__); break; case 32 + 2: FN<4, 2>(__VA_ARGS__); break;  \
    case 32 + 3: FN<4, 3>(__VA_ARGS__); break; default: FN<4, 4>(__VA_ARGS__); break;     \
  }

template <int nr, int mt> void bf16_t(const float* x, int64_t ldx, int64_t K, const uint16_t* w, int64_t n0,
                                      int64_t m0, int64_t N, const float* s, float* y) {
  block_dense_t<uint16_t, nr, mt>(x, ldx, K, w, n0, m0, N, s, y);
}
template <int nr, int mt> void int8_t_(const float* x, int64_t ldx, int64_t K, const int8_t* w, int64_t n0,
                                       int64_t m0, int64_t N, const float* s, float* y) {
  block_dense_t<int8_t, nr, mt>(x, ldx, K, w, n0, m0, N, s, y);
}

template <typename F>
void run_blocks(int64_t M, int64_t N, F&& f) {
  const int64_t nb = (N + NR - 1) / NR;
  at::parallel_for(0, nb, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NR;
      const int nr = int(std::min<int64_t>(NR, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += MT) f(n0, nr, m0, int(std::min<int64_t>(MT, M - m0)));
    }
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
  int64_t ldx;
  auto xc = check_x(x, K, ldx);
  const int64_t M = xc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  run_blocks(M, N, [&](int64_t n0, int nr, int64_t m0, int mt) {
    DISPATCH(bf16_t, xp, ldx, K, wp, n0, m0, N, nullptr, yp);
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
  run_blocks(M, N, [&](int64_t n0, int nr, int64_t m0, int mt) {
    DISPATCH(int8_t_, xp, ldx, K, wp, n0, m0, N, sp, yp);
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
  run_blocks(M, N, [&](int64_t n0, int nr, int64_t m0, int mt) {
    DISPATCH(block_int4_t, xp, ldx, K, wp, sp, G, n0, m0, N, yp);
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

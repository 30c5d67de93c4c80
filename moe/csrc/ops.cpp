// Fused small operations of a CPU decode step (float32), built into the same module as wmm.cpp.
//
// At batch 1 a decode step spends as long in the ~80 small torch ops per layer as in its weight products: each
// eager op costs 1-5 us of dispatch here, more than its arithmetic. These functions do in one call what the model
// does in several, with the same arithmetic (the same roundings, in the same order, except where a sum's order is
// noted), so a model gives the same tokens with and without them:
//   rms_norm        w * (x * rsqrt(mean(x^2) + eps))                          (7 ops; the sum's order differs)
//   rope            x * cos + rotate_half(x) * sin_signed                    (5 ops)
//   expert_swiglu   down(silu(gate_up(x)[:F]) * gate_up(x)[F:]) on packed weights (2 products + 6 ops)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// a * b + c as two roundings, as torch's separate ops round: no fused multiply-add contracted by the compiler
#pragma GCC optimize("fp-contract=off")

torch::Tensor mm_bf16(torch::Tensor x, torch::Tensor w);
torch::Tensor mm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, bool q8);
torch::Tensor mm_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t G, bool q8);
torch::Tensor mm_int4x8(torch::Tensor x, torch::Tensor w, torch::Tensor scale);

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": a float32 CPU tensor");
}

// kind: 0 bf16, 1 int8, 2 int4 (group G), 3 int4 in the x8 layout (int8 activations)
torch::Tensor mm_kind(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s, int64_t kind,
                      int64_t G, bool q8) {
  if (kind == 0) return mm_bf16(x, w);
  if (kind == 1) return mm_int8(x, w, s, q8);
  if (kind == 3) return mm_int4x8(x, w, s);
  return mm_int4(x, w, s, G, q8);
}

}  // namespace

// x [..., D] float32, w [D] float32 -> [..., D]
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t D = w.numel();
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == D, "rms_norm: x [..., ", D, "], w [", D, "]");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t R = D ? xc.numel() / D : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.contiguous().data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = float(eps);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * D;
      float* o = yp + r * D;
      float part[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= D; k += 16)
        for (int j = 0; j < 16; ++j) part[j] += a[k + j] * a[k + j];
      float ss = 0.f;
      for (; k < D; ++k) ss += a[k] * a[k];
      for (int j = 0; j < 16; ++j) ss += part[j];
      const float inv = 1.f / std::sqrt(ss / float(D) + e);
      for (int64_t i = 0; i < D; ++i) o[i] = wp[i] * (a[i] * inv);
    }
  });
  return y;
}

// x [N, H, Dh] float32 (last dim contiguous, heads Dh apart, any row stride); cos, sin [N, 1, Dh] contiguous
// (sin with the rotation's minus sign in its first half) -> contiguous [N, H, Dh]
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rope: x [N, H, Dh], rows of heads");
  const int64_t N = x.size(0), H = x.size(1), Dh = x.size(2), h = Dh / 2;
  TORCH_CHECK(Dh % 2 == 0 && cos.numel() == N * Dh && sin.numel() == N * Dh && cos.is_contiguous() &&
              sin.is_contiguous(), "rope: cos, sin [N, 1, ", Dh, "] contiguous");
  auto y = torch::empty({N, H, Dh}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* c = cp + n * Dh;
      const float* s = sp + n * Dh;
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* a = xp + n * ld + hh * Dh;
        float* o = yp + (n * H + hh) * Dh;
        for (int64_t j = 0; j < h; ++j) {
          const float p = a[j] * c[j], q = a[j + h] * s[j];
          o[j] = p + q;
        }
        for (int64_t j = h; j < Dh; ++j) {
          const float p = a[j] * c[j], q = a[j - h] * s[j];
          o[j] = p + q;
        }
      }
    }
  });
  return y;
}

// One SwiGLU expert on packed weights (no biases): gate_up [2F, D], down [D, F] of ``kind``; float32 [M, D]
torch::Tensor expert_swiglu(torch::Tensor x, torch::Tensor gu, torch::Tensor gus, torch::Tensor dn,
                            torch::Tensor dns, int64_t kind, int64_t G, bool q8) {
  auto hgu = mm_kind(x, gu, gus, kind, G, q8);
  const int64_t F = hgu.size(1) / 2;
  auto a = at::silu(hgu.narrow(1, 0, F));
  a.mul_(hgu.narrow(1, F, F));
  return mm_kind(a, dn, dns, kind, G, q8);
}

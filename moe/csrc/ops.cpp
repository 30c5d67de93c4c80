// Fused small operations of a CPU decode step (float32), built into the same module as wmm.cpp.
//
// At batch 1 a decode step spends as long in the ~80 small torch ops per layer as in its weight products: each
// eager op costs 1-5 us of dispatch here, more than its arithmetic. These functions do in one call what the model
// does in several, with the same arithmetic (the same roundings, in the same order, except where a sum's order is
// noted), so a model gives the same tokens with and without them:
//   rms_norm        w * (x * rsqrt(mean(x^2) + eps))                          (7 ops; the sum's order differs)
//   rope            x * cos + rotate_half(x) * sin_signed                    (5 ops)
//   expert_swiglu   down(silu(gate_up(x)[:F]) * gate_up(x)[F:]) on packed weights (2 products + 6 ops)
//   route_topk      the softmax top-k router's ATen ops called from C++                  (6 ops)
//   combine_one     one token's weighted sum of its experts' outputs, in row order       (3 ops)
//   decode_attention  one query per sequence against its cached keys and values (GQA)  (the sums' order differs)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

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

// sum_k a[k] b[k] in 16 partial sums (which the compiler vectorizes), then the tail, then the partial sums
inline float dot16(const float* a, const float* b, int64_t n) {
  float part[16] = {0};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[k + j] * b[k + j];
  float s = 0.f;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < 16; ++j) s += part[j];
  return s;
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
      const float inv = 1.f / std::sqrt(dot16(a, a, D) / float(D) + e);
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

// The softmax top-k router: (logits [N, E], ids [N, k], weights [N, k]) as Router.forward computes them (the same
// ATen ops, called from C++: bit-identical, without the Python dispatch of each)
std::vector<torch::Tensor> route_topk(torch::Tensor x, torch::Tensor w, int64_t k, bool norm) {
  auto logits = at::linear(x, w);
  auto probs = at::softmax(logits.to(torch::kFloat32), -1);
  auto top = at::topk(probs, k, -1);
  auto wk = std::get<0>(top);
  if (norm) wk = wk / wk.sum(-1, true);
  return {logits, std::get<1>(top), wk.to(x.scalar_type())};
}

// One token's K expert outputs y [K, D] weighted by w [K] and summed in row order -> [1, D]: what LocalDispatcher's
// combine computes for one token (y * w, then index_add into zeros: 0 + p0 + p1 + ...), bit for bit
torch::Tensor combine_one(torch::Tensor y, torch::Tensor w) {
  check_f32(y, "y");
  check_f32(w, "w");
  TORCH_CHECK(y.dim() == 2 && w.numel() == y.size(0), "combine_one: y [K, D], w [K]");
  auto yc = y.contiguous();
  auto wc = w.contiguous();
  const int64_t K = yc.size(0), D = yc.size(1);
  auto out = torch::zeros({1, D}, yc.options());
  const float* yp = yc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < K; ++i) {
    const float s = wp[i];
    for (int64_t d = 0; d < D; ++d) {
      const float p = yp[i * D + d] * s;
      o[d] = o[d] + p;
    }
  }
  return out;
}

// Decode attention, one query per sequence and head: q [B, H, 1, Dh], k and v [B, Hkv, T, Dh] (any strides, last
// dim contiguous: views of the KV cache), mask [B, 1, 1, T] bool or empty (all visible) -> [B, H, 1, Dh]. Query head
// h reads KV head h / (H / Hkv), as scaled_dot_product_attention(enable_gqa=True) does; softmax(scale q.k) then
// the weighted sum of v, in float32 (the sums' order differs from torch's).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1 && k.size(3) == q.size(3) &&
              v.sizes() == k.sizes() && k.size(0) == q.size(0) && q.size(1) % k.size(1) == 0 &&
              k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: q [B, H, 1, Dh], k, v [B, Hkv, T, Dh]");
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), T = k.size(2), Dh = q.size(3), r = H / Hkv;
  const bool masked = mask.numel() > 0;
  torch::Tensor mc;
  if (masked) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.numel() == B * T, "decode_attention: mask [B, 1, 1, T]");
    mc = mask.contiguous();
  }
  auto qc = q.contiguous();
  auto out = torch::empty({B, H, 1, Dh}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = masked ? mc.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = float(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / r;
      const float* qv = qp + i * Dh;
      float mx = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        if (mp != nullptr && !mp[b * T + t]) { s[t] = -INFINITY; continue; }
        const float* kt = kp + b * k.stride(0) + g * k.stride(1) + t * k.stride(2);
        s[t] = dot16(qv, kt, Dh) * sc;
        mx = std::max(mx, s[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        s[t] = s[t] == -INFINITY ? 0.f : std::exp(s[t] - mx);
        sum += s[t];
      }
      float* o = op + i * Dh;
      for (int64_t d = 0; d < Dh; ++d) o[d] = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        const float p = s[t] / sum;
        if (p == 0.f) continue;
        const float* vt = vp + b * v.stride(0) + g * v.stride(1) + t * v.stride(2);
        for (int64_t d = 0; d < Dh; ++d) o[d] += p * vt[d];
      }
    }
  });
  return out;
}

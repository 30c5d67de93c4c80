"""Weight-only kernels and the compute plan (moe/compute.py), thread choice (runtime/threads.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moeyard.moe import compute as C
from moeyard.moe.errors import ModelError, MoeyardError
from moeyard.runtime import threads as T


def _ref(x, p):
    y = x.float() @ p.dequantize().T
    return y if p.bias is None else y + p.bias


def _pack(w, kind, b=None):
    """``int4x8``: int4 repacked in groups of 8 rows (``interleave8``; rows stay as they are when N % 8 != 0)."""
    if kind != "int4x8":
        return C.pack(w, kind, "w", b)
    p = C.interleave8(C.pack(w, "int4", "w", b))
    assert p.layout == ("x8" if w.shape[0] % 8 == 0 else "rows")
    if p.layout == "x8":       # the same matrix, the same bytes reordered
        plain = C.pack(w, "int4", "w", b)
        assert torch.equal(p.rows().data, plain.data) and torch.equal(p.rows().scale, plain.scale)
        assert p.nbytes == plain.nbytes
    return p


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int4x8"])
@pytest.mark.parametrize("N,K", [(37, 64), (130, 1024), (8, 96), (5, 1088), (3, 1056), (64, 1056), (24, 2816)])
def test_kernel_matches_dequantize_then_matmul(kind, N, K):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    p = _pack(w, kind, b)
    assert C.native() is not None, C.native_status()
    for M in (1, 2, 3, 4, 7, 16, 40):       # 40 rows: the prefill path (dequantize + torch)
        x = torch.randn(M, K, generator=g)
        y, r = C.matmul(x, p), _ref(x, p)
        assert y.shape == (M, N) and y.dtype == torch.float32
        if kind != "bf16" and M <= C.KERNEL_MAX_ROWS:
            # int8 activations in blocks of 32: what reference_q8 computes, and within the activation rounding of
            # the float32 product
            assert float((y - r).norm() / r.norm()) < 0.02
            r = C.reference_q8(x, p)
        torch.testing.assert_close(y, r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))


@pytest.mark.parametrize("kind", ["int8", "int4", "int4x8"])
def test_float_activations_on_request(kind, monkeypatch):
    """MOEYARD_ACTIVATIONS=float32: weight-only, what dequantize-then-matmul computes."""
    monkeypatch.setenv("MOEYARD_ACTIVATIONS", "float32")
    monkeypatch.setattr(C, "_ACT_Q8", None)     # read again from the environment (restored after the test)
    assert not C.act_q8()
    g = torch.Generator().manual_seed(5)
    p = _pack(torch.randn(40, 1024, generator=g) * 0.05, kind)
    for M in (1, 2, 4):
        x = torch.randn(M, 1024, generator=g)
        r = _ref(x, p)
        torch.testing.assert_close(C.matmul(x, p), r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))


def test_unknown_activations_value_fails_at_plan(monkeypatch):
    monkeypatch.setenv("MOEYARD_ACTIVATIONS", "fp32")
    with pytest.raises(ModelError, match=r"MOEYARD_ACTIVATIONS='fp32' is not valid; valid: int8, float32"):
        C.plan_for(None, torch.float32, torch.device("cpu"), "int8")


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int4x8"])
def test_arena_placed_weights_compute_the_same(kind, monkeypatch):
    """Weights copied into a huge-page arena (views of one mapping) give bit-identical products, on the
    int8-activation kernels and the float-activation ones."""
    g = torch.Generator().manual_seed(11)
    p = _pack(torch.randn(72 if kind == "int4x8" else 70, 1088, generator=g) * 0.05, kind)
    arena = C.Arena(C.Arena.packed_size(p) + C.Arena.packed_size(p))
    a = arena.packed(p)
    assert a.data.data_ptr() % C.HUGE_PAGE == 0 and a.data.is_contiguous()
    torch.testing.assert_close(a.dequantize(), p.dequantize(), rtol=0, atol=0)
    for M in (1, 3, 16, 20):
        x = torch.randn(M, 1088, generator=g)
        torch.testing.assert_close(C.matmul(x, a), C.matmul(x, p), rtol=0, atol=0)
        if kind != "bf16":
            torch.testing.assert_close(C.reference_q8(x, a), C.reference_q8(x, p), rtol=0, atol=0)
    monkeypatch.setattr(C, "_ACT_Q8", False)      # the float-activation kernels
    x = torch.randn(2, 1088, generator=g)
    torch.testing.assert_close(C.matmul(x, a), C.matmul(x, p), rtol=0, atol=0)


def test_q8_reference_quantizes_blocks_exactly():
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-2, 2, 32)
    x[1, 40] = 0.5                       # a block of zeros keeps scale 0 and values 0
    q, d = C.quantize_q8(x)
    assert q.abs().max() == 127 and float(d[0, 0]) == pytest.approx(2 / 127) and float(d[1, 0]) == 0.0
    assert torch.allclose(q * d.repeat_interleave(32, 1), x, atol=float(d.max()) / 2 + 1e-7)


def test_kernel_tail_columns_bf16_int8():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 1000, generator=g)         # K not a multiple of 16: the scalar tail
    for kind in ("bf16", "int8"):
        p = C.pack(w, kind, "w")
        x = torch.randn(2, 1000, generator=g)
        torch.testing.assert_close(C.matmul(x, p), _ref(x, p), rtol=2e-5, atol=1e-3)


def test_kernel_remainder_blocks_bf16_int8():
    # K = 1008: past the last full block, bf16 has one block of 16 left and int8 six vectors of 8; at 3-4 rows the
    # kernel keeps a single accumulator per row
    g = torch.Generator().manual_seed(3)
    w = torch.randn(11, 1008, generator=g) * 0.05
    for kind in ("bf16", "int8"):
        p = C.pack(w, kind, "w")
        for M in (1, 2, 3, 4):
            x = torch.randn(M, 1008, generator=g)
            r = _ref(x, p)
            torch.testing.assert_close(C.matmul(x, p), r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))


def test_packing_error_and_accuracy():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    assert torch.equal(C.pack(w, "bf16", "w").dequantize(), w.bfloat16().float())
    e8 = (C.pack(w, "int8", "w").dequantize() - w).norm() / w.norm()
    e4 = (C.pack(w, "int4", "w").dequantize() - w).norm() / w.norm()
    assert e8 < 0.01 and e4 < 0.12 and e8 < e4
    q = C.unpack_int4(C.pack(w, "int4", "w").data, 256)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    with pytest.raises(ModelError, match=r"model\.layers\.3\.mlp\.experts\.1\.down.*multiple of the group size 32"):
        C.pack(torch.randn(8, 48), "int4", "model.layers.3.mlp.experts.1.down")


def test_torch_fallback_equals_reference(monkeypatch):
    monkeypatch.setenv("MOEYARD_KERNEL", "torch")
    monkeypatch.setattr(C, "_KERNEL_OFF", True)       # as a plan made now reads it (restored after the test)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g)
    for kind in ("bf16", "int8", "int4"):
        p = C.pack(w, kind, "w")
        x = torch.randn(2, 64, generator=g)
        torch.testing.assert_close(C.matmul(x, p), _ref(x, p), rtol=1e-6, atol=1e-6)


def test_unknown_quantization_names_the_valid_ones():
    from moeyard.runtime import LLM
    with pytest.raises(ModelError, match=r"unknown quantization 'int3'; valid: int8, int4"):
        LLM("default", quantization="int3")
    r = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", "generate", "--prompt", "x", "--quantization",
                        "fp4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown quantization 'fp4'")
    assert "Traceback" not in r.stderr


def test_int4_refuses_an_expert_shape_at_load(tiny_ckpt):
    from moeyard.runtime import LLM
    path, _ = tiny_ckpt("qwen2_moe")                  # moe_intermediate_size 48: down has 48 inputs
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.experts\.0\.down.*int4.*group size 32"):
        LLM(path, quantization="int4", max_model_len=64)
    llm = LLM(path, quantization="int8", max_model_len=64)      # int8 holds any shape
    try:
        out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=None)[0]
        assert out.finish_reason in ("stop", "length") and out.token_ids
    finally:
        llm.close()


@pytest.fixture(scope="module")
def prompts():
    return [[(11 * i + 7 * j) % 4000 + 5 for j in range(12)] for i in range(6)]


def _gen(prompts, **kw):
    from moeyard.runtime import LLM, SamplingParams
    llm = LLM("default", max_num_seqs=8, max_model_len=128, **kw)
    try:
        outs = llm.generate(prompt_token_ids=prompts,
                            sampling_params=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs], llm.stats()
    finally:
        llm.close()


def test_plans_on_the_default_model(prompts, monkeypatch):
    """bf16 storage with float32 arithmetic gives the float32 plan's greedy tokens; int8 and int4 stay close; the
    plan is reported in stats()."""
    base, st0 = _gen(prompts, threads=1)
    monkeypatch.setenv("MOEYARD_KERNEL", "torch")
    ref, st_ref = _gen(prompts, threads=1)
    monkeypatch.delenv("MOEYARD_KERNEL")
    assert st_ref["compute_experts"] == "float32" and st_ref["compute_kernel"] == "torch"
    assert st0["compute_experts"] == "bf16" and st0["compute_kernel"].startswith("native")
    assert st0["threads"] == 1 and st0["threads_reason"] == "asked for"
    assert base == ref
    for q, min_agree in (("int8", 0.6), ("int4", 0.3)):
        toks, st = _gen(prompts, threads=1, quantization=q)
        assert st["compute_experts"] == q and st["compute_dense"] == q
        agree = sum(a == b for x, y in zip(toks, ref) for a, b in zip(x, y)) / sum(len(x) for x in ref)
        first = sum(x[0] == y[0] for x, y in zip(toks, ref)) / len(ref)
        assert agree >= min_agree and first >= 0.5, (q, agree, first)


def test_thread_choice(monkeypatch, tmp_path):
    assert T.choose_threads(3) == (3, "asked for")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(MoeyardError, match="threads must be a positive integer"):
            T.choose_threads(bad)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert T.choose_threads() == (1, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = T.available_cores()
    assert 1 <= n <= len(T.affinity_cpus()) and "affinity" in why
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setattr(T, "_read", lambda p: open(p).read().strip() if p.startswith(str(tmp_path)) and
                        __import__("os").path.exists(p) else None)
    assert T.cgroup_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_quota(str(tmp_path)) is None
    assert T.worker_threads(2, 4) == 1 and T.worker_threads(16, 4) == 4


def test_offload_quantized_needs_a_quantized_checkpoint():
    from moeyard.runtime import LLM
    with pytest.raises(ModelError, match=r"moeyard quantize SRC DST --quantization int4"):
        LLM("default", mode="offload", quantization="int4")


def test_plan_choice_rules():
    cpu = torch.device("cpu")
    assert C.plan_for("float32", torch.float32, cpu).experts == "float32"
    p = C.plan_for("bfloat16", torch.bfloat16, cpu)
    assert p.experts == "bfloat16" and not p.packs            # dtype asked for: torch's own kernels
    with pytest.raises(ModelError, match="needs float32 activations"):
        C.plan_for("bfloat16", torch.bfloat16, cpu, "int8")
    q = C.plan_for("bfloat16", torch.float32, cpu, "int4")
    assert (q.experts, q.dense, q.lm_head) == ("int4", "int4", "int8") and "int4" in q.describe()


# -- the fused small ops (moe/csrc/ops.cpp) -------------------------------------------------------------------------

def _ops():
    m = C.native()
    if m is None:
        pytest.skip(f"native kernel not built: {C.native_status()}")
    return m


def test_fused_ops_match_the_torch_ops():
    """rms_norm equals the model's torch ops up to the sum's order; rope exactly; expert_swiglu exactly the
    packed expert's torch path (same products, same silu and product)."""
    from moeyard.moe.experts import ExpertWeights, PackedExpert
    from moeyard.moe.layers import RMSNorm, Rotary
    m = _ops()
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96, generator=g)
    x = torch.randn(3, 5, 96, generator=g)
    with torch.no_grad():
        ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(m.rms_norm(x, norm.weight.data, 1e-6), ref, rtol=2e-6, atol=1e-6)
    rot = Rotary(32, 10000.0, 64)
    y = torch.randn(4, 6 * 32 + 32, generator=g)[:, :6 * 32].view(4, 6, 32)     # a row-strided view, as from qkv
    pos = torch.tensor([0, 7, 8, 63])
    with torch.inference_mode():
        fast = rot(y, pos)
    slow = rot(y, pos)           # grad mode on: the torch ops
    assert torch.equal(fast, slow)
    w = ExpertWeights(torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g),
                      torch.randn(96, 64, generator=g))
    xs = torch.randn(3, 96, generator=g)
    for kind in ("bf16", "int8", "int4", "int4x8"):
        pe = PackedExpert.of(w, kind[:4], "e")
        pe = pe.interleaved() if kind == "int4x8" else pe
        with torch.inference_mode():
            fast = pe(xs)
        gate, up = C.matmul(xs, pe.gate_up).split(64, dim=-1)
        assert torch.equal(fast, C.matmul(torch.nn.functional.silu(gate) * up, pe.down)), kind


def test_fused_qkv_and_one_token_dispatch_change_nothing():
    """q, k, v packed as one matrix give the three products' values (and the three projections become views of
    it); the one-token dispatch routes and combines like the general one."""
    from moeyard.moe.dispatch import LocalDispatcher
    _ops()
    from moeyard.moe.layers import Attention
    g = torch.Generator().manual_seed(9)
    a = Attention.__new__(Attention)
    torch.nn.Module.__init__(a)
    ps = [C.pack(torch.randn(n, 64, generator=g), "int4", f"w{n}") for n in (64, 32, 32)]
    a.q_proj, a.k_proj, a.v_proj = (C.PackedLinear(p) for p in ps)
    x = torch.randn(2, 64, generator=g)
    before = [C.matmul(x, p) for p in ps]
    assert C.fuse_qkv(a) and a.qkv.shape == (128, 64)
    after = C.matmul(x, a.qkv).split([64, 32, 32], dim=-1)
    assert all(torch.equal(u, v) for u, v in zip(before, after))
    assert all(torch.equal(C.matmul(x, l.p), u) for l, u in zip((a.q_proj, a.k_proj, a.v_proj), before))
    d = LocalDispatcher()
    xs, ids, w = torch.randn(1, 8, generator=g), torch.tensor([[6, 1, 3]]), torch.tensor([[0.5, 0.3, 0.2]])
    one = d.dispatch(0, xs, ids, w)
    gen = d.dispatch(0, torch.cat([xs, xs]), torch.cat([ids, ids]), torch.cat([w, w]))
    assert one.expert_ids == [1, 3, 6] and one.counts == [1, 1, 1]
    assert torch.equal(one.x_MD, gen.x_MD[::2]) and torch.equal(one.meta.weight_M, gen.meta.weight_M[::2])
    y = torch.randn(3, 8, generator=g)
    assert torch.equal(d.combine(y, one.meta), d.combine(torch.stack([y[0], y[0], y[1], y[1], y[2], y[2]]),
                                                         gen.meta)[:1])


def test_fused_router_combine_and_decode_attention():
    """The router's fused call is bit-identical to its torch ops, the one-token combine to index_add's sum, and the
    decode attention matches SDPA (GQA, with and without a mask) to float32 rounding."""
    from moeyard.moe.dispatch import DispatchMeta, LocalDispatcher
    from moeyard.moe.model import Router
    m = _ops()
    g = torch.Generator().manual_seed(13)
    r = Router.__new__(Router)
    torch.nn.Module.__init__(r)
    r.weight = torch.nn.Parameter(torch.randn(16, 64, generator=g), requires_grad=False)
    x = torch.randn(3, 64, generator=g)
    for norm in (True, False):
        r.top_k, r.norm = 4, norm
        with torch.inference_mode():
            fast = r(x)
        slow = r(x)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    y, w = torch.randn(4, 64, generator=g), torch.rand(4, generator=g)
    meta = DispatchMeta(torch.arange(4), torch.zeros(4, dtype=torch.long), w, 1)
    with torch.inference_mode():
        fast = LocalDispatcher().combine(y, meta)
    assert torch.equal(fast, LocalDispatcher().combine(y, meta))
    k, v = torch.randn(3, 40, 2, 64, generator=g), torch.randn(3, 40, 2, 64, generator=g)    # a cache [B, T, Hkv, Dh]
    q = torch.randn(3, 8, 1, 64, generator=g)
    mask = (torch.arange(40)[None] < torch.tensor([5, 40, 17])[:, None])[:, None, None, :]
    K, V = k.transpose(1, 2), v.transpose(1, 2)
    for mk in (mask, None):
        ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mk, scale=0.125, enable_gqa=True)
        out = m.decode_attention(q, K, V, torch.empty(0, dtype=torch.bool) if mk is None else mk, 0.125)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

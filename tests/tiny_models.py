"""Tiny random Hugging Face MoE checkpoints for tests (transformers is the test-only oracle)."""

from __future__ import annotations

import os

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
NEW_ARCHS = ("deepseek_v3", "gpt_oss")   # tests/test_archs_v3_oss.py
ARCHS_2026 = ("glm4_moe", "minimax_m2", "qwen3_next")   # tests/test_archs_2026.py

_DS_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
_OSS_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0,
             "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_config(arch: str, **over):
    import transformers as tf
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                               sliding_window=None)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                num_experts_per_tok=2, shared_expert_intermediate_size=80, norm_topk_prob=False,
                                decoder_sparse_step=1, mlp_only_layers=[1], use_sliding_window=False)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=48,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[])
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False)
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, intermediate_size=96,
            moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
            topk_group=2, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
            rope_parameters=dict(over.pop("rope_parameters", _DS_ROPE)))
    elif arch == "gpt_oss":
        cfg = tf.GptOssConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
            swiglu_limit=over.pop("swiglu_limit", 1.0),
            rope_parameters=dict(over.pop("rope_parameters", _OSS_ROPE)))
    elif arch == "glm4_moe":
        cfg = tf.Glm4MoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                               first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                               routed_scaling_factor=2.5, norm_topk_prob=True)
    elif arch == "minimax_m2":
        cfg = tf.MiniMaxM2Config(**_COMMON, head_dim=16, intermediate_size=32, num_local_experts=8,
                                 num_experts_per_tok=2, rotary_dim=8, bos_token_id=1, eos_token_id=2)
    elif arch == "qwen3_next":
        cfg = tf.Qwen3NextConfig(
            **{**_COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, mlp_only_layers=[2],
            layer_types=over.pop("layer_types", ["linear_attention", "full_attention", "linear_attention",
                                                 "full_attention"]))
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_hf(arch: str, seed: int = 0, **over):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = hf_config(arch, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves tiny weights: scale the routers up so routing is decisive and not a near-tie.
    g = torch.Generator().manual_seed(seed + 1)
    rnd = lambda t, std: t.copy_(torch.randn(t.shape, generator=g) * std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
                p.mul_(8.0)
            if arch == "gpt_oss" and (name.endswith("bias") or name.endswith("sinks")):
                # sinks, router/expert/attention biases start at zero or tiny: make them matter
                rnd(p, 1.0 if name.endswith("sinks") else 0.1)
            if arch in ARCHS_2026 and (name.endswith("norm.weight") or name.endswith("proj.bias")
                                       or name.endswith("dt_bias") or name.endswith("A_log")):
                # norms start at one (or zero: Qwen3-Next's 1 + w), biases at zero: perturb them so a wrong
                # (1 + w) or a dropped bias shows
                rnd(p, 0.1) if not name.endswith("norm.weight") else p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # used for the choice only, never the weights
                rnd(b, 0.05)
        if arch == "qwen3_next":
            for name, p in model.named_parameters():
                if name.endswith("conv1d.weight"):         # default init is small: make the conv matter
                    rnd(p, 0.5)
    return model.eval()


def save_hf(model, path: str, fused: bool = False, max_shard_size=None) -> str:
    os.makedirs(path, exist_ok=True)
    kw = {}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, save_original_format=not fused, **kw)
    return path


def assert_logits_match(path: str, hf, atol=2e-5, rtol=1e-4):
    """Our no-cache forward of two random 20-token sequences against transformers' logits."""
    from moeyard.moe.loader import load_model
    from moeyard.moe.model import ForwardBatch
    lm = load_model(path, device="cpu")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model(ids.reshape(-1), ForwardBatch.blocks(2, 20, "cpu")).view(2, 20, -1)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)

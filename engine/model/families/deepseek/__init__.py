"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (``mla``), the family's routers
(``router``), dense first layers and MoE layers with shared experts; ``model`` builds both.

V3 is V2's architecture with the sigmoid router (``e_score_correction_bias`` for the choice only,
group-limited top-k, renormalised, routed scaling) and the ``rope_interleave`` switch. The correction
bias is kept in float32 by the converter and the loader whatever the dtype, as transformers keeps
it. Multi-token-prediction layers (index >= num_hidden_layers) are dropped by the converter.

Sparse layers: ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0`` (transformers 5.23
ignores ``moe_layer_freq``, which is 1 in every released checkpoint). Tensor names: transformers'
``mlp.shared_experts.*`` is the MoE block's ``shared_expert``.
"""

from __future__ import annotations

from engine.store.families import Family, SyntheticRecipe, strip_model_prefix


def sparse_layers(config, num_layers: int) -> list[int]:
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return [i for i in range(num_layers) if i >= first_dense and i % freq == 0]


def rename(name: str) -> str | None:
    name = strip_model_prefix(name) or name
    return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")


def build_v2(args, experts):
    from engine.model.families.deepseek.model import build_deepseek

    return build_deepseek(args, experts, version=2)


def build_v3(args, experts):
    from engine.model.families.deepseek.model import build_deepseek

    return build_deepseek(args, experts, version=3)


def _mla_dims(s) -> dict[str, int]:
    """DeepSeek-V3's latent attention widths for a synthetic shape: its ranks in proportion to the hidden
    size (q 1536 and kv 512 of 7168), nope and v heads of head_dim, rope half of it."""
    def ranked(n: float) -> int:
        return max(32, int(round(n / 32)) * 32)

    return {
        "q_lora_rank": ranked(s.hidden * 1536 / 7168),
        "kv_lora_rank": ranked(s.hidden * 512 / 7168),
        "qk_nope_head_dim": s.head_dim,
        "qk_rope_head_dim": s.head_dim // 2,
        "v_head_dim": s.head_dim,
    }


def synthetic_config(s) -> dict:
    """DeepSeek-V3's config keys: sigmoid router over 8 groups (top 4), one shared expert, routed scaling;
    every layer sparse (the real model's first 3 of 61 are dense)."""
    return {
        **_mla_dims(s),
        "n_routed_experts": s.num_experts,
        "moe_intermediate_size": s.intermediate,
        "intermediate_size": s.intermediate * 9,
        "n_shared_experts": 1,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "n_group": 8 if s.num_experts % 8 == 0 else 1,
        "topk_group": 4 if s.num_experts % 8 == 0 else 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
    }


def synthetic_attention(s) -> list[tuple[str, tuple[int, ...]]]:
    d = _mla_dims(s)
    qk = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    return [
        ("self_attn.q_a_proj.weight", (d["q_lora_rank"], s.hidden)),
        ("self_attn.q_a_layernorm.weight", (d["q_lora_rank"],)),
        ("self_attn.q_b_proj.weight", (s.heads * qk, d["q_lora_rank"])),
        ("self_attn.kv_a_proj_with_mqa.weight", (d["kv_lora_rank"] + d["qk_rope_head_dim"], s.hidden)),
        ("self_attn.kv_a_layernorm.weight", (d["kv_lora_rank"],)),
        ("self_attn.kv_b_proj.weight", (s.heads * (d["qk_nope_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"])),
        ("self_attn.o_proj.weight", (s.hidden, s.heads * d["v_head_dim"])),
    ]


def synthetic_tensors(s) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("mlp.gate.e_score_correction_bias", (s.num_experts,)),
        ("mlp.shared_experts.gate_proj.weight", (s.intermediate, s.hidden)),
        ("mlp.shared_experts.up_proj.weight", (s.intermediate, s.hidden)),
        ("mlp.shared_experts.down_proj.weight", (s.hidden, s.intermediate)),
    ]


_COMMON = dict(
    expert_count=("n_routed_experts", "num_experts", "num_local_experts"),
    expert_size=("moe_intermediate_size", "intermediate_size"),
    sparse_layers=sparse_layers,
    rename=rename,
)
FAMILIES = (
    Family("deepseek_v2", build_v2, **_COMMON),
    Family(
        "deepseek_v3",
        build_v3,
        keep_fp32=("e_score_correction_bias",),
        synthetic=SyntheticRecipe(
            synthetic_config,
            synthetic_tensors,
            presets={"deepseek-v3": (61, 256, 8, 7168, 2048, 129280, 128, 128, 128)},
            attention_tensors=synthetic_attention,
        ),
        **_COMMON,
    ),
)

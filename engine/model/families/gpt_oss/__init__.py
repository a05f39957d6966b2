"""gpt-oss: sink attention (``attention``: sliding or full per ``layer_types``, with biases), yarn
rope, a biased top-k-then-softmax router and clamped SwiGLU experts with biases (``experts``); every
layer sparse; ``model`` builds it.

Checkpoints: the router is ``mlp.router`` (the MoE block's ``gate``); the experts are always fused,
``gate_up_proj`` [E, H, 2I] with gate and up interleaved (gate = ``[..., 0::2]``, up = ``[..., 1::2]``),
``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H], ``down_proj_bias`` [E, H] (MXFP4
``_blocks``/``_scales`` are kept as mxfp4 blocks, or dequantised with ``--dtype``); one expert shard holds the three
weights and their biases.
"""

from __future__ import annotations

import torch

from engine.store.families import (
    EXPERT_BIASES,
    EXPERT_TENSORS,
    Family,
    FusedPieces,
    SyntheticRecipe,
    strip_model_prefix,
)

# transformers' GptOssConfig default when config.json gives no rope parameters
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def split_fused(which: str, bias: bool, t, inter: int) -> FusedPieces:
    """transformers' [E, H, 2I] (gate = columns 0::2, up = 1::2) / [E, I, H]; MXFP4 experts kept in their
    blocks (a ``QuantTensor``, already per expert [out, in]: gate = rows 0::2, up = rows 1::2)."""
    if not isinstance(t, torch.Tensor):
        for e in range(t.shape[0]):
            x = t[e]
            if which == "gate_up_proj":
                yield e, "gate_proj.weight", x[0::2]
                yield e, "up_proj.weight", x[1::2]
            else:
                yield e, "down_proj.weight", x
        return
    for e in range(t.shape[0]):
        x = t[e]
        if which == "gate_up_proj" and bias:
            yield e, "gate_proj.bias", x[0::2].clone()
            yield e, "up_proj.bias", x[1::2].clone()
        elif which == "gate_up_proj":  # [H, 2I] interleaved
            yield e, "gate_proj.weight", x[:, 0::2].t().contiguous()
            yield e, "up_proj.weight", x[:, 1::2].t().contiguous()
        elif bias:
            yield e, "down_proj.bias", x.clone()
        else:  # [I, H]
            yield e, "down_proj.weight", x.t().contiguous()


def fuse_experts(shards: list[dict]) -> dict:
    """The hub's fused tensors of one layer from its expert shards (the inverse of ``split_fused``)."""
    import torch

    def interleave(gate, up):  # gate at [..., 0::2], up at [..., 1::2]
        return torch.stack((gate, up), dim=-1).flatten(-2).contiguous()

    gate = torch.stack([x["gate_proj.weight"].t() for x in shards])  # [E, H, I]
    up = torch.stack([x["up_proj.weight"].t() for x in shards])
    return {
        "gate_up_proj": interleave(gate, up),
        "gate_up_proj_bias": interleave(torch.stack([x["gate_proj.bias"] for x in shards]),
                                        torch.stack([x["up_proj.bias"] for x in shards])),
        "down_proj": torch.stack([x["down_proj.weight"].t() for x in shards]).contiguous(),  # [E, I, H]
        "down_proj_bias": torch.stack([x["down_proj.bias"] for x in shards]),
    }


def rename(name: str) -> str | None:
    name = strip_model_prefix(name) or name
    return name.replace(".mlp.router.", ".mlp.gate.")


def build(args, experts):
    from engine.model.families.gpt_oss.model import build_gpt_oss

    return build_gpt_oss(args, experts)


def synthetic_config(s) -> dict:
    """gpt-oss's config keys for a synthetic shape: sliding (128) and full attention alternating, biases."""
    return {
        "num_local_experts": s.num_experts,
        "intermediate_size": s.intermediate,
        "attention_bias": True,
        "sliding_window": 128,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.num_layers)],
        "swiglu_limit": 7.0,
        "rope_parameters": {"rope_theta": 150000.0, **DEFAULT_ROPE},
    }


def synthetic_tensors(s) -> list[tuple[str, tuple[int, ...]]]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [
        ("self_attn.q_proj.bias", (q,)),
        ("self_attn.k_proj.bias", (kv,)),
        ("self_attn.v_proj.bias", (kv,)),
        ("self_attn.o_proj.bias", (s.hidden,)),
        ("self_attn.sinks", (s.heads,)),
        ("mlp.router.bias", (s.num_experts,)),
    ]


FAMILY = Family(
    "gpt_oss",
    build,
    rope_theta=150000.0,
    default_rope=DEFAULT_ROPE,
    expert_count=("num_local_experts", "num_experts"),
    expert_size=("intermediate_size",),
    expert_tensors=EXPERT_TENSORS + EXPERT_BIASES,
    split_fused=split_fused,
    fuse_experts=fuse_experts,
    router="router",
    rename=rename,
    synthetic=SyntheticRecipe(
        synthetic_config,
        synthetic_tensors,
        presets={
            "gpt-oss-20b": (24, 32, 4, 2880, 2880, 201088, 64, 8, 64),
            "gpt-oss-120b": (36, 128, 4, 2880, 2880, 201088, 64, 8, 64),
        },
    ),
)

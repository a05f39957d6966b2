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

from engine.store.families import Family, strip_model_prefix


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


_COMMON = dict(
    expert_count=("n_routed_experts", "num_experts", "num_local_experts"),
    expert_size=("moe_intermediate_size", "intermediate_size"),
    sparse_layers=sparse_layers,
    rename=rename,
)
FAMILIES = (
    Family("deepseek_v2", build_v2, **_COMMON),
    Family("deepseek_v3", build_v3, keep_fp32=("e_score_correction_bias",), **_COMMON),
)

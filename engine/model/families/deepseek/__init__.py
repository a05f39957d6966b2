"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (``mla``), the family's routers
(``router``), dense first layers and MoE layers with shared experts; ``model`` builds both.

V3 is V2's architecture with the sigmoid router (``e_score_correction_bias`` for the choice only,
group-limited top-k, renormalised, routed scaling) and the ``rope_interleave`` switch. The correction
bias is loaded in float32 whatever the dtype, as transformers keeps it. Multi-token-prediction layers
(index >= num_hidden_layers) are not decoded.
"""

from __future__ import annotations

from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.families.deepseek.model import build_deepseek, rename
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM


def build_v2(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    return build_deepseek(args, experts, version=2)


def build_v3(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    return build_deepseek(args, experts, version=3)


FAMILIES = (
    register(Family("deepseek_v2", build_v2, ModelArgs.from_config, rename)),
    register(Family("deepseek_v3", build_v3, ModelArgs.from_config, rename, keep_fp32=("e_score_correction_bias",))),
)

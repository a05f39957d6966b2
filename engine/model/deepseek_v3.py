"""DeepSeek-V3: DeepSeek-V2's architecture (see ``deepseek_v2``) with the sigmoid router
(``e_score_correction_bias`` for the choice only, group-limited top-k, renormalised, routed scaling)
and the ``rope_interleave`` switch. The correction bias is loaded in float32 whatever the dtype, as
transformers keeps it. Multi-token-prediction layers (index >= num_hidden_layers) are not decoded.
"""

from __future__ import annotations

from engine.model.args import ModelArgs
from engine.model.deepseek_v2 import build_deepseek, rename
from engine.model.experts import ExpertSource
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    return build_deepseek(args, experts, version=3)


FAMILY = register(
    Family("deepseek_v3", build, ModelArgs.from_config, rename, keep_fp32=("e_score_correction_bias",))
)

"""Which model families the store accepts, and where their routed experts are.

``moe_layout(config)`` reads a Hugging Face ``config.json`` dict (old hub field names and the names
transformers 5 writes both work) and returns a ``MoELayout``: the family, how many decoder layers,
experts per MoE layer, top-k, which decoder layers have routed experts, and the hidden and
per-expert intermediate sizes. The converter, the model code and the memory code all use it.

Field names per family (first match wins):

| family | experts | expert intermediate | MoE layers |
|---|---|---|---|
| mixtral | num_local_experts | intermediate_size | all |
| qwen2_moe, qwen3_moe | num_experts / num_local_experts | moe_intermediate_size | i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0 |
| olmoe | num_experts / num_local_experts | intermediate_size | all |
| deepseek_v2, deepseek_v3 | n_routed_experts | moe_intermediate_size | i >= first_k_dense_replace and i % moe_layer_freq == 0 |
| gpt_oss | num_local_experts / num_experts | intermediate_size | all |
| llama (dense) | - | - | none |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import MoeinfError

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
DENSE_MODEL_TYPES = ("llama",)
SUPPORTED_MODEL_TYPES = MOE_MODEL_TYPES + DENSE_MODEL_TYPES


@dataclass(frozen=True)
class MoELayout:
    """Where a model's routed experts are. For a dense model num_experts == 0 and moe_layers == []."""

    family: str
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: list[int] = field(default_factory=list)
    hidden_size: int = 0
    expert_intermediate_size: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)


def _first(config: dict, *names: str, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def model_type(config: dict) -> str:
    """The config's model_type; MoeinfError listing the supported ones if it is not supported."""
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise MoeinfError(
            f"unsupported model family {mt!r}; moeinf supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return mt


def moe_layout(config: dict) -> MoELayout:
    """The MoE layout of a Hugging Face config dict (see the module docstring for the fields read)."""
    family = model_type(config)
    n_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    if family in DENSE_MODEL_TYPES:
        return MoELayout(family, n_layers, 0, 0, [], hidden, 0)

    top_k = int(_first(config, "num_experts_per_tok", "moe_topk", "top_k", default=0))
    layers = range(n_layers)
    if family == "mixtral":
        n_exp = _first(config, "num_local_experts", "num_experts")
        inter = config["intermediate_size"]
        moe = list(layers)
    elif family in ("qwen2_moe", "qwen3_moe"):
        n_exp = _first(config, "num_experts", "num_local_experts")
        inter = _first(config, "moe_intermediate_size", "intermediate_size")
        step = int(config.get("decoder_sparse_step") or 1)
        only_mlp = set(config.get("mlp_only_layers") or [])
        moe = [i for i in layers if i not in only_mlp and (i + 1) % step == 0] if n_exp else []
    elif family == "olmoe":
        n_exp = _first(config, "num_experts", "num_local_experts")
        inter = config["intermediate_size"]
        moe = list(layers)
    elif family in ("deepseek_v2", "deepseek_v3"):
        n_exp = _first(config, "n_routed_experts", "num_experts", "num_local_experts")
        inter = _first(config, "moe_intermediate_size", "intermediate_size")
        first_dense = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        moe = [i for i in layers if i >= first_dense and i % freq == 0] if n_exp else []
    else:  # gpt_oss
        n_exp = _first(config, "num_local_experts", "num_experts")
        inter = config["intermediate_size"]
        moe = list(layers)
    if not n_exp or not top_k:
        raise MoeinfError(f"config.json of this {family} model names no experts or no top-k; the checkpoint is incomplete")
    return MoELayout(family, n_layers, int(n_exp), top_k, moe, hidden, int(inter))

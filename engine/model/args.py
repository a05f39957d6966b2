"""Model arguments parsed from a store's config.json (the fields every family shares)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import MoeinfError
from engine.model.layers.rope import rope_parameters
from engine.store.dtypes import config_dtype
from engine.store.families import Family


@dataclass
class ModelArgs:
    """Common decoder-only transformer hyper-parameters; ``config`` keeps the whole dict for the
    family-specific keys (``args.get(key, default)``)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    dtype: torch.dtype | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    @classmethod
    def from_family(cls, family: Family, config: dict[str, Any]) -> ModelArgs:
        """The arguments of a config.json of ``family``, with the family's defaults."""
        if family.default_rope and not config.get("rope_parameters") and not config.get("rope_scaling"):
            config = {**config, "rope_parameters": {**family.default_rope, "rope_theta": config.get("rope_theta")}}
        return cls.from_config(config, family.rope_theta, dict(family.config_defaults))

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        default_rope_theta: float = 10000.0,
        defaults: dict[str, Any] | None = None,
    ) -> ModelArgs:
        """``defaults``: the family's values for keys a config.json may omit (as its transformers
        config class has them), e.g. ``{"rms_norm_eps": 1e-5}``."""
        if defaults:
            config = {**defaults, **{k: v for k, v in config.items() if v is not None}}
        def need(key: str) -> Any:
            if config.get(key) is None:
                raise MoeinfError(
                    f"config.json of this {config.get('model_type', '?')} model lacks {key!r}; pull the model again"
                )
            return config[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = config.get("num_key_value_heads")
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            model_type=str(need("model_type")),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            head_dim=int(head_dim),
            intermediate_size=int(config.get("intermediate_size") or 0),
            rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            rope=rope_parameters(config, default_rope_theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=str(config.get("hidden_act") or config.get("hidden_activation") or "silu"),
            dtype=config_dtype(config),
            config=dict(config),
        )

"""Llama (dense, no experts): the GGUF demo path (SmolLM2) and upcycling sources. Optional
attention / MLP biases, tied embeddings, llama3 / linear / dynamic rope scaling. GGUF: llama.cpp's
``llama`` architecture without expert tensors (Q/K rows un-permuted)."""

from __future__ import annotations

from typing import Any

from engine.store.families import Family, GGUFArch


def build(args, experts):
    from engine.model.layers.attention import model_attention
    from engine.model.layers.mlp import MLP
    from engine.model.transformer import decoder_stack

    bias = bool(args.get("attention_bias", False))
    mlp_bias = bool(args.get("mlp_bias", False))
    return decoder_stack(
        args,
        lambda i: model_attention(args, qkv_bias=bias, o_bias=bias),
        lambda i: MLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=mlp_bias),
    )


def gguf_llama_config(get, tensor_names: set[str]) -> dict[str, Any]:
    """The keys llama.cpp's ``llama`` architecture sets for llama and Mixtral alike."""
    key_length = get("attention.key_length")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return {
        "head_dim": int(key_length) if key_length else hidden // heads,
        "intermediate_size": int(get("feed_forward_length")),
    }


def gguf_config(get, tensor_names: set[str]) -> dict[str, Any]:
    return gguf_llama_config(get, tensor_names) | {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


FAMILY = Family(
    "llama",
    build,
    config_defaults={"rms_norm_eps": 1e-6},
    gguf=GGUFArch("llama", gguf_config, unpermute_qk=True),
)

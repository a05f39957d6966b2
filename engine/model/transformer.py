"""Decoder layer and the causal LM (batch size one, static KV cache), gpt-fast style.

``CausalLM`` parameter names follow transformers 5's in-memory names with the leading ``model.``
dropped (``layers.3.self_attn.q_proj.weight``, ``layers.3.mlp.gate.weight``, ``lm_head.weight``),
so dense tensors load by name. ``layers[i].mlp`` is the FFN or MoE module of decoder layer i.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import Linear, decode_threads
from engine.errors import MoeinfError
from engine.model.args import ModelArgs
from engine.model.layers.context import StepContext
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head; ``forward(tokens[T], start_pos) -> logits[T, V]``."""

    def __init__(self, args: ModelArgs, layers: list[nn.Module], rotary: RotaryEmbedding | None):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.max_seq_len = 0
        # _weight: no random init (on the meta device it would import torch._dynamo, ~4 s per process)
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.hidden_size, _weight=torch.empty(args.vocab_size, args.hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = rotary

    def setup_caches(self, max_seq_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Allocate every layer's KV cache and the rotary tables for ``max_seq_len`` positions."""
        device = torch.device(device)
        self.max_seq_len = max_seq_len
        if self.rotary is not None:
            self.rotary.setup(max_seq_len, dtype, device)
        for layer in self.layers:
            layer.self_attn.setup_cache(max_seq_len, dtype, device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Run tokens [T] at positions ``start_pos..start_pos+T-1``; float32 logits [T, V]
        (``last_only``: [1, V] for the last position only, which saves the LM head on long prompts)."""
        T = int(tokens.shape[0])
        if T < 1:
            raise ValueError("forward() needs at least one token")
        if start_pos < 0 or start_pos + T > self.max_seq_len:
            raise MoeinfError(
                f"{start_pos + T} tokens do not fit the context of {self.max_seq_len}; use a larger --ctx"
            )
        device = self.embed_tokens.weight.device
        ctx = StepContext(start_pos=start_pos, seqlen=T, device=device)
        if self.rotary is not None:
            ctx.cos, ctx.sin = self.rotary(start_pos, T)
        with decode_threads(T == 1 and device.type == "cpu"):
            x = self.embed_tokens(tokens.to(device))
            for layer in self.layers:
                x = layer(x, ctx)
            if last_only:
                x = x[-1:]
            return self.lm_head(self.norm(x)).float()

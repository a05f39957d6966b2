"""Decoder layer and the causal LM (static KV cache, one slot per sequence), gpt-fast style.

``forward(tokens, start_pos[, slot])`` runs one sequence (KV-cache slot 0 unless told); ``forward_batch(tokens, segments)``
runs several sequences of different lengths and positions in one pass (prefill and decode mixed):
their tokens end to end, every position-wise part (norms, projections, MLP, MoE) on all rows at once,
attention sequence by sequence over each one's cache slot. Slots come from ``setup_caches(..., slots=N)``.

``CausalLM`` parameter names follow transformers 5's in-memory names with the leading ``model.``
dropped (``layers.3.self_attn.q_proj.weight``, ``layers.3.mlp.gate.weight``, ``lm_head.weight``),
so dense tensors load by name. ``layers[i].mlp`` is the FFN or MoE module of decoder layer i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cuda_ext.cpu import Linear, decode_threads
from engine.errors import MoeinfError
from engine.formats.linear import int8_activations
from engine.model.args import ModelArgs
from engine.model.layers.context import BatchContext, StepContext
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rope import RotaryEmbedding

# activations="auto": forwards of at least this many tokens take int8 activations. The int8 GEMM overtakes
# the float32 kernels from 16 rows per product on the 32-value formats (cuda_ext.quant.AUTO_MIN_ROWS), and
# a prompt's experts get T * top_k / experts rows each: 16 at 64 tokens on Mixtral's 8 experts, top-2.
# Shorter prompts cost a few ms either way and keep float32 (the demo's 37-token answer with them).
AUTO_INT8_TOKENS = 64


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, ctx: StepContext | BatchContext) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


def decoder_stack(
    args: ModelArgs,
    attention: Callable[[int], nn.Module],
    mlp: Callable[[int], nn.Module],
    rotary: RotaryEmbedding | None = None,
) -> CausalLM:
    """The decoder most families are: layer i is ``DecoderLayer(attention(i), mlp(i))`` with the args'
    RMSNorms, under the rotary table of the args' rope and context (or ``rotary``)."""
    layers = [
        DecoderLayer(attention(i), mlp(i), args.hidden_size, args.rms_norm_eps) for i in range(args.num_layers)
    ]
    if rotary is None:
        rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head; ``forward(tokens[T], start_pos) -> logits[T, V]``."""

    def __init__(self, args: ModelArgs, layers: list[nn.Module], rotary: RotaryEmbedding | None):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.max_seq_len = 0
        self.cache_slots = 0
        self.cache_dtype = torch.float32
        # _weight: no random init (on the meta device it would import torch._dynamo, ~4 s per process)
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.hidden_size, _weight=torch.empty(args.vocab_size, args.hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = rotary
        # the native step over every layer (engine.model.native_step): False = not made yet, None = does not
        # apply (made again when the expert source holds more experts); native_step = False turns it off
        self.native_step = True
        self._step: object = False
        self._step_seen = -1
        # float32 activations on block-format weights (engine.formats.linear.ACTIVATIONS): "float32" never
        # rounds them; "auto" rounds them to int8 per block on forwards of AUTO_INT8_TOKENS tokens or more, in
        # products of cuda_ext.quant.AUTO_MIN_ROWS rows or more (prompts), and on every forward (decode too)
        # in the products on cuda_ext.quant.AUTO_INT8_FORMATS (q4_k, q5_k, q6_k); "int8" on every forward
        # (decode too, as llama.cpp)
        self.activations = "float32"

    def _int8(self, tokens: int) -> bool | str:
        """How a forward of ``tokens`` rows rounds float32 activations (``cuda_ext.quant.int8_activations``):
        True (every product), "auto" (products of enough rows: a prompt's, and the k-quants' of any), "kquants"
        (a decode step's or a short prompt's: the k-quants' products only), False (none)."""
        mode = self.activations
        if mode != "auto":
            return mode == "int8"
        return "auto" if tokens >= AUTO_INT8_TOKENS else "kquants"  # kquants: cuda_ext.quant.AUTO_INT8_FORMATS

    def _apply(self, fn, recurse=True):
        self._step = False  # new tensors: describe them again
        return super()._apply(fn, recurse)

    def _native_layers(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """x [1, H] through every layer in one native call (``engine.model.native_step``), or None."""
        from engine.model import native_step

        if self._step is None:
            source = getattr(self.layers[0].mlp, "experts", None)
            seen = source.resident_count() if hasattr(source, "resident_count") else 0
            if seen == self._step_seen:
                return None
            self._step_seen, self._step = seen, False
        if self._step is False:
            self._step = native_step.step_plan(self)
            if self._step is None:
                return None
        return native_step.run_layers(self, self._step, x, ctx)

    def setup_caches(
        self, max_seq_len: int, dtype: torch.dtype, device: torch.device | str, slots: int = 1
    ) -> None:
        """Allocate every layer's KV cache (``slots`` sequences of ``max_seq_len`` positions each) and
        the rotary tables; replaces the caches there were."""
        device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.cache_slots = int(slots)
        self.cache_dtype = dtype
        if self.rotary is not None:
            self.rotary.setup(max_seq_len, dtype, device)
        for layer in self.layers:
            layer.self_attn.setup_cache(max_seq_len, dtype, device, slots=int(slots))
        self._step = False

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start_pos: int, last_only: bool = False, slot: int = 0
    ) -> torch.Tensor:
        """Run tokens [T] at positions ``start_pos..start_pos+T-1`` of KV-cache slot ``slot``; float32
        logits [T, V] (``last_only``: [1, V] for the last position only, which saves the LM head on long
        prompts)."""
        T = int(tokens.shape[0])
        if T < 1:
            raise ValueError("forward() needs at least one token")
        if start_pos < 0 or start_pos + T > self.max_seq_len:
            raise MoeinfError(
                f"{start_pos + T} tokens do not fit the context of {self.max_seq_len}; use a larger --ctx"
            )
        device = self.embed_tokens.weight.device
        ctx = StepContext(start_pos=start_pos, seqlen=T, device=device, slot=slot)
        if self.rotary is not None:
            ctx.cos, ctx.sin = self.rotary(start_pos, T)
        int8 = self._int8(T)
        with decode_threads((T == 1 or int8 in (True, "auto")) and device.type == "cpu"), int8_activations(int8):
            x = self.embed_tokens(tokens.to(device))
            out = None
            if T == 1 and self.native_step and x.dtype in (torch.bfloat16, torch.float32) and device.type == "cpu":
                out = self._native_layers(x, ctx)
            if out is None:
                for layer in self.layers:
                    x = layer(x, ctx)
            else:
                x = out
            if last_only:
                x = x[-1:]
            return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, segments: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Several sequences in one pass: ``segments[i] = (slot, start_pos, length)`` takes the next
        ``length`` tokens of ``tokens [N]`` to positions ``start_pos..`` of KV-cache slot ``slot`` (each
        slot at most once). Float32 logits [len(segments), V] of each sequence's last token."""
        steps = []
        device = self.embed_tokens.weight.device
        seen: set[int] = set()
        for slot, start_pos, length in segments:
            if length < 1:
                raise ValueError("every sequence of a batch needs at least one token")
            if not 0 <= slot < self.cache_slots or slot in seen:
                raise ValueError(f"KV-cache slot {slot} is out of range or used twice in one batch")
            seen.add(slot)
            if start_pos < 0 or start_pos + length > self.max_seq_len:
                raise MoeinfError(
                    f"{start_pos + length} tokens do not fit the context of {self.max_seq_len}; use a larger --ctx"
                )
            step = StepContext(start_pos=start_pos, seqlen=length, device=device, slot=slot)
            if self.rotary is not None:
                step.cos, step.sin = self.rotary(start_pos, length)
            steps.append(step)
        if sum(s.seqlen for s in steps) != int(tokens.shape[0]):
            raise ValueError("the segments' lengths do not add up to the number of tokens")
        if len(steps) == 1:  # one sequence: forward's path (the native decode step and attention take it)
            return self.forward(tokens, steps[0].start_pos, last_only=True, slot=steps[0].slot)
        ctx = BatchContext(steps, device)
        if self.rotary is not None:
            ctx.cos = torch.cat([s.cos for s in steps])
            ctx.sin = torch.cat([s.sin for s in steps])
        int8 = self._int8(len(tokens))
        with decode_threads((len(tokens) == 1 or int8 in (True, "auto")) and device.type == "cpu"), int8_activations(int8):
            x = self.embed_tokens(tokens.to(device))
            for layer in self.layers:
                x = layer(x, ctx)
            x = x[ctx.last_rows()]
            return self.lm_head(self.norm(x)).float()

"""A decode token through every decoder layer in one native call (``cuda_ext.step``), where the model
is made of the common pre-norm MoE layer and every routed expert is in memory.

``step_plan(model)`` checks each layer (a ``DecoderLayer`` of two ``RMSNorm``s, an ``Attention`` the
native attention takes, an ``MoEBlock`` with a ``SoftmaxTopKRouter``, SiLU experts and no shared expert)
and asks the layer's expert source for all its experts (``native_experts``: the all-resident source
offers them once every expert is loaded); None when any of it does not hold. ``run_layers(model, plan,
x, ctx)`` runs the layers and then gives the expert source what the layers would have: ``observe`` with
each layer's routing (the trace recorder) and ``count_hits``. The result is the same bits as the layers
called one by one (the same native pieces; ``tests/test_native_step.py``).
"""

from __future__ import annotations

import torch

from cuda_ext import attention as native_attention
from cuda_ext import step as native_step
from cuda_ext.cpu import _expert_entry, experts_accumulate, threads
from engine.model.layers.attention import Attention
from engine.model.layers.context import StepContext
from engine.model.layers.moe import MoEBlock
from engine.model.layers.norm import RMSNorm
from engine.model.layers.router import SoftmaxTopKRouter


class StepPlan:
    def __init__(self, layers: native_step.Layers, sources: list, moe_ids: list[int], head_dim: int):
        self.layers = layers
        self.sources = sources
        self.moe_ids = moe_ids
        self.head_dim = head_dim


def _bf16(t, n: int | None = None) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.dtype == torch.bfloat16
        and t.device.type == "cpu"
        and t.is_contiguous()
        and (n is None or t.numel() == n)
    )


def step_plan(model) -> StepPlan | None:
    """The native step's description of ``model`` (a ``CausalLM``), or None where it does not apply."""
    from engine.model.transformer import DecoderLayer

    structs, keep, sources, moe_ids = [], [], [], []
    hidden = model.args.hidden_size
    head_dim = None
    for layer in model.layers:
        if type(layer) is not DecoderLayer:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if type(n1) is not RMSNorm or type(n2) is not RMSNorm or n1.eps != n2.eps:
            return None
        if not (_bf16(n1.weight, hidden) and _bf16(n2.weight, hidden)):
            return None
        if type(attn) is not Attention or type(mlp) is not MoEBlock:
            return None
        gate = mlp.gate
        if type(gate) is not SoftmaxTopKRouter or mlp.shared_expert is not None:
            return None
        if getattr(mlp.expert_fn, "accumulate", None) is not experts_accumulate:
            return None
        source = mlp.experts
        if not hasattr(source, "native_experts"):
            return None
        E = gate.weight.shape[0]
        if not _bf16(gate.weight, E * hidden) or not (gate.bias is None or _bf16(gate.bias, E)):
            return None
        experts = source.native_experts(mlp.layer_idx, E)
        if experts is None:
            return None
        entries = [_expert_entry(w, False) for w in experts]
        if any(e is None or e[:3] != entries[0][:3] for e in entries) or entries[0][2] != hidden:
            return None
        if attn._plan is False:
            attn._plan = native_attention.decode_plan(attn)
        plan = attn._plan
        if plan is None or (head_dim is not None and plan.struct.head_dim != head_dim):
            return None
        head_dim = plan.struct.head_dim
        struct, kept = native_step.layer_struct(
            plan, n1.weight, n2.weight, n1.eps, gate.weight, gate.bias, gate.top_k, gate.renormalize,
            gate.weights_dtype == "input", entries,
        )
        structs.append(struct)
        keep += [*kept, experts]
        sources.append(source)
        moe_ids.append(mlp.layer_idx)
    if not structs:
        return None
    return StepPlan(native_step.Layers(structs, keep, hidden), sources, moe_ids, head_dim)


def run_layers(model, plan: StepPlan, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    """x [1, H] through every layer; None (nothing done) where this token cannot take the native step."""
    cos, sin = ctx.cos, ctx.sin
    if cos is not None and not (_bf16(cos, plan.head_dim) and _bf16(sin, plan.head_dim)):
        return None
    if not _bf16(x, plan.layers.hidden) or not 0 <= ctx.start_pos < model.max_seq_len:
        return None
    out, ids, _, done = native_step.decode_layers(
        plan.layers, x, cos, sin, ctx.slot, ctx.start_pos, threads(1 << 30)
    )
    off = 0
    for i in range(done):
        k = plan.layers.topk[i]
        source, layer = plan.sources[i], plan.moe_ids[i]
        source.observe(layer, ids[off : off + k].view(1, k), out)
        source.count_hits(layer, k)
        off += k
    for layer in model.layers[done:]:  # a layer the kernels refused, and those after it
        out = layer(out, ctx)
    return out

"""A decode token through every decoder layer in one native call (``cuda_ext.step``), where the model
is made of pre-norm layers the kernels know and every routed expert is in memory.

``step_plan(model)`` checks each layer, a ``DecoderLayer`` of:

* two norms: ``RMSNorm``, or gpt-oss's ``GptOssRMSNorm`` (the weight applied in float32), bf16 weights;
* an attention the native kernels take: ``Attention`` and gpt-oss's ``SinkAttention``
  (``cuda_ext.attention``), DeepSeek's ``MultiHeadLatentAttention`` (``cuda_ext.mla``);
* an ``MoEBlock`` whose router is a ``SoftmaxTopKRouter``, gpt-oss's ``GptOssRouter`` or DeepSeek-V3's
  ``DeepseekV3Router``, whose experts are SiLU SwiGLU or gpt-oss's clamped SwiGLU, with or without a
  shared SiLU ``MLP`` (no shared-expert gate); or a dense SiLU ``MLP`` (DeepSeek's first layers);

or, in a float32 model whose attention and experts are block formats (a GGUF model, ``_step_plan_f32``),
float32 ``RMSNorm``s, ``Attention`` on ``cuda_ext.attention_f32``, a float32 ``SoftmaxTopKRouter`` (no
shared expert) or a dense SiLU ``MLP``, the int8 bits of the experts and attention set per
``cuda_ext.quant.int8_activations`` mode (as the layers decide them one by one);

and asks each MoE layer's expert source for all its experts (``native_experts``: the all-resident
source offers them once every expert is loaded); None when any of it does not hold. ``run_layers(model,
plan, x, ctx)`` runs the layers and then gives the expert source what the layers would have: ``observe``
with each MoE layer's routing and router input (the trace recorder) and ``count_hits``. The result is
the same bits as the layers called one by one (the same native pieces; ``tests/test_native_step.py``).
"""

from __future__ import annotations

import inspect

import torch

from cuda_ext import attention as native_attention
from cuda_ext import attention_f32 as native_attention_f32
from cuda_ext import mla as native_mla
from cuda_ext import step as native_step
from cuda_ext.blocks import bf16_cpu as _bf16
from cuda_ext.blocks import f32_cpu as _f32
from cuda_ext.cpu import _expert_entry, experts_accumulate, threads
from cuda_ext.quant import int8_active, int8_mode
from engine.model.experts import ExpertWeights
from engine.model.layers.attention import Attention
from engine.model.layers.context import StepContext
from engine.model.layers.mlp import MLP
from engine.model.layers.moe import MoEBlock
from engine.model.layers.norm import RMSNorm
from engine.model.layers.router import SoftmaxTopKRouter


class StepPlan:
    def __init__(self, layers: native_step.Layers, hooks: list, rope_dim: int | None, attn_plans: list | None = None):
        self.layers = layers
        self.hooks = hooks  # per layer: (expert source, MoE layer index) or None (a dense layer)
        self.rope_dim = rope_dim
        self.attn_plans = attn_plans  # float32: each layer's attention_f32 plan (for its int8 bits)
        self.mode: object = False  # float32: the int8_activations mode the layers' int8 bits were set for


def _norm_kind(norm, hidden: int) -> bool | None:
    """False for an ``RMSNorm``, True for gpt-oss's float32-weight norm, None for one the step cannot run."""
    from engine.model.families.gpt_oss.model import GptOssRMSNorm

    kind = {RMSNorm: False, GptOssRMSNorm: True}.get(type(norm))
    return kind if kind is not None and _bf16(norm.weight, hidden) else None


def _mlp_entry(mlp, hidden: int) -> tuple | None:
    """The bf16 expert entry of a dense SiLU ``MLP`` (a shared expert, a dense layer), or None."""
    if type(mlp) is not MLP or not mlp.native_swiglu:
        return None
    w = ExpertWeights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                      mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias)
    entry = _expert_entry(w, False)
    return entry if entry is not None and entry[0] == 0 and entry[2] == hidden else None


def _attention(attn) -> tuple[object, bool, int] | None:
    """(plan, is MLA, rotary width) of a layer's attention, or None where no native kernel takes it."""
    from engine.model.families.deepseek.mla import MultiHeadLatentAttention
    from engine.model.families.gpt_oss.attention import SinkAttention

    if type(attn) in (Attention, SinkAttention):
        if attn._plan is False:
            attn._plan = native_attention.decode_plan(attn)
        plan = attn._plan
        return None if plan is None else (plan, False, plan.struct.head_dim)
    if type(attn) is MultiHeadLatentAttention:
        if attn._plan is False:
            attn._plan = native_mla.decode_plan(attn)
        plan = attn._plan
        return None if plan is None else (plan, True, attn.args.qk_rope_head_dim)
    return None


def _moe(mlp, hidden: int) -> tuple[dict, list] | None:
    """The router and experts part of ``layer_struct``'s arguments for an ``MoEBlock``, and what to keep."""
    from engine.model.families.deepseek.router import DeepseekV3Router
    from engine.model.families.gpt_oss.experts import GptOssRouter

    gate = mlp.gate
    if type(gate) not in (SoftmaxTopKRouter, GptOssRouter, DeepseekV3Router):  # e.g. a replay's forced routing
        return None
    E = gate.weight.shape[0]
    if not _bf16(gate.weight, E * hidden):
        return None
    args: dict = {"router": gate.weight, "top_k": gate.top_k}
    if type(gate) is SoftmaxTopKRouter:
        if not (gate.bias is None or _bf16(gate.bias, E)):
            return None
        args |= {"router_bias": gate.bias, "renormalize": gate.renormalize,
                 "bf16_weights": gate.weights_dtype == "input"}
    elif type(gate) is GptOssRouter:
        if not _bf16(gate.bias, E):
            return None
        args |= {"router_bias": gate.bias, "topk_first": True}
    elif type(gate) is DeepseekV3Router:
        corr = gate.e_score_correction_bias
        if not (corr.dtype == torch.float32 and corr.device.type == "cpu" and corr.is_contiguous()
                and corr.numel() == E):
            return None
        args |= {"route": native_step.ROUTE_V3, "renormalize": gate.norm_topk_prob,
                 "v3": (corr, gate.n_group, gate.topk_group, float(gate.routed_scaling_factor))}
    else:
        return None
    accumulate = inspect.unwrap(getattr(mlp.expert_fn, "accumulate", None) or (lambda: None))  # a timer's wrapper
    clamped = getattr(accumulate, "clamped", None)  # gpt-oss's clamped SwiGLU experts
    if clamped is not None:
        args["clamped"] = clamped
    elif accumulate is not experts_accumulate:
        return None
    if mlp.shared_expert_gate is not None:
        return None
    if mlp.shared_expert is not None:
        args["shared"] = _mlp_entry(mlp.shared_expert, hidden)
        if args["shared"] is None:
            return None
    source = mlp.experts
    if not hasattr(source, "native_experts"):
        return None
    experts = source.native_experts(mlp.layer_idx, E)
    if experts is None:
        return None
    entries = [_expert_entry(w, False) for w in experts]
    if any(e is None or e[:3] != entries[0][:3] for e in entries) or entries[0][2] != hidden:
        return None
    args["entries"] = entries
    return args, [experts]


def _step_plan_f32(model) -> StepPlan | None:
    """``step_plan`` for a float32 model whose attention and experts are block formats (a GGUF model):
    ``RMSNorm``s with float32 weights, ``Attention`` on ``cuda_ext.attention_f32``, an ``MoEBlock`` with a
    float32 ``SoftmaxTopKRouter`` and no shared expert, or a dense SiLU ``MLP``."""
    from engine.model.transformer import DecoderLayer

    structs, keep, hooks, fmts, plans = [], [], [], [], []
    hidden = model.args.hidden_size
    head_dim = None
    for layer in model.layers:
        if type(layer) is not DecoderLayer:
            return None
        n1, n2, attn, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.mlp
        if not (type(n1) is RMSNorm and type(n2) is RMSNorm and n1.eps == n2.eps
                and _f32(n1.weight, hidden) and _f32(n2.weight, hidden) and type(attn) is Attention):
            return None
        if attn._plan_f32 is False:
            attn._plan_f32 = native_attention_f32.decode_plan(attn)
        plan = attn._plan_f32
        if plan is None or (head_dim is not None and plan.struct.head_dim != head_dim):
            return None
        head_dim = plan.struct.head_dim
        if type(mlp) is MoEBlock:
            gate = mlp.gate
            if type(gate) is not SoftmaxTopKRouter or mlp.shared_expert is not None or mlp.shared_expert_gate is not None:
                return None
            E = gate.weight.shape[0]
            accumulate = inspect.unwrap(getattr(mlp.expert_fn, "accumulate", None) or (lambda: None))
            if not (_f32(gate.weight, E * hidden) and (gate.bias is None or _f32(gate.bias, E))
                    and accumulate is experts_accumulate and hasattr(mlp.experts, "native_experts")):
                return None
            experts = mlp.experts.native_experts(mlp.layer_idx, E)
            if experts is None:
                return None
            entries = [_expert_entry(w, True) for w in experts]
            if any(e is None or e[:3] != entries[0][:3] for e in entries) or entries[0][2] != hidden:
                return None
            struct, kept = native_step.layer_struct_f32(
                plan, n1.weight, n2.weight, n1.eps, entries, gate.weight, gate.bias, gate.top_k, gate.renormalize
            )
            keep += [experts]
            hooks.append((mlp.experts, mlp.layer_idx))
        elif type(mlp) is MLP and mlp.native_swiglu:
            w = mlp._expert_weights()
            entry = _expert_entry(w, True)
            if entry is None or entry[2] != hidden:
                return None
            struct, kept = native_step.layer_struct_f32(plan, n1.weight, n2.weight, n1.eps, [entry])
            keep += [w]
            hooks.append(None)
            experts = [w]
        else:
            return None
        fmts.append(getattr(getattr(experts[0].gate, "format", None), "name", None))
        plans.append(plan)
        structs.append(struct)
        keep += [*kept, mlp]
    if not structs:
        return None
    return StepPlan(native_step.LayersF32(structs, keep, hidden, fmts), hooks, head_dim, plans)


def step_plan(model) -> StepPlan | None:
    """The native step's description of ``model`` (a ``CausalLM``), or None where it does not apply."""
    from engine.model.transformer import DecoderLayer

    if model.layers and _f32(getattr(model.layers[0].input_layernorm, "weight", None)):
        return _step_plan_f32(model)
    structs, keep, hooks = [], [], []
    hidden = model.args.hidden_size
    rope_dim = None
    for layer in model.layers:
        if type(layer) is not DecoderLayer:
            return None
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        kind = _norm_kind(n1, hidden)
        if kind is None or _norm_kind(n2, hidden) is not kind or n1.eps != n2.eps:
            return None
        found = _attention(layer.self_attn)
        if found is None or (rope_dim is not None and found[2] != rope_dim):
            return None
        plan, mla, rope_dim = found
        mlp = layer.mlp
        if type(mlp) is MoEBlock:
            moe = _moe(mlp, hidden)
            if moe is None:
                return None
            args, kept = moe
            hooks.append((mlp.experts, mlp.layer_idx))
        else:
            shared = _mlp_entry(mlp, hidden)
            if shared is None:
                return None
            args, kept = {"route": native_step.ROUTE_NONE, "shared": shared}, []
            hooks.append(None)
        struct, kept_struct = native_step.layer_struct(
            plan, n1.weight, n2.weight, n1.eps, mla=mla, norm_f32w=kind, **args
        )
        structs.append(struct)
        keep += [*kept_struct, *kept, mlp]
    if not structs:
        return None
    return StepPlan(native_step.Layers(structs, keep, hidden), hooks, rope_dim)


def run_layers(model, plan: StepPlan, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    """x [1, H] through every layer; None (nothing done) where this token cannot take the native step."""
    cos, sin = ctx.cos, ctx.sin
    ok = _bf16 if plan.attn_plans is None else _f32
    if cos is not None and not (ok(cos, plan.rope_dim) and ok(sin, plan.rope_dim)):
        return None
    if not ok(x, plan.layers.hidden) or not 0 <= ctx.start_pos < model.max_seq_len:
        return None
    if plan.attn_plans is not None and plan.mode != int8_mode():  # the int8 bits of this mode
        for struct, fmt, attn in zip(plan.layers.array, plan.layers.fmts, plan.attn_plans, strict=True):
            struct.int8 = int(int8_active(fmt))
            struct.attn_int8 = native_attention_f32.int8_bits(attn)
        plan.mode = int8_mode()
    out, ids, _, routed_in, done = native_step.decode_layers(
        plan.layers, x, cos, sin, ctx.slot, ctx.start_pos, threads(1 << 30)
    )
    if done:  # each layer's [1, k] ids and [1, H] router input, as views made in two calls
        id_rows = ids[: sum(plan.layers.topk[:done])].view(1, -1).split(plan.layers.topk[:done], dim=1)
        in_rows = routed_in[:done].split(1)
    for i in range(done):
        hook = plan.hooks[i]
        if hook is None:
            continue
        source, layer = hook
        source.observe(layer, id_rows[i], in_rows[i])
        source.count_hits(layer, plan.layers.topk[i])
    for layer in model.layers[done:]:  # a layer the kernels refused, and those after it
        out = layer(out, ctx)
    return out

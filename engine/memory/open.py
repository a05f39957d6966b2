"""``open_experts``: the expert source of a store model for a budget and a policy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.memory.budget import fmt_bytes, parse_budget, resolve_budget
from engine.memory.offload import OffloadedExperts
from engine.memory.resident import ResidentExperts
from engine.memory.stats import CacheStats
from engine.memory.transfer import ExpertLayout, make_transfer
from engine.policy.base import Policy
from engine.store.opened import StoreModel, as_store_model


def kv_bytes(config: dict, ctx: int, dtype: torch.dtype) -> int:
    """Approximate KV-cache bytes for ``ctx`` tokens (standard K and V per layer)."""
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    if config.get("kv_lora_rank"):  # MLA: the latent cache
        per_token = int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim") or 0)
        return layers * ctx * per_token * _elem(dtype)
    return 2 * layers * ctx * kv_heads * head_dim * _elem(dtype)


def context_bytes(config: dict, ctx: int, dtype: torch.dtype) -> int:
    """What a context of ``ctx`` tokens takes before any expert: the KV cache and the rotary tables
    (cos and sin in float32, and the position x frequency product they are made from)."""
    heads = int(config.get("num_attention_heads") or 1)
    hidden = int(config.get("hidden_size") or 0)
    rotary = int(config.get("qk_rope_head_dim") or config.get("head_dim") or (hidden // heads if heads else 0))
    return kv_bytes(config, ctx, dtype) + 3 * ctx * rotary * 4


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def open_experts(
    model: StoreModel | Path | str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    budget: str | None = "auto",
    policy: str | None = None,
    recorder=None,
    *,
    ctx: int = 4096,
    workers: int = 2,
    direct: bool = True,
    prefetch: bool = True,
    verbose: bool = False,
    available: int | None = None,
):
    """The ExpertSource of a store model (the opened ``StoreModel``, or its directory).

    ``budget``: None or "100%" keeps every expert resident; a size ("12GiB", "500MB") or share ("25%")
    of all experts' bytes as stored (a q4_k model's experts count at 4.5 bits) bounds the expert cache; "auto" fits free memory after the
    dense weights, the KV cache for ``ctx`` tokens and a margin. ``policy``: a name of
    ``engine.policy.registry`` (None: its default). ``direct``: O_DIRECT reads on the CPU (buffered
    when False or unsupported). ``available``: free bytes to assume instead of asking the OS (tests).
    The choice of budget is in ``stats().budget_note`` (and on stderr with ``verbose``).
    """
    from engine.policy.registry import make_policy, policy_class

    device = torch.device(device)
    spec = parse_budget(budget)
    policy_class(policy)  # an unknown name: the one-line error naming the policies, before any work
    model = as_store_model(model)
    layout = model.layout
    if not layout.is_moe:
        raise MoeinfError(f"{model.name} is a dense model: it has no routed experts to offload")
    by_layer = {  # one layout per MoE layer (layers may store their experts in different formats)
        layer: ExpertLayout.from_tensors(
            model.layer_expert_tensors(layer), model.expert_path(layer, 0).stat().st_size, dtype
        )
        for layer in layout.moe_layers
    }
    ex_layout = max(by_layer.values(), key=lambda lay: (lay.compute_bytes(), lay.file_size))
    others = tuple(dict.fromkeys(lay for lay in by_layer.values() if lay != ex_layout))
    # a share ("25%") is of the expert bytes as stored
    total = layout.num_experts * sum(lay.stored_bytes() for lay in by_layer.values())
    n_experts = len(layout.moe_layers) * layout.num_experts
    stats = CacheStats(expert_bytes_total=total)
    resolved = resolve_budget(
        spec,
        total,
        device,
        dense_bytes=model.dense_bytes(dtype) if spec.kind == "auto" else 0,
        kv_bytes=kv_bytes(model.config, ctx, dtype) if spec.kind == "auto" else 0,
        available=available,
    )
    stats.budget_note = resolved.note
    if resolved.bytes is None:
        if verbose:
            print(f"expert budget: {resolved.note}", file=sys.stderr)
        resident = ResidentExperts(model, dtype, device, recorder=recorder, stats=stats)
        resident.preload((layer, e) for layer in layout.moe_layers for e in range(layout.num_experts))
        return resident

    transfer = make_transfer(ex_layout, device, direct=direct, others=others)
    capacity = resolved.bytes // transfer.slot_bytes
    if capacity < layout.top_k:
        need = layout.top_k * transfer.slot_bytes
        raise MoeinfError(
            f"expert budget {fmt_bytes(resolved.bytes)} is below the minimum {fmt_bytes(need)} "
            f"(the {layout.top_k} experts one layer uses at once); use --expert-budget {_size_arg(need)} or more"
        )
    stats.budget_bytes = resolved.bytes
    pol = make_policy(policy, model_name=model.root.name, model_root=model.root, config=model.config)
    if verbose:
        print(
            f"expert budget: {resolved.note}; {capacity} of {n_experts} experts fit"
            f" ({fmt_bytes(transfer.slot_bytes)} each), policy {pol.name}",
            file=sys.stderr,
        )
    hints = None
    if prefetch and type(pol).on_hint is not Policy.on_hint:
        from engine.memory.hints import RouterHints
        from engine.store.families import get_family

        hints = RouterHints(model.dense, layout.moe_layers, get_family(layout.family))
    return OffloadedExperts(
        model.expert_path,
        transfer,
        pol,
        capacity,
        num_layers=layout.num_layers,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        recorder=recorder,
        workers=max(1, min(workers, os.cpu_count() or 1, 8)) if workers else 1,
        prefetch=prefetch,
        stats=stats,
        hints=hints,
    )


def _size_arg(n: int) -> str:
    """``n`` bytes as a budget string, rounded up (MiB, or KiB for small sizes)."""
    if n >= 16 << 20:
        return f"{-(-n // (1 << 20))}MiB"
    return f"{-(-n // 1024)}KiB"

"""``moeinf predict``: will a model fit on this machine with an expert budget, and how fast will it run.

Inputs: the model's shape from its headers (``engine.bench.shape``), the machine profile
(``engine.bench.machine``) and the routing model (``engine.bench.routing``). The time model is the
one ``moeinf bench --profile`` checks (``engine.bench.probe``): a decode step costs its compute plus
the demand loads it waits for.

* compute: the weight bytes a step multiplies by (dense + the experts it routes to) over the
  device's measured decode rate for their format, or its flops over the prefill rate, the larger;
* loads: per MoE layer, the distinct experts the step routes to (``top_k`` for one token; for a
  batch of N, ``E (1 - (1 - k/E)^N)``) times the miss rate, each costing the read latency plus its
  bytes over the O_DIRECT bandwidth at that request size (on a GPU, the slower of that and the
  host-to-device copy);
* speeds are given even when the model does not fit (as if the memory were there), except with a
  budget below one layer's experts;
* band: the hit rate's band, the disk's spread over the probe's passes, and +-15% for the compute
  estimate (measured on a probe-sized product, not the model's own).

Fit: dense weights + the expert cache (the budget, or every expert when it holds them all) + the KV
cache for ``ctx`` tokens of each of ``batch`` sequences + a margin (as ``--expert-budget auto``),
against the memory available now (RAM, or with a GPU its memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.bench.forecast import slot_bytes
from engine.bench.machine import MachineProfile
from engine.bench.routing import HitEstimate, estimate, own_traces
from engine.bench.shape import ModelShape, kv_bytes_per_token
from engine.errors import MoeinfError
from engine.trace.format import RoutingTrace

SCHEMA = "moeinf-predict/1"
PREFILL_TOKENS = 512
GEN_TOKENS = 64
COMPUTE_BAND = 0.15
MARGIN_MIN = 512 << 20
MARGIN_SHARE = 0.05


@dataclass(frozen=True)
class Request:
    budget: str = "auto"
    device: str = "cpu"
    batch: int = 1
    ctx: int = 4096
    fmt: str | None = None  # the experts' tensor format (default: as the checkpoint stores them)
    policy: str | None = None
    available: int | None = None  # bytes free to assume (default: what the OS says now)
    prefill_tokens: int = PREFILL_TOKENS  # the prompt length of the prefill line
    gen_tokens: int = GEN_TOKENS  # decode steps the decode figure averages over


def _format_of(shape: ModelShape, fmt: str | None) -> tuple[ModelShape, str]:
    from engine.formats import FORMATS

    if fmt is not None:
        f = FORMATS.get(fmt.lower())
        if f is None:
            raise MoeinfError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return shape.with_expert_format(f.bits_per_weight), f.name
    if shape.expert_format in FORMATS:
        return shape, shape.expert_format
    bits = 8 * shape.expert_bytes / max(1, shape.expert_params)
    nearest = min(FORMATS.values(), key=lambda f: abs(f.bits_per_weight - bits))
    return shape, nearest.name


def _rate(table: dict[str, float], name: str) -> float:
    if name in table:
        return table[name]
    return min(table.values())  # a format the probe did not measure: the slowest measured


def _distinct(num_experts: int, top_k: int, tokens: int) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def predict(
    shape: ModelShape, profile: MachineProfile, req: Request, routing: RoutingTrace | None = None,
    replicas: dict | None = None,
) -> dict:
    """The forecast (schema ``moeinf-predict/1``). ``routing``: a trace to replay for the hit rate
    (``moeinf bench --replay``), else the model's own traces or the family default. ``replicas``: {batch:
    ``ReplicaFit``} of this model (``engine.bench.replica``; else the profile's, if it holds any for it)."""
    import torch

    from engine.memory.budget import fmt_bytes, mem_available, parse_budget, resolve_budget
    from engine.policy.registry import DEFAULT_POLICY, policy_class

    if req.batch < 1:
        raise MoeinfError(f"--batch must be at least 1 (got {req.batch})")
    if req.ctx < 1:
        raise MoeinfError(f"--ctx must be at least 1 token (got {req.ctx})")
    policy = req.policy or DEFAULT_POLICY
    policy_class(policy)
    dev = "cuda" if req.device.startswith("cuda") else "cpu" if req.device in ("cpu", "auto") else None
    if req.device == "auto" and "cuda" in profile.devices:
        dev = "cuda"
    if dev is None:
        raise MoeinfError(f"unknown device {req.device!r}; use cpu, cuda, cuda:N or auto")
    if dev not in profile.devices:
        raise MoeinfError("--device cuda, but this machine has no CUDA GPU; use --device cpu")
    rates = profile.devices[dev]
    shape, fmt = _format_of(shape, req.fmt)
    dense_fmt = "bf16" if shape.dense_bytes <= 2.2 * max(1, shape.dense_params) else "f32"

    spec = parse_budget(req.budget)
    total = shape.expert_bytes_total
    kv_tok = kv_bytes_per_token(shape.config) * req.batch
    kv = kv_tok * req.ctx
    available = req.available if req.available is not None else mem_available(torch.device(dev))
    margin = max(MARGIN_MIN, int(MARGIN_SHARE * available))
    resolved = resolve_budget(spec, total, torch.device(dev), shape.dense_bytes, kv, available)
    budget = total if resolved.bytes is None else min(total, resolved.bytes)
    slots = shape.experts_total if resolved.bytes is None or budget >= total else budget // slot_bytes(shape)
    cache_bytes = slots * shape.expert_bytes
    fraction = slots / shape.experts_total
    need = shape.dense_bytes + cache_bytes + kv + margin
    headroom = available - need
    where = "GPU memory" if dev == "cuda" else "RAM"
    reasons = []
    if slots < shape.top_k:
        reasons.append(
            f"the budget holds {slots} experts ({fmt_bytes(budget)}), below the {shape.top_k} one layer "
            f"uses at once ({fmt_bytes(shape.top_k * shape.expert_bytes)})"
        )
    if shape.dense_bytes + margin > available:
        reasons.append(
            f"the dense weights alone ({fmt_bytes(shape.dense_bytes)}) exceed the {fmt_bytes(available)} "
            f"of {where} available"
        )
    elif shape.dense_bytes + cache_bytes + margin > available:
        reasons.append(
            f"dense weights + expert budget ({fmt_bytes(shape.dense_bytes + cache_bytes)}) exceed the "
            f"{fmt_bytes(available)} of {where} available"
        )
    elif headroom < 0:
        reasons.append(
            f"the KV cache for {req.ctx} tokens ({fmt_bytes(kv)}) does not fit: {fmt_bytes(-headroom)} short"
        )
    max_ctx = max(0, (available - shape.dense_bytes - cache_bytes - margin) // max(1, kv_tok))

    trace, label = routing, "the replayed trace"
    if trace is None and shape.store_name:
        trace, label = (
            own_traces(shape.store_name, shape.moe_layers, shape.num_experts),
            "the model's own traces",
        )
    hit = (
        estimate(fraction, policy, shape.num_experts, trace, label)
        if slots >= shape.top_k
        else HitEstimate(0.0, 0.0, 0.0, "no valid cache")
    )

    bw = profile.disk_bps(shape.expert_bytes)
    latency = profile.read_latency_s
    if replicas is None:
        replicas = profile_replicas(profile, shape, req) if dev == "cpu" else {}
    timed = bool(profile.kernels) or (1 in replicas and req.batch in replicas)
    if dev == "cpu" and timed and slots >= shape.top_k:
        sp = _engine_speeds(shape, profile, req, fmt, None if resolved.bytes is None else slots, trace, hit, policy,
                            replicas)
    else:
        sp = _analytic_speeds(shape, rates, profile, req, fmt, dense_fmt, fraction, hit, dev)
    if sp.get("hit") is not None:
        hit = sp["hit"]
    big_bw = profile.disk_bps(16 << 20)
    cold = shape.dense_bytes / big_bw + cache_bytes / bw + slots * latency / 2

    fits = not reasons
    runs = slots >= shape.top_k  # speeds are forecast whenever the cache can hold one layer's experts
    return {
        "schema": SCHEMA,
        "model": shape.name,
        "source": shape.source,
        "family": shape.family,
        "device": dev,
        "format": fmt,
        "policy": policy,
        "batch": req.batch,
        "ctx": req.ctx,
        "fits": fits,
        "reasons": reasons,
        "memory": {
            "available_bytes": int(available),
            "dense_bytes": int(shape.dense_bytes),
            "expert_budget_bytes": int(cache_bytes),
            "kv_bytes": int(kv),
            "margin_bytes": int(margin),
            "budget_note": resolved.note,
            "headroom_bytes": int(headroom),
            "where": where,
            "ram_bytes": int(profile.ram_bytes),
        },
        "experts": {
            "total": shape.experts_total,
            "bytes_each": int(shape.expert_bytes),
            "slots": int(slots),
            "resident_fraction": fraction,
        },
        "hit_rate": {"expected": hit.hit, "low": hit.low, "high": hit.high, "source": hit.source},
        "batch_hit_rate": sp["batch_hit"].hit if sp.get("batch_hit") is not None else hit.hit,
        "decode_tps": sp["decode"] if runs else None,
        "decode_tps_band": sp["decode_band"] if runs else None,
        "decode_ms_per_token": {"compute": sp["compute_ms"], "loads": sp["loads_ms"]},
        "batch_ms_per_step": {"compute": sp.get("batch_compute_ms", sp["compute_ms"]),
                              "loads": sp.get("batch_loads_ms", sp["loads_ms"])},
        "prefill_tps": sp["prefill"] if runs else None,
        "prefill_tps_band": sp["prefill_band"] if runs else None,
        "prefill_tokens": req.prefill_tokens,
        "batch_tps": sp["batch"] if runs else None,
        "batch_tps_band": sp["batch_band"] if runs else None,
        "cold_start_s": cold,
        "max_ctx": int(max_ctx),
        "timed_by": "replica" if sp.get("replica") else "kernels",
        "machine": {
            "io": profile.io,
            "disk_gbps": bw / 1e9,
            "read_latency_ms": 1e3 * latency,
            "decode_gbps": _rate(rates.decode_bps, fmt) / 1e9,
            "prefill_gflops": _rate(rates.prefill_flops, fmt) / 1e9,
        },
    }


def _analytic_speeds(shape, rates, profile, req, fmt, dense_fmt, fraction, hit, dev) -> dict:
    """Speeds from summary rates (a GPU, or a profile without kernel probes): the weight bytes a step
    multiplies by over the decode rate of their format, or its flops over the prefill rate, the larger,
    plus the demand loads it waits for."""
    dec_dense = _rate(rates.decode_bps, dense_fmt)
    dec_expert = _rate(rates.decode_bps, fmt)
    flops = _rate(rates.prefill_flops, fmt)
    latency = profile.read_latency_s
    bw = profile.disk_bps(shape.expert_bytes)
    if dev == "cuda" and rates.h2d_bps:
        bw = min(bw, rates.h2d_bps)

    def step_s(tokens: int, miss: float, bw_: float) -> tuple[float, float]:
        per_layer = min(_distinct(shape.num_experts, shape.top_k, tokens), shape.num_experts)
        weight_s = (
            shape.dense_bytes / dec_dense + shape.moe_layers * per_layer * shape.expert_bytes / dec_expert
        )
        compute = max(weight_s, 2 * tokens * shape.active_params / flops)
        loads = shape.moe_layers * per_layer * miss
        return compute, loads * (latency + shape.expert_bytes / bw_)

    def rate(tokens: int, h: float, bw_: float, compute_scale: float) -> float:
        c, io = step_s(tokens, 1 - h, bw_)
        return tokens / (c * compute_scale + io)

    spread = profile.read_spread
    decode = rate(1, hit.hit, bw, 1.0)
    decode_low = rate(1, hit.low, bw * (1 - spread), 1 + COMPUTE_BAND)
    decode_high = rate(1, hit.high, bw * (1 + spread), 1 - COMPUTE_BAND)
    c_batch, io_batch = step_s(req.batch, 1 - hit.hit, bw)
    # prefill: the prompt's tokens in one pass; each MoE layer loads the experts it routes to that are not resident
    c_pre = 2 * req.prefill_tokens * shape.active_params / flops
    c_pre = max(c_pre, shape.dense_bytes / dec_dense + shape.expert_bytes_total / dec_expert * fraction)
    touched = shape.moe_layers * _distinct(shape.num_experts, shape.top_k, req.prefill_tokens)
    io_pre = touched * (1 - fraction) * (latency + shape.expert_bytes / bw)
    return {
        "decode": decode, "decode_band": [decode_low, decode_high],
        "batch": req.batch / (c_batch + io_batch), "batch_band": None,
        "prefill": req.prefill_tokens / (c_pre + io_pre), "prefill_band": None,
        "compute_ms": 1e3 * step_s(1, 0, bw)[0], "loads_ms": 1e3 * step_s(1, 1 - hit.hit, bw)[1], "hit": None,
        "batch_hit": None,
    }


def replica_key(store_name: str, dtype: str, batch: int, prompt: int, gen: int) -> str:
    """The key of a replica fit in the machine profile (``MachineProfile.replicas``)."""
    return f"{store_name}|{dtype}|b{batch}|p{prompt}|n{gen}"


def profile_replicas(profile: MachineProfile, shape: ModelShape, req: Request) -> dict:
    """{batch: ReplicaFit} the profile holds for this store model at the request's batch sizes and lengths."""
    from engine.bench.replica import ReplicaFit

    held = getattr(profile, "replicas", None) or {}
    if not shape.store_name or not held:
        return {}
    out = {}
    for b in {1, req.batch}:
        d = held.get(replica_key(shape.store_name, shape.compute_dtype, b, req.prefill_tokens, req.gen_tokens))
        if d is not None:
            out[b] = ReplicaFit.from_dict(d)
    return out


def _engine_speeds(shape, profile, req, fmt, capacity, trace, hit, policy, replicas=None) -> dict:
    """Speeds from the engine's probed kernels and a dry run of its cache (``engine.bench.forecast``); with
    ``replicas`` ({batch: ReplicaFit}), the replica's fit times the forwards of those batch sizes."""
    from engine.bench.cost import Costs
    from engine.bench.forecast import Access, speeds

    dense_fmt, head_fmt = _dense_formats(shape)
    cached = shape.expert_bytes_total if capacity is None else capacity * slot_bytes(shape)
    # without kernel probes (a replica times every forward) the costs are not needed
    costs = Costs.of(shape, profile, fmt, dense_fmt, head_fmt, working_set=shape.dense_bytes + cached) \
        if profile.kernels else None
    kw = {}
    if shape.store_name and shape.source == "store" and profile.kernels:  # a profile measured here (not a given one)
        from engine.store.paths import models_dir

        root = models_dir() / shape.store_name
        kw = {"model_name": shape.store_name, "model_root": root, "config": shape.config}
    access = Access(trace, (hit.hit, hit.low, hit.high), policy, kw)
    replicas = replicas or {}
    one = speeds(shape, profile, costs, 1, req.prefill_tokens, req.gen_tokens, capacity, access, replicas.get(1))
    many = one if req.batch == 1 else speeds(shape, profile, costs, req.batch, req.prefill_tokens, req.gen_tokens,
                                              capacity, access, replicas.get(req.batch))
    source = hit.source if trace is None else f"{hit.source}, run through the engine's cache"
    return {
        "decode": one.decode_tps, "decode_band": list(one.decode_band),
        "batch": many.decode_tps, "batch_band": list(many.decode_band),
        "prefill": one.prefill_tps if req.batch == 1 else many.prefill_tps,
        "prefill_band": list(one.prefill_band if req.batch == 1 else many.prefill_band),
        "compute_ms": one.compute_ms, "loads_ms": one.loads_ms,
        "batch_compute_ms": many.compute_ms, "batch_loads_ms": many.loads_ms,
        "hit": HitEstimate(*one.hit, source) if capacity is not None else None,
        "batch_hit": HitEstimate(*many.hit, source) if capacity is not None else None,
        "replica": replicas.get(req.batch) is not None,
    }


def _dense_formats(shape: ModelShape) -> tuple[str, str]:
    """The nearest formats of the decoder layers' dense weights and of the LM head, by bytes per weight."""
    from engine.formats import FORMATS

    def nearest(nbytes: int, params: int) -> str:
        bits = 8 * nbytes / max(1, params)
        return min(FORMATS.values(), key=lambda f: abs(f.bits_per_weight - bits)).name

    head_params = shape.head_params or max(1, shape.head_bytes // 2)
    layer_params = max(1, shape.dense_params - head_params - (0 if shape.head_tied else shape.embed_bytes * head_params // max(1, shape.head_bytes)))
    return nearest(shape.layer_dense_bytes, layer_params), nearest(shape.head_bytes, head_params)


def bench_row_forecast(
    model, row: dict, prompt_tokens: int, gen_tokens: int, routing: RoutingTrace | None = None,
    shape: ModelShape | None = None, profile: MachineProfile | None = None, dtype: str | None = None,
    replicas: dict | None = None,
) -> dict:
    """``moeinf predict``'s forecast of one ``moeinf bench`` row (its budget, policy and batch, the bench's
    prompt and decode lengths; ``dtype``: the bench's ``--dtype``, else the model's default): aggregate
    decode tokens/s with its band, prefill tokens/s with its band, the decode-phase hit rate. The memory is
    not checked (the bench ran, so it fitted)."""
    from dataclasses import replace

    from engine.bench.machine import machine_profile
    from engine.bench.shape import read_shape
    from engine.policy.registry import POLICY_NAMES

    shape = shape or read_shape(str(model))
    if dtype is not None:
        shape = replace(shape, compute_dtype=_act_name(dtype))
    profile = profile or machine_profile()[0]
    policy = row["policy"] if row["policy"] in POLICY_NAMES else None
    req = Request(budget=row["budget"], batch=row["batch"], ctx=prompt_tokens + gen_tokens + 1, policy=policy,
                  available=1 << 50, prefill_tokens=prompt_tokens, gen_tokens=gen_tokens)
    p = predict(shape, profile, req, routing, replicas)
    band = p["batch_tps_band"]
    if band is None and p["decode_tps_band"]:
        scale = p["batch_tps"] / p["decode_tps"] if p["decode_tps"] else 1.0
        band = [scale * x for x in p["decode_tps_band"]]
    return {
        "decode_tps": p["batch_tps"],
        "decode_band": band,
        "prefill_tps": p["prefill_tps"],
        "prefill_band": p["prefill_tps_band"] or [p["prefill_tps"], p["prefill_tps"]],
        "hit_rate": p["batch_hit_rate"],
        "hit_source": p["hit_rate"]["source"],
        "step_ms": p["batch_ms_per_step"],  # the point forecast's decode step: compute and the loads waited for
        "timed_by": p["timed_by"],  # "replica" (engine.bench.replica) or "kernels" (the kernel probes)
    }


def replace_batch(req: Request, batch: int) -> Request:
    from dataclasses import replace

    return replace(req, batch=batch)


def _act_name(dtype: str) -> str:
    """The profile's activation name ("bf16" or "f32") of a ``--dtype`` value."""
    name = str(dtype).lower().removeprefix("torch.")
    return "f32" if name in ("float32", "f32", "fp32") else "bf16"


def bench_forecasts(
    model_root, rows: list[dict], prompt_tokens: int, gen_tokens: int, routing: RoutingTrace | None = None,
    dtype: str | None = None,
) -> None:
    """Add the forecast of ``moeinf predict`` to each ``moeinf bench`` row (in place): ``forecast_tps``
    (aggregate decode tokens/s at the row's batch) and ``forecast_band``, ``forecast_prefill_tps`` and
    ``forecast_prefill_band``."""
    from engine.bench.machine import machine_profile
    from engine.bench.shape import read_shape

    shape = read_shape(str(model_root))
    if dtype is not None:
        from dataclasses import replace

        shape = replace(shape, compute_dtype=_act_name(dtype))
    profile, _ = machine_profile()
    replicas: dict = {}
    if shape.store_name and shape.source == "store" and profile.kernels:  # a profile measured here (not a given one)
        # the replica probe (engine.bench.replica) of this model at each batch size, measured now unless the
        # profile holds it for these lengths (``moeinf predict --reprobe`` drops it)
        from engine.bench.replica import calibrate

        batches = sorted({int(r["batch"]) for r in rows})
        req = Request(batch=max(batches), prefill_tokens=prompt_tokens, gen_tokens=gen_tokens)
        held = {b: f for b in batches for f in [profile_replicas(profile, shape, replace_batch(req, b)).get(b)] if f}
        missing = [b for b in batches if b not in held]
        if missing:
            budgets = sorted({r["budget"] for r in rows if r["budget"].endswith("%") and r["budget"] != "100%"})
            if any(r.get("budget_bytes") is not None for r in rows) and not budgets:
                budgets = ["25%"]  # budgets as sizes: the replica's loads at a quarter of its experts
            held.update(calibrate(str(model_root), missing, prompt_tokens, gen_tokens, budgets, routing,
                                  dtype or "bfloat16"))
        replicas = held
    for row in rows:
        fc = bench_row_forecast(model_root, row, prompt_tokens, gen_tokens, routing, shape, profile, dtype,
                                replicas={b: f for b, f in replicas.items() if b in (1, row["batch"])})
        row["forecast_tps"] = fc["decode_tps"]
        row["forecast_band"] = fc["decode_band"]
        row["forecast_prefill_tps"] = fc["prefill_tps"]
        row["forecast_prefill_band"] = fc["prefill_band"]

"""``moeinf bench`` end to end: resolve the model (or make a synthetic one), run every configuration,
probe the machine, and return the JSON document of ``engine.bench.report``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.bench.report import row_dict
from engine.bench.runner import BenchConfig, run_config
from engine.errors import MoeinfError


def configurations(budgets: list[str], policies: list[str]) -> list[BenchConfig]:
    """Each budget x each policy; a 100% budget is one all-resident row."""
    from engine.memory.budget import parse_budget
    from engine.policy.registry import policy_class

    if not budgets:
        raise MoeinfError("--expert-budget needs at least one value, e.g. 100%,25%")
    for p in policies:
        policy_class(p)  # a one-line error for an unknown name, before any work
    out: list[BenchConfig] = []
    for b in budgets:
        parse_budget(b)
        if b.strip() == "100%":
            out.append(BenchConfig("100%", None))
        else:
            if not policies:
                raise MoeinfError("--policy needs at least one name, e.g. lru,eam")
            out.extend(BenchConfig(b, p) for p in policies)
    return out


def bench_main(
    *,
    model: str | None,
    synthetic: str | None,
    scale: float,
    prompt_tokens: int,
    gen_tokens: int,
    repetitions: int,
    budgets: list[str],
    policies: list[str],
    replay: str | None,
    profile: bool,
    dtype: str | None,
    device: str,
    seed: int = 0,
    batches: list[int] | None = None,
    progress: Callable[[str], None] | None = None,
    activations: str = "auto",
) -> dict:
    from engine.runtime.devices import resolve_device, resolve_dtype
    from engine.store.opened import open_model

    say = progress or (lambda _msg: None)
    from engine.formats.linear import check_activations

    try:
        activations = check_activations(activations)
    except ValueError as e:
        raise MoeinfError(str(e)) from None
    if repetitions < 1 or gen_tokens < 1 or prompt_tokens < 1:
        raise MoeinfError("-p, -n and -r must be at least 1")
    batches = list(batches or [1])
    if any(b < 1 for b in batches):
        raise MoeinfError(f"batch sizes must be at least 1, got {','.join(map(str, batches))}")
    configs = configurations(budgets, policies)
    if synthetic is not None:
        from engine.bench.synthetic import make_synthetic_from_shape, synthetic_shape

        shape = synthetic_shape(synthetic, scale)
        name = f"synthetic-{synthetic}-x{scale:g}"
        say(f"synthetic model {name} (created once in the store) ...")
        store = open_model(make_synthetic_from_shape(name, shape))
    else:
        store = open_model(model)
    root, layout = store.root, store.layout
    if not layout.is_moe:
        raise MoeinfError(f"{store.name} is a dense model: moeinf bench measures MoE models")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, store.stored_dtype, dev)
    trace = None
    if replay is not None:
        from engine.trace.format import load_trace

        trace = load_trace(replay)
        need = prompt_tokens + gen_tokens
        if trace.num_tokens < need:
            raise MoeinfError(f"the trace has {trace.num_tokens} tokens but -p {prompt_tokens} + -n {gen_tokens} "
                              f"= {need}; lower -p/-n (e.g. -p 1 -n {trace.num_tokens - 1})")
    rows = []
    for b in batches:
        for cfg in configs:
            say(f"batch {b}, budget {cfg.budget}, policy {cfg.policy or '-'}: {repetitions} runs ...")
            rows.append(run_config(store, cfg, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=repetitions,
                                   dtype=torch_dtype, device=dev, trace=trace, seed=seed, batch=b,
                                   activations=activations))
    probe = None
    compute: dict[int, float] = {}  # per batch size: the all-resident row's step time without stalls
    if profile:
        from engine.bench.probe import probe_disk_median

        say("probing disk bandwidth ...")
        probe = probe_disk_median(root, layout.moe_layers, layout.num_experts)
        probe.observed_bps = max((r.observed_bps for r in rows), default=0.0)
        for b in batches:
            same = [r for r in rows if r.batch == b]
            resident = [r for r in same if r.budget_bytes is None]
            compute[b] = resident[0].compute_s if resident else min(r.compute_s for r in same)
    compute_s = compute.get(batches[0])
    row_dicts = [row_dict(r, probe, compute.get(r.batch)) for r in rows]
    if profile:
        from engine.bench.predict import bench_forecasts

        say("forecasting each row (moeinf predict's model) ...")
        bench_forecasts(root, row_dicts, prompt_tokens, gen_tokens, trace, str(torch_dtype))
    return {
        "schema": "moeinf-bench/1",
        "model": root.name,
        "family": layout.family,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "activations": activations,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repetitions": repetitions,
        "replay": replay,
        "probe": probe.as_dict() if probe else None,
        "compute_ms_per_token": 1e3 * compute_s if compute_s is not None else None,
        "batches": batches,
        "rows": row_dicts,
    }

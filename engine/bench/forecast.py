"""Decode, prefill and batch speeds of ``moeinf predict`` on the CPU: a run's forwards, their accesses, their time.

1. **The forwards** of a run as ``moeinf bench`` makes them (``engine.bench.runner.bench_forwards``): the
   prompts prefilled (several in one forward when they fit 512 tokens), then ``gen`` decode steps of every
   sequence at once.
2. **Their accesses** (``engine.bench.simulate``): with a routing trace (one replayed by ``bench --replay``,
   or the model's own recorded traces) the engine's budgeted cache is run through the forwards dry, twice:
   with prefetching (the point) and without (the band's other end). Without a trace, each layer's experts
   are ``E (1 - (1 - k/E)^T)`` for ``T`` tokens and its misses that times the routing model's miss rate
   (``engine.bench.routing``; a prefill starts from a cold cache, so it misses all that is not resident).
3. **Their time** (``engine.bench.cost``) from the machine profile: the engine's kernels and overhead, and
   the disk; and the policy's own work on each forward's requests beyond ``lru``'s (the overhead probe's
   cache runs lru), as the dry run timed it (the trace-driven policy matches the request against the stored
   traces at every layer: about a millisecond a layer on this VM).

The point forecast's compute is the probes' fastest passes times their median pass over their fastest
(``MachineProfile.compute_typical``: a bench reports a mean over its steps, which the machine's other work
slows as it slowed the probes' typical pass). The band: compute from the fastest passes less the probes'
spread over their passes (at least ``COMPUTE_BAND``) to the typical pass plus it, loads times the disk's
spread, and the two access counts (or the routing model's hit-rate band).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.bench.cost import Costs, forward_time
from engine.bench.simulate import Forward, LayerAccess, simulate

COMPUTE_BAND = 0.15
REPLICA_BAND = 0.15  # the least a replica forecast's band spans either side (its passes' spread, doubled, if more)
PREFILL_CHUNK = 512
TIMING_RUNS = 2  # dry runs the policy's own work is timed over (the fastest of them)
BASE_POLICY = "lru"  # the policy of the overhead probe's cache (``engine.bench.kernels.probe_overhead``)


def slot_bytes(shape) -> int:
    """Bytes of one cache slot: the shard's image rounded up to pages, plus a page (``DirectTransfer``)."""
    page = 4096
    return -(-shape.shard_bytes // page) * page + page


@dataclass
class Access:
    """Where the accesses come from: a routing trace, or a hit rate (expected, low, high)."""

    trace: object | None = None
    hit: tuple[float, float, float] = (1.0, 1.0, 1.0)
    policy: str | None = None
    policy_kw: dict | None = None


def _distinct(num_experts: int, top_k: int, tokens: int) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def _analytic(shape, plan, fraction: float, hit: float) -> list[Forward]:
    out = []
    k, E = shape.top_k, shape.num_experts
    for phase, rows, seqs in plan:
        T = len(rows)
        n = k if T == 1 else min(E, _distinct(E, k, T))
        miss = (1 - fraction) if phase == "prefill" else (1 - hit)
        count = max(1, round(n))
        tokens = [max(1, round(T * k / n))] * count
        layers = [LayerAccess(count, miss * n, tokens) for _ in range(shape.moe_layers)]
        out.append(Forward(phase, T, seqs, layers))
    return out


def run_forwards(shape, batch: int, prompt: int, gen: int, capacity: int | None, access: Access,
                 prefetch: bool = True, hit_index: int = 0, time_policy: bool = True) -> list[Forward]:
    """The forwards of a run with their accesses (see the module doc); ``time_policy``: time the policy's own
    work beyond lru's (else ``policy_extra_s`` stays 0, for the caller to set)."""
    from engine.bench.runner import bench_forwards
    from engine.store.families import moe_layout

    trace = access.trace
    T = trace.num_tokens if trace is not None else 1
    starts = [(i * T) // batch for i in range(batch)]
    plan = bench_forwards(batch, prompt, gen, T, starts)
    if capacity is None:
        fraction = 1.0
    else:
        fraction = capacity / max(1, shape.experts_total)
    if trace is None or capacity is None:
        if trace is not None:  # everything resident: the trace only tells how many experts each layer runs
            return simulate(plan, trace.expert_ids, list(range(shape.moe_layers)), shape.num_experts, shape.top_k,
                            None, None)
        return _analytic(shape, plan, fraction, access.hit[hit_index] if capacity is not None else 1.0)
    layers = moe_layout(shape.config).moe_layers
    args = (plan, trace.expert_ids, list(layers), shape.num_experts, shape.top_k, capacity)
    kw = {"slot_bytes": slot_bytes(shape), "file_bytes": shape.shard_bytes, "prefetch": prefetch}
    out = simulate(*args, access.policy, policy_kw=access.policy_kw, **kw)
    if access.policy != BASE_POLICY and time_policy:
        # the policy's own work beyond the overhead probe's (whose cache runs lru): timed on the same requests,
        # each forward the fastest of TIMING_RUNS dry runs (as the probes: other work on a shared machine only
        # slows a run, and a burst of it can slow a whole run several-fold), then the median of each phase's
        # forwards
        base = simulate(*args, BASE_POLICY, **kw)
        for _ in range(TIMING_RUNS - 1):
            again = simulate(*args, access.policy, policy_kw=access.policy_kw, **kw)
            again_base = simulate(*args, BASE_POLICY, **kw)
            for f, g in zip(out, again, strict=True):
                f.book_s = min(f.book_s, g.book_s)
            for f, g in zip(base, again_base, strict=True):
                f.book_s = min(f.book_s, g.book_s)
        for phase in ("prefill", "decode"):
            pairs = [(f, b) for f, b in zip(out, base, strict=True) if f.phase == phase]
            if pairs:
                extra = max(0.0, float(np.median([f.book_s - b.book_s for f, b in pairs])))
                for f, _ in pairs:
                    f.policy_extra_s = extra
    return out


@dataclass
class PhaseTimes:
    prefill_s: float
    decode_steps: list[tuple[float, float]]  # (compute, io) of each decode step
    decode_hits: float  # hit rate of the decode phase

    @property
    def step_s(self) -> float:
        return float(np.mean([c + i for c, i in self.decode_steps])) if self.decode_steps else 0.0


def phase_times(shape, costs: Costs, forwards: list[Forward], offloaded: bool,
                compute_scale: float = 1.0, io_scale: float = 1.0) -> PhaseTimes:
    prefill = 0.0
    steps = []
    acc = miss = 0.0
    for f in forwards:
        t = forward_time(shape, costs, f, offloaded)
        total = t.compute_s * compute_scale + t.io_s * io_scale
        if f.phase == "prefill":
            prefill += total
        else:
            steps.append((t.compute_s * compute_scale, t.io_s * io_scale))
            acc += sum(la.experts for la in f.layers)
            miss += sum(la.misses for la in f.layers)
    return PhaseTimes(prefill, steps, 1 - miss / acc if acc else 1.0)


def decode_hits(forwards: list[Forward]) -> float:
    """The decode phase's hit rate of a run's forwards."""
    acc = sum(la.experts for f in forwards if f.phase == "decode" for la in f.layers)
    miss = sum(la.misses for f in forwards if f.phase == "decode" for la in f.layers)
    return 1 - miss / acc if acc else 1.0


@dataclass
class Speeds:
    decode_tps: float  # aggregate tokens/s of the batch's decode
    decode_band: tuple[float, float]
    prefill_tps: float
    prefill_band: tuple[float, float]
    hit: tuple[float, float, float]  # decode-phase hit rate: expected, low, high
    compute_ms: float  # per decode step, without loads
    loads_ms: float


def replica_times(shape, fit, forwards: list[Forward], offloaded: bool,
                  scale: float = 1.0, load_scale: float = 1.0) -> PhaseTimes:
    """The phases' times from the replica's fit (``engine.bench.replica``): each decode step the fitted step of
    a model of ``shape.num_layers`` decoder layers with the dry run's demand and prefetch loads, plus the
    policy's own work beyond lru's; the prefill the fitted resident prefill plus the dry run's prefill loads at
    the replica's prefill cost per load. ``scale``
    multiplies the compute, ``load_scale`` the loads' cost (the band)."""
    L = shape.num_layers
    steps = []
    acc = miss = 0.0
    prefill_loads = 0.0
    n_prefill = 0
    for f in forwards:
        if f.phase == "prefill":
            prefill_loads += sum(la.misses for la in f.layers) + f.prefetch_loads
            n_prefill += 1
            continue
        demand = sum(la.misses for la in f.layers)
        base = fit.step_s(L, offloaded)
        loads = (demand * fit.demand_s + f.prefetch_loads * fit.prefetch_s) if offloaded else 0.0
        steps.append((base * scale + f.policy_extra_s, loads * load_scale))
        acc += sum(la.experts for la in f.layers)
        miss += demand
    # the replica timed the run's whole prefill (every group of prompts) as one figure
    prefill = (fit.prefill_s(L) * scale + fit.prefill_load_s * prefill_loads * load_scale) if n_prefill else 0.0
    return PhaseTimes(prefill, steps, 1 - miss / acc if acc else 1.0)


def speeds(shape, profile, costs: Costs, batch: int, prompt: int, gen: int, capacity: int | None,
           access: Access, replica=None) -> Speeds:
    """Decode and prefill speeds of a run (see the module doc); ``replica``: a ``ReplicaFit`` of this model at
    this batch (``engine.bench.replica``), which then times the forwards instead of the kernel rates."""
    offloaded = capacity is not None
    point_f = run_forwards(shape, batch, prompt, gen, capacity, access, prefetch=True, hit_index=0)
    if access.trace is not None:
        # the same requests without prefetching: the policy's own work as timed on the point's run
        other_f = run_forwards(shape, batch, prompt, gen, capacity, access, prefetch=False, time_policy=False)
        extra = {f.phase: f.policy_extra_s for f in point_f}
        for f in other_f:
            f.policy_extra_s = extra.get(f.phase, 0.0)
        lo_f, hi_f = point_f, other_f
    else:
        lo_f = run_forwards(shape, batch, prompt, gen, capacity, access, hit_index=1)
        hi_f = run_forwards(shape, batch, prompt, gen, capacity, access, hit_index=2)
    if replica is not None:
        cs = max(REPLICA_BAND, 2 * replica.spread)
        ls = max(REPLICA_BAND, 2 * replica.offload_spread, profile.read_spread)
        point = replica_times(shape, replica, point_f, offloaded)
        variants = [point]
        for fw in (lo_f, hi_f):
            for c, i in ((1 + cs, 1 + ls), (1 / (1 + cs), 1 / (1 + ls))):  # a time never falls below zero
                variants.append(replica_times(shape, replica, fw, offloaded, c, i))
    else:
        cs = max(COMPUTE_BAND, profile.compute_spread)
        ds = profile.read_spread
        typ = max(1.0, getattr(profile, "compute_typical", 1.0))  # the probes' rates are their fastest passes
        point = phase_times(shape, costs, point_f, offloaded, typ)
        variants = [point]
        for fw in (lo_f, hi_f):
            for c, i in ((typ * (1 + cs), 1 + ds), (1 - cs, 1 - ds)):
                variants.append(phase_times(shape, costs, fw, offloaded, c, i))
    tokens = batch * prompt

    def tps(p: PhaseTimes) -> float:
        return batch / p.step_s if p.step_s else 0.0

    def pps(p: PhaseTimes) -> float:
        return tokens / p.prefill_s if p.prefill_s else 0.0

    hits = [decode_hits(fw) for fw in (point_f, lo_f, hi_f)]
    return Speeds(
        decode_tps=tps(point),
        decode_band=(min(tps(v) for v in variants), max(tps(v) for v in variants)),
        prefill_tps=pps(point),
        prefill_band=(min(pps(v) for v in variants), max(pps(v) for v in variants)),
        hit=(hits[0], min(hits), max(hits)),
        compute_ms=1e3 * float(np.mean([c for c, _ in point.decode_steps])) if point.decode_steps else 0.0,
        loads_ms=1e3 * float(np.mean([i for _, i in point.decode_steps])) if point.decode_steps else 0.0,
    )

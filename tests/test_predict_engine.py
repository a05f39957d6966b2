"""`moeinf predict`'s engine model: the dry run of the expert cache, the kernel rates, the forward-time model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.bench.kernels import Rates
from engine.bench.machine import MachineProfile, code_key, machine_key
from engine.trace.format import RoutingTrace

LAYERS, EXPERTS, K = 3, 8, 2


def _trace(tokens: int, layers: int = LAYERS, experts: int = EXPERTS, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(experts, K, replace=False) for _ in range(tokens * layers)])
    return RoutingTrace(ids.reshape(tokens, layers, K), experts)


@pytest.fixture()
def synth(_isolated_home):
    from engine.bench.synthetic import make_synthetic_model

    return make_synthetic_model("synth-pe", num_layers=LAYERS, num_experts=EXPERTS, top_k=K, hidden=64,
                                intermediate=128, vocab=256, dtype=torch.bfloat16)


@pytest.mark.parametrize("batch", [1, 4])
def test_dry_cache_loads_what_the_live_cache_loads(synth, batch):
    """The routing model runs the engine's own cache without I/O: over a bench run's forwards it misses
    exactly the experts the live cache loads (lru: no prefetching, so nothing depends on timing)."""
    from engine.bench.forecast import slot_bytes
    from engine.bench.runner import BenchConfig, bench_forwards, run_config
    from engine.bench.shape import read_shape
    from engine.bench.simulate import simulate
    from engine.store.opened import open_model

    trace = _trace(20)
    store = open_model(synth)
    row = run_config(store, BenchConfig("40%", "lru"), prompt_tokens=3, gen_tokens=6, reps=1,
                     dtype=torch.bfloat16, device=torch.device("cpu"), trace=trace, batch=batch)
    shape = read_shape(str(synth))
    assert slot_bytes(shape) == row.expert_bytes  # the forecast's slot is the cache's
    T = trace.num_tokens
    plan = bench_forwards(batch, 3, 6, T, [(i * T) // batch for i in range(batch)])
    capacity = row.budget_bytes // row.expert_bytes
    fwd = simulate(plan, trace.expert_ids, list(range(LAYERS)), EXPERTS, K, capacity, "lru", slot_bytes(shape),
                   shape.shard_bytes)
    misses = sum(la.misses for f in fwd for la in f.layers)
    live = row.total_counter("demand_loads") + row.total_counter("prefetch_loads")
    assert misses == live > 0
    decode = [f for f in fwd if f.phase == "decode"]
    assert len(decode) == 6 and all(f.tokens == batch for f in decode)


def test_rates_interpolate_in_tokens_and_scale_with_bytes():
    r = Rates([1, 4, 16], [1e-9, 2e-9, 4e-9], [1e-4, 2e-4, 3e-4])
    assert r.seconds(1000, 1) == pytest.approx(1e-4 + 1e-6)
    assert r.seconds(1000, 2) == pytest.approx(1.5e-4 + 1.5e-6)  # halfway in log(tokens)
    assert r.seconds(2000, 16) - r.seconds(1000, 16) == pytest.approx(4e-6)
    assert r.seconds(1000, 32) == pytest.approx(3e-4 + 2 * 4e-6)  # beyond the grid: per byte grows with tokens


def fake_kernels() -> dict:
    def pair(decode: float, major: float) -> dict:
        return {
            "experts": {
                "decode": Rates([1], [decode], [2e-5]),
                "major": Rates([1, 16, 128], [major, major * 2, major * 12], [5e-5, 6e-5, 8e-5]),
            },
            "dense": Rates([1, 16, 256], [decode, decode * 3, decode * 40], [0.0, 0.0, 0.0]),
        }

    return {"bf16/bf16": pair(2e-10, 4e-10), "q4_k/bf16": pair(4e-10, 8e-10), "f32/f32": pair(3e-10, 5e-10)}


def engine_profile(disk_gbps: float = 2.0) -> MachineProfile:
    from test_predict import profile

    p = profile(disk_gbps)
    p.kernels = fake_kernels()
    p.overhead = {"mixtral": {"resident": [1e-4, 1e-5, 1e-6], "offload": [2e-4, 1e-5, 1e-6]}}
    p.read_bps_single = {k: v / 1.5 for k, v in p.read_bps.items()}
    p.compute_spread = 0.1
    return p


def test_disk_rate_between_probed_request_sizes():
    """A request between two probed sizes takes a time affine in its size between theirs (latency plus
    bytes over bandwidth), not the smaller size's bandwidth (900 KiB at 64 KiB's rate: twice too slow)."""
    p = engine_profile()
    p.read_bps = {str(64 << 10): 0.5e9, str(1 << 20): 1.0e9, str(4 << 20): 1.2e9}
    assert p.disk_bps(64 << 10) == 0.5e9 and p.disk_bps(1 << 20) == 1.0e9
    assert p.disk_bps(1 << 10) == 0.5e9 and p.disk_bps(64 << 20) == 1.2e9  # outside: the nearest size's
    mid = (64 << 10) + ((1 << 20) - (64 << 10)) // 2
    t = ((64 << 10) / 0.5e9 + (1 << 20) / 1.0e9) / 2
    assert p.disk_bps(mid) == pytest.approx(mid / t)
    assert 0.5e9 < p.disk_bps(900 << 10) < 1.0e9
    assert p.disk_bps(2 << 20) > p.disk_bps(1 << 20)


def test_profile_round_trip_and_key():
    p = engine_profile()
    q = MachineProfile.from_dict(json.loads(json.dumps(p.as_dict())))
    assert q.kernels["q4_k/bf16"]["experts"]["major"] == p.kernels["q4_k/bf16"]["experts"]["major"]
    assert q.overhead == p.overhead and q.disk_single_bps(1 << 20) == p.disk_single_bps(1 << 20)
    assert machine_key().endswith(code_key())  # a change to the engine's compute code measures again


def test_engine_forecast_follows_budget_batch_and_disk():
    from test_predict import MIXTRAL, mixtral_tensors

    from engine.bench.predict import Request, predict
    from engine.bench.shape import shape_from

    tensors = {k: (int(np.prod(s)) * 2, int(np.prod(s))) for k, (s, _) in mixtral_tensors().items()}
    shape = shape_from("mixtral", "hub", MIXTRAL, tensors)
    trace = _trace(40, layers=32)
    prof = engine_profile()

    def run(budget: str, batch: int = 1, disk: float = 2.0) -> dict:
        return predict(shape, engine_profile(disk) if disk != 2.0 else prof,
                       Request(budget=budget, batch=batch, available=1 << 50, prefill_tokens=8, gen_tokens=8),
                       trace)

    full, half, tenth = run("100%"), run("50%"), run("10%")
    assert full["hit_rate"]["expected"] == 1.0 and full["decode_ms_per_token"]["loads"] == 0
    assert full["decode_tps"] > half["decode_tps"] > tenth["decode_tps"]
    assert 0 < tenth["hit_rate"]["expected"] < half["hit_rate"]["expected"] < 1
    assert "run through the engine's cache" in half["hit_rate"]["source"]
    for p in (full, half, tenth):
        lo, hi = p["decode_tps_band"]
        assert lo <= p["decode_tps"] <= hi
        plo, phi = p["prefill_tps_band"]
        assert plo <= p["prefill_tps"] <= phi
    assert run("100%", batch=16)["batch_tps"] > full["decode_tps"]  # a batch shares each expert's weights
    assert run("25%", disk=8.0)["decode_tps"] > run("25%")["decode_tps"]
    assert full["prefill_tps"] > half["prefill_tps"]  # a cold cache loads the prompt's experts


def test_kernel_probes_time_the_engines_code(monkeypatch):
    """The probes run the MoE block and the dense product of the engine (tiny sizes here)."""
    import engine.bench.kernels as kernels

    monkeypatch.setattr(kernels, "_SIZES", ((64, 64), (128, 128)))
    monkeypatch.setattr(kernels, "_POOL_BYTES", 1 << 20)
    experts, spread = kernels.probe_experts("bf16", "bf16", tokens=(1, 4))
    assert experts["decode"].tokens == [1] and experts["major"].tokens == [1, 4]
    assert experts["python"].tokens == [1] and experts["python"].per_byte[0] > 0  # the Python path, one token
    assert all(v > 0 for v in experts["major"].per_byte) and all(v >= 0 for v in experts["major"].fixed)
    dense, _ = kernels.probe_dense("q4_k", "bf16", rows=(1, 8))
    assert dense.tokens == [1, 8] and all(v > 0 for v in dense.per_byte)
    assert spread >= 0


def test_mixed_format_experts_cost_each_matrix_at_its_format(_isolated_home, tmp_path):
    """A q4_k pull keeps a matrix whose rows are not whole q4_k blocks (down_proj over 96 intermediate
    values) in bf16: the shape lists each matrix's format, and the forecast costs such an expert on the
    Python path (the one-token native call declines it), each matrix at its own format's product rate."""
    from engine.bench.cost import Costs
    from engine.bench.shape import read_shape
    from engine.bench.synthetic import make_synthetic_model
    from engine.store.export import export_model
    from engine.store.pull import pull_model

    make_synthetic_model("mx-bf16", num_layers=2, num_experts=4, top_k=2, hidden=256, intermediate=96, vocab=256,
                         dtype=torch.bfloat16)
    pull_model(str(export_model("mx-bf16", tmp_path / "ckpt")), name="mx-q4", quantize="q4_k")
    shape = read_shape("mx-q4")
    formats = sorted(f for f, _ in shape.expert_matrices)
    assert formats == ["bf16", "q4_k", "q4_k"] and shape.expert_format is None
    assert sum(b for _, b in shape.expert_matrices) == shape.expert_bytes
    prof = engine_profile()
    for ex in prof.kernels.values():
        ex["experts"]["python"] = Rates([1], [1e-9], [3e-5])
    costs = Costs.of(shape, prof, "q4_k", "bf16", "bf16")
    k = prof.kernels
    for tokens, one in ((1, True), (4, False)):
        path = "python" if one else "major"
        want = sum(k[f"{f}/bf16"]["dense"].seconds(b, tokens) + k[f"{f}/bf16"]["experts"][path].seconds(0, tokens) / 3
                   for f, b in shape.expert_matrices)
        assert costs.expert_seconds(shape.expert_bytes, tokens, one) == pytest.approx(want)
    uniform = Costs.of(read_shape("mx-bf16"), prof, "bf16", "bf16", "bf16")
    assert not uniform.mixed
    assert uniform.expert_seconds(1000, 1, True) == pytest.approx(k["bf16/bf16"]["experts"]["decode"].seconds(1000, 1))


def test_the_policys_own_work_is_timed_on_the_dry_run_and_added_to_compute(synth):
    """A policy other than lru (the overhead probe's) costs its own work on each forward's requests, as the
    dry run times it against lru on the same requests (one figure a phase); forward_time adds it."""
    from dataclasses import replace

    from engine.bench.cost import Costs, forward_time
    from engine.bench.forecast import Access, run_forwards
    from engine.bench.shape import read_shape

    shape = read_shape(str(synth))
    trace = _trace(20)
    lru = run_forwards(shape, 1, 3, 6, 10, Access(trace, policy="lru"))
    eam = run_forwards(shape, 1, 3, 6, 10, Access(trace, policy="eam"))
    assert all(f.book_s > 0 for f in lru + eam)
    assert all(f.policy_extra_s == 0 for f in lru)
    decode = [f for f in eam if f.phase == "decode"]
    assert len({f.policy_extra_s for f in decode}) == 1 and decode[0].policy_extra_s >= 0
    costs = Costs.of(shape, engine_profile(), "bf16", "bf16", "bf16")
    f = replace(decode[0], policy_extra_s=0.0)
    slow = replace(f, policy_extra_s=0.25)
    assert forward_time(shape, costs, slow, True).compute_s == pytest.approx(
        forward_time(shape, costs, f, True).compute_s + 0.25)


def test_the_probes_typical_pass_scales_the_point_and_widens_the_band():
    """The probes' rates are their fastest passes; a bench reports a mean over its steps, so the point forecast
    takes the probes' median pass over their fastest (``compute_typical``) and the band spans both."""
    from test_predict import MIXTRAL, mixtral_tensors

    import engine.bench.kernels as kernels
    from engine.bench.predict import Request, predict
    from engine.bench.shape import shape_from

    kernels._TYPICAL.clear()
    kernels._spread([1.0, 1.5, 2.0])
    kernels._spread([2.0, 2.2, 3.0])
    assert kernels.typical_slowdown() == pytest.approx((1.5 + 1.1) / 2)
    tensors = {k: (int(np.prod(s)) * 2, int(np.prod(s))) for k, (s, _) in mixtral_tensors().items()}
    shape = shape_from("mixtral", "hub", MIXTRAL, tensors)
    req = Request(budget="100%", available=1 << 50, prefill_tokens=8, gen_tokens=4)
    quiet, busy = engine_profile(), engine_profile()
    busy.compute_typical = 1.5
    a, b = predict(shape, quiet, req), predict(shape, busy, req)
    assert b["decode_tps"] == pytest.approx(a["decode_tps"] / 1.5)
    assert b["decode_tps_band"][1] == pytest.approx(a["decode_tps_band"][1])  # the fastest passes' end stays
    assert b["decode_tps_band"][0] < b["decode_tps"] < b["decode_tps_band"][1]


def test_kernel_probe_rounds_keep_each_timings_fastest_pass():
    """The kernel probes run in rounds over every pair in turn: a burst of other work can slow every pass of
    one round, so each timing is the fastest pass of any round (a slowed round changes nothing)."""
    import engine.bench.kernels as kernels

    sizes = [1000, 3000]
    quiet = [{1: [2e-6, 3e-6], 0: [1e-6, 1.5e-6], -1: [2e-6]}, {1: [4e-6, 5e-6], 0: [2e-6, 2e-6], -1: [5e-6]}]
    slowed = [{k: [10 * t for t in v] for k, v in res.items()} for res in quiet]
    one, _ = kernels._fit_experts(sizes, [quiet], tokens=(1,))
    both, _ = kernels._fit_experts(sizes, [slowed, quiet], tokens=(1,))
    for path in ("decode", "python", "major"):
        assert both[path].per_byte == pytest.approx(one[path].per_byte)
        assert both[path].fixed == pytest.approx(one[path].fixed)
    assert one["decode"].seconds(1000, 1) == pytest.approx(1e-6)  # the fastest pass of the smaller expert
    assert one["decode"].per_byte[0] == pytest.approx(1e-6 / 2000)  # between the two sizes
    dense, _ = kernels._fit_dense(1000, [[[9e-6, 8e-6]], [[2e-6, 3e-6]]], rows=(1,))
    assert dense.per_byte == pytest.approx([2e-9])


def test_the_policys_own_work_is_the_fastest_of_several_dry_runs(synth, monkeypatch):
    """A burst of other work can slow one whole dry run: each forward's bookkeeping time is the fastest of
    ``TIMING_RUNS`` runs, so one slowed run of the policy does not inflate its extra work."""
    import engine.bench.forecast as fc
    from engine.bench.shape import read_shape

    real = fc.simulate
    calls = []

    def timed(*args, **kw):
        out = real(*args, **kw)
        policy = args[6]
        calls.append(policy)
        slow = policy != fc.BASE_POLICY and calls.count(policy) == 1  # the policy's first run: slowed 10x
        for f in out:
            f.book_s = (0.010 if slow else 0.001) if policy != fc.BASE_POLICY else 0.0005
        return out

    monkeypatch.setattr(fc, "simulate", timed)
    shape = read_shape(str(synth))
    eam = fc.run_forwards(shape, 1, 3, 6, 10, fc.Access(_trace(20), policy="eam"))
    assert calls.count("eam") == fc.TIMING_RUNS and calls.count("lru") == fc.TIMING_RUNS
    assert [f.policy_extra_s for f in eam] == pytest.approx([0.0005] * len(eam))

"""The replica probe of ``moeinf predict`` (``engine.bench.replica``): the model's first layers, run as the bench
runs them, fitted per layer and per load; and the forecast it times. No timing assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.bench.replica import (
    ReplicaFit,
    ReplicaRun,
    _fit_loads,
    _trim_config,
    make_replica,
    replica_layers,
)
from engine.trace.format import RoutingTrace

LAYERS, EXPERTS, K = 6, 8, 2


def _trace(tokens: int, layers: int = LAYERS, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(tokens * layers)])
    return RoutingTrace(ids.reshape(tokens, layers, K), EXPERTS)


@pytest.fixture()
def synth(_isolated_home):
    from engine.bench.synthetic import make_synthetic_model

    return make_synthetic_model("synth-rep", num_layers=LAYERS, num_experts=EXPERTS, top_k=K, hidden=64,
                                intermediate=128, vocab=256, dtype=torch.bfloat16)


def _fit(**kw) -> ReplicaFit:
    d = dict(layers=2, batch=1, fixed_s=1e-3, resident_layer_s=2e-3, offload_fixed_s=1.5e-3, offload_layer_s=3e-3,
             demand_s=4e-3, prefetch_s=4e-3, prefill_fixed_s=0.002, prefill_layer_s=0.01, prefill_load_s=0.005, spread=0.05,
             offload_spread=0.05)
    d.update(kw)
    return ReplicaFit(**d)


def test_replica_is_the_models_first_layers(synth, tmp_path):
    """The replica has the model's config cut to its depth, exactly those layers' dense tensors (the loader
    refuses any other), links to those layers' expert shards, and loads and decodes as a store model."""
    from safetensors import safe_open

    from engine.model.loader import load_model
    from engine.store.opened import StoreModel, open_model

    store = open_model(synth)
    root = make_replica(store, 2, tmp_path / "rep")
    rep = StoreModel.from_dir(root)
    assert rep.config["num_hidden_layers"] == 2 and rep.layout.moe_layers == [0, 1]
    with safe_open(str(rep.dense_files[0]), framework="pt") as fh:
        keys = list(fh.keys())
    assert not any(".layers.2." in k or ".layers.5." in k for k in keys)
    assert any(".layers.1." in k for k in keys) and "lm_head.weight" in keys
    assert (root / "experts" / "L1").is_symlink() and not (root / "experts" / "L2").exists()
    assert rep.expert_file_bytes == store.expert_file_bytes
    model = load_model(rep, dtype=torch.bfloat16, device="cpu", max_seq_len=8)
    assert len(model.layers) == 2
    assert make_replica(store, 2, tmp_path / "rep") == root  # kept when already made


def test_trim_config_cuts_per_layer_lists():
    cfg = {"num_hidden_layers": 4, "mlp_only_layers": [], "layer_types": ["a", "b", "a", "b"], "eos_token_id": [1, 2]}
    out = _trim_config(cfg, 2)
    assert out["num_hidden_layers"] == 2 and out["layer_types"] == ["a", "b"] and out["eos_token_id"] == [1, 2]


def test_replica_layers_bounded_by_model_and_bytes():
    assert replica_layers(32, 1 << 20) == 8
    assert replica_layers(8, 1 << 20) == 4  # at most half the model
    assert replica_layers(3, 1 << 20) == 3  # a tiny model: all of it
    assert replica_layers(32, 600 << 20) == 3  # fewer layers while they hold too many bytes
    assert replica_layers(32, 4 << 30) == 0  # too big a layer: no replica, the kernel model serves


def test_load_fit_recovers_the_cost_of_a_load_and_ignores_slowed_steps():
    """step = a + c * loads over the budgeted runs: a few steps slowed several-fold (other work on the
    machine) barely move the per-load cost; the load-free step is their mean (the bench's statistic)."""
    rng = np.random.default_rng(0)
    runs = []
    for share, top in (("50%", 4), ("10%", 12)):
        steps = []
        for i in range(30):
            loads = int(rng.integers(0, top))
            t = 0.010 + 0.003 * loads
            if i % 10 == 3:
                t *= 4  # slowed
            steps.append((t, loads, 0, 0.0))
        runs.append(ReplicaRun(share, 0.1, steps, depth=8))
    a, c, rel = _fit_loads(runs, skip=0)
    assert c == pytest.approx(0.003, rel=0.05)  # the slope: robust to the slowed steps
    assert a == pytest.approx(np.mean([s[0] - c * s[1] for r in runs for s in r.steps]))
    assert rel < 0.1
    # prefetch loads count as loads too
    same = [ReplicaRun(r.budget, 0.1, [(s[0], 0, s[1], 0.0) for s in r.steps], depth=8) for r in runs]
    assert _fit_loads(same, skip=0) == pytest.approx((a, c, rel))


def test_two_depths_separate_the_steps_own_cost_from_its_layers():
    from engine.bench.replica import _line

    # 4 ms a step + 2 ms a layer; one run of each depth slowed (other work: it only slows a run)
    fixed, per = _line([1, 1, 1, 4, 4, 4], [0.006, 0.006, 0.090, 0.012, 0.012, 0.100])
    assert fixed == pytest.approx(0.004) and per == pytest.approx(0.002)


def test_fit_scales_to_the_models_depth_and_loads():
    f = _fit()
    assert f.step_s(32, False) == pytest.approx(1e-3 + 32 * 2e-3)
    assert f.step_s(32, True, demand=3, prefetch=1) == pytest.approx(1.5e-3 + 32 * 3e-3 + 4 * 4e-3)
    assert f.prefill_s(10, loads=4) == pytest.approx(0.002 + 10 * 0.01 + 4 * 0.005)
    assert ReplicaFit.from_dict(json.loads(json.dumps(f.as_dict()))) == f


def test_forecast_from_the_replica_follows_its_fit(synth):
    """With a replica fit the forecast is the fit's step for the model's depth plus the dry run's loads at
    the fit's cost: twice the per-layer cost, a slower forecast; a dearer load slows only budgeted rows."""
    from test_predict_engine import engine_profile

    from engine.bench.predict import bench_row_forecast
    from engine.bench.shape import read_shape

    shape = read_shape(str(synth))
    prof = engine_profile()
    trace = _trace(40)

    def fc(budget: str, fit: ReplicaFit, batch: int = 1) -> dict:
        row = {"budget": budget, "policy": "lru", "batch": batch}
        return bench_row_forecast(synth, row, 4, 8, trace, shape=shape, profile=prof, replicas={batch: fit})

    base = fc("100%", _fit())
    assert base["timed_by"] == "replica"
    assert 1 / base["decode_tps"] == pytest.approx(1e-3 + LAYERS * 2e-3, rel=1e-6)
    lo, hi = base["decode_band"]
    assert lo < base["decode_tps"] < hi
    assert lo <= base["decode_tps"] / 1.15 * 1.0001 and hi >= base["decode_tps"] * 1.15 * 0.9999  # at least 15%
    wide = fc("100%", _fit(spread=0.8))  # a very noisy probe: a wide band, never below zero
    assert 0 < wide["decode_band"][0] < lo
    slow = fc("100%", _fit(resident_layer_s=4e-3))
    assert slow["decode_tps"] < base["decode_tps"]
    part = fc("25%", _fit())
    dear = fc("25%", _fit(demand_s=8e-3, prefetch_s=8e-3))
    assert part["decode_tps"] > dear["decode_tps"]
    assert fc("100%", _fit(demand_s=8e-3, prefetch_s=8e-3))["decode_tps"] == pytest.approx(base["decode_tps"])
    assert base["prefill_tps"] == pytest.approx(4 / (0.002 + LAYERS * 0.01))
    kern = bench_row_forecast(synth, {"budget": "100%", "policy": "lru", "batch": 1}, 4, 8, trace, shape=shape,
                              profile=prof, replicas={})
    assert kern["timed_by"] == "kernels"


def test_probe_replica_runs_the_bench_protocol(synth):
    """The probe runs the replica resident and budgeted, every step with its loads, and fits them."""
    from engine.bench.replica import probe_replica
    from engine.store.opened import open_model

    fit = probe_replica(open_model(synth), 2, 3, 6, ["25%"], trace=_trace(20), passes=1, flush_bytes=1 << 20,
                        layers=2)
    assert fit is not None and fit.layers == 2 and fit.batch == 2
    assert fit.fixed_s >= 0 and fit.resident_layer_s >= 0 and fit.demand_s >= 0 and fit.head_s > 0
    assert fit.prefill_layer_s >= 0 and fit.prefill_load_s >= 0


def test_resident_slope_is_floored_at_the_layers_bytes():
    """Two replica depths whose times barely differ (an LM head dominating the step) must not forecast a layer
    faster than its bytes can be read; the fixed part then takes what the shallower replica leaves."""
    from engine.bench.replica import _line, layer_floor_s

    depths, times = [1.0, 1.0, 4.0, 4.0], [0.0164, 0.0170, 0.0169, 0.0175]
    fixed, per = _line(depths, times)
    assert per == pytest.approx((0.0169 - 0.0164) / 3)
    floor = layer_floor_s(19.5e6, 30e9)
    assert floor == pytest.approx(0.65e-3)
    f2, p2 = _line(depths, times, floor)
    assert p2 == pytest.approx(floor) and f2 == pytest.approx(0.0164 - floor)
    assert f2 + 8 * p2 > fixed + 8 * per  # the 8-layer model's step is forecast slower, as measured
    assert _line(depths, times, 1e-6) == (fixed, per)  # a floor below the slope changes nothing
    assert layer_floor_s(0, 30e9) == 0.0 and layer_floor_s(1e6, 0.0) == 0.0


def test_probe_replica_applies_the_floor_when_layers_run_cold(synth):
    from engine.bench.replica import probe_replica
    from engine.store.opened import open_model

    fit = probe_replica(open_model(synth), 1, 3, 6, [], passes=1, flush_bytes=1 << 22, layers=2,
                        layer_bytes=50e6)
    assert fit.read_bps > 0 and fit.layer_floor_s == pytest.approx(50e6 / fit.read_bps)
    assert fit.resident_layer_s >= fit.layer_floor_s

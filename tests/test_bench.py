"""`moeinf bench`: the JSON document, forced routing from a trace, Belady beside each row."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.bench.forced import force_routing
from engine.bench.synthetic import make_synthetic_model
from engine.policy.oracle import token_oracle_loads
from engine.policy.replay import belady_bypass_loads, belady_loads
from engine.trace.format import RoutingTrace

LAYERS, EXPERTS = 3, 8


@pytest.fixture()
def synth(_isolated_home):
    return make_synthetic_model("synth-bench", num_layers=LAYERS, num_experts=EXPERTS, top_k=2, hidden=64,
                                intermediate=128, vocab=256, dtype=torch.float32)


def _trace(tokens: int, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(EXPERTS, 2, replace=False) for _ in range(tokens * LAYERS)])
    return RoutingTrace(ids.reshape(tokens, LAYERS, 2), EXPERTS)


def test_forced_routing_follows_the_trace(synth):
    from engine.memory import open_experts
    from engine.model.loader import load_model

    seen: list[tuple[int, list[int]]] = []

    class Spy:
        def on_route(self, layer, topk_ids):
            seen.append((layer, sorted(topk_ids.reshape(-1).tolist())))

    trace = _trace(6)
    experts = open_experts(synth, torch.float32, "cpu", "100%", None, Spy())
    model = load_model(synth, dtype=torch.float32, experts=experts, max_seq_len=16)
    state = force_routing(model, trace)
    for t in range(6):
        state.step = t
        model(torch.tensor([t + 1]), t)
    want = [(layer, sorted(trace.expert_ids[t, layer].tolist())) for t in range(6) for layer in range(LAYERS)]
    assert seen == want


def test_bench_json_on_a_tiny_model(synth, tmp_path):
    from test_predict import profile

    from engine.bench.machine import PROFILE_FILE
    from engine.store.paths import moeinf_home

    moeinf_home().mkdir(parents=True, exist_ok=True)
    (moeinf_home() / PROFILE_FILE).write_text(json.dumps(profile().as_dict()))  # the forecast's machine, fixed
    trace = _trace(12)
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=trace.expert_ids.astype(np.int16), num_experts=np.int64(EXPERTS),
             seq_starts=np.array([0]), meta=json.dumps({"model": "test"}))
    r = subprocess.run(
        [sys.executable, "-m", "moeinf_cli", "bench", "synth-bench", "-p", "2", "-n", "10", "-r", "2",
         "--expert-budget", "100%,25%", "--policy", "lru,lfu", "--replay", str(path), "--profile", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "moeinf-bench/1" and doc["repetitions"] == 2
    assert [(row["budget"], row["policy"]) for row in doc["rows"]] == [("100%", "-"), ("25%", "lru"), ("25%", "lfu")]
    resident, *offloaded = doc["rows"]
    assert resident["hit_rate"] == 1.0 and resident["loads"] == 0 and resident["belady_loads"] is None
    assert doc["probe"]["bandwidth_gbps"] > 0 and doc["compute_ms_per_token"] > 0
    for row in offloaded:
        slots = row["slots"]
        assert 0 < slots < LAYERS * EXPERTS
        # Belady is the optimum for the same tokens and capacity: no policy loads less
        assert row["belady_loads"] == belady_loads(trace, slots)
        assert row["loads"] >= row["belady_loads"] > 0
        assert row["oracle_loads"] == token_oracle_loads(trace, slots) >= row["belady_loads"]
        assert row["reachable_ms_per_token"] >= row["limit_ms_per_token"]
        assert row["bytes_loaded"] > 0 and row["limit_ms_per_token"] > 0
        assert row["predicted_ms_per_token"] >= doc["compute_ms_per_token"]
    # moeinf predict's forecast beside each row: from headers, the machine profile and the replayed routing
    for row in doc["rows"]:
        low, high = row["forecast_band"]
        assert low <= row["forecast_tps"] <= high and row["forecast_prefill_tps"] > 0
    assert resident["forecast_tps"] > offloaded[0]["forecast_tps"]


def test_bench_markdown_and_errors(synth):
    r = subprocess.run([sys.executable, "-m", "moeinf_cli", "bench", "synth-bench", "-p", "3", "-n", "2", "-r", "1",
                        "--expert-budget", "50%", "--policy", "lru"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| model | budget | policy |") and "pp3 t/s" in lines[0] and "tg2 t/s" in lines[0]
    assert lines[2].startswith("| synth-bench | 50% | lru |")
    bad = subprocess.run([sys.executable, "-m", "moeinf_cli", "bench", "synth-bench", "--policy", "nope",
                          "--expert-budget", "50%"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "unknown policy" in bad.stderr


def test_bench_batch_axis(synth, tmp_path):
    """-b: one row per batch size x configuration; aggregate tokens/s, per-sequence latency, loads per
    step; Belady over the union of the batch's experts, each sequence at its own place in the trace."""
    from engine.bench.runner import batch_trace

    trace = _trace(12)
    path = tmp_path / "trace.npz"
    np.savez(
        path,
        expert_ids=trace.expert_ids.astype(np.int16),
        num_experts=np.int64(EXPERTS),
        seq_starts=np.array([0]),
        meta=json.dumps({"model": "test"}),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeinf_cli",
            "bench",
            "synth-bench",
            "-p",
            "1",
            "-n",
            "7",
            "-r",
            "1",
            "-b",
            "1,4",
            "--expert-budget",
            "100%,50%",
            "--policy",
            "lru",
            "--replay",
            str(path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["batches"] == [1, 4]
    assert [(row["batch"], row["budget"]) for row in doc["rows"]] == [
        (1, "100%"),
        (1, "50%"),
        (4, "100%"),
        (4, "50%"),
    ]
    for row in doc["rows"]:
        assert abs(row["decode_tps"] - row["batch"] * 1e3 / row["ms_per_token"]) < 1e-6 * row["decode_tps"]
        assert row["loads_per_step"] <= LAYERS * EXPERTS
    one, four = doc["rows"][1], doc["rows"][3]
    assert one["belady_loads"] == belady_loads(RoutingTrace(trace.expert_ids[:8], EXPERTS), one["slots"])
    starts, merged = batch_trace(trace, 4, 8)
    assert starts == [0, 3, 6, 9] and merged.expert_ids.shape == (8, LAYERS, 8)
    assert (merged.expert_ids[5, :, 2:4] == trace.expert_ids[8]).all()  # sequence 1 at step 5: token 3 + 5
    assert four["belady_loads"] == belady_bypass_loads(merged, four["slots"]) and four["oracle_loads"] is None
    assert four["loads"] >= four["belady_loads"] > 0
    assert belady_bypass_loads(merged, four["slots"]) <= belady_loads(merged, four["slots"])
    # a scan of every expert at every step: the optimum keeps what fits and streams the rest
    scan = RoutingTrace(np.tile(np.arange(EXPERTS)[None, None, :], (10, LAYERS, 1)), EXPERTS)
    assert belady_bypass_loads(scan, 9) == LAYERS * EXPERTS + 9 * (LAYERS * EXPERTS - 9)
    md = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeinf_cli",
            "bench",
            "synth-bench",
            "-p",
            "1",
            "-n",
            "2",
            "-r",
            "1",
            "-b",
            "2",
            "--expert-budget",
            "100%",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("| model | batch | budget |") and "loads/step" in md.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "moeinf_cli", "bench", "synth-bench", "-b", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "-b" in bad.stderr


def test_bench_runs_one_configuration_unless_told_more(synth):
    r = subprocess.run([sys.executable, "-m", "moeinf_cli", "bench", "synth-bench", "-p", "2", "-n", "2", "-r", "1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["budget"] == "auto", rows

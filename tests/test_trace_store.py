"""Persisted traces: round trip, atomic writes, corrupt files set aside, two writers, bounds, recorder."""

from __future__ import annotations

import logging
import multiprocessing as mp

import numpy as np
import pytest

from engine.trace import store as store_mod
from engine.trace.eam import EAM, EAMCollection
from engine.trace.recorder import TraceRecorder
from engine.trace.store import FORMAT_VERSION, TraceStore

L, E, K = 3, 8, 2


def record(rec: TraceRecorder, rng: np.random.Generator, prompt: int = 5, decode: int = 4) -> None:
    rec.begin_sequence()
    for layer in range(L):
        rec.on_route(layer, rng.integers(0, E, size=(prompt, K)))
    for _ in range(decode):
        for layer in range(L):
            rec.on_route(layer, rng.integers(0, E, size=(1, K)))
    rec.end_sequence()


def test_recorder_round_trip_phases_and_version(tmp_path):
    rec = TraceRecorder("m", L, E)
    rng = np.random.default_rng(0)
    for _ in range(3):
        record(rec, rng)
    st = TraceStore("m").read()
    assert st is not None
    assert st.collection.requests == 3
    assert st.collection.tokens.tolist() == [15, 12]  # 3 x 5 prefill, 3 x 4 decode tokens
    assert st.raw_ids.shape == (27, L, K) and st.raw_starts.tolist() == [0, 9, 18]
    assert st.collection.transitions is not None and st.collection.transitions.sum() == 27 * (L - 1) * K * K
    with np.load(TraceStore("m").path) as d:
        assert int(d["version"]) == FORMAT_VERSION
    assert not [p for p in TraceStore("m").dir.iterdir() if p.name.startswith(".tmp")]


def test_recorder_maps_decoder_layers_and_accepts_torch():
    import torch

    rec = TraceRecorder("ds", 2, E, layers=[1, 2])  # decoder layer 0 is dense
    rec.begin_sequence()
    rec.on_route(0, torch.tensor([[1, 2]]))  # not an MoE layer: ignored
    rec.on_route(1, torch.tensor([[1, 2]]))
    rec.on_route(2, torch.tensor([[3, 4]]))
    rec.end_sequence()
    st = TraceStore("ds").read()
    assert st.raw_ids[0].tolist() == [[1, 2], [3, 4]]


def test_write_is_atomic_when_interrupted(monkeypatch):
    rec = TraceRecorder("m", L, E)
    rng = np.random.default_rng(1)
    record(rec, rng)
    before = TraceStore("m").path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.np, "savez_compressed", boom)
    with pytest.raises(OSError):
        TraceStore("m").update(TraceStore("m").read())
    assert TraceStore("m").path.read_bytes() == before
    assert not [p for p in TraceStore("m").dir.iterdir() if p.name.startswith(".tmp")]
    # the recorder itself never crashes a generation over a failed save: it warns
    record(rec, rng)
    assert TraceStore("m").path.read_bytes() == before


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated"])
def test_corrupt_file_is_set_aside_with_one_line_warning(content, caplog):
    ts = TraceStore("m")
    ts.dir.mkdir(parents=True)
    ts.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="moeinf.trace"):
        assert ts.read() is None
    assert (ts.dir / "traces.npz.corrupt").read_bytes() == content
    assert not ts.path.exists()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "set aside" in msgs[0]
    record(TraceRecorder("m", L, E), np.random.default_rng(2))  # recording starts afresh
    assert ts.read().collection.requests == 1


def test_other_version_is_set_aside(caplog):
    rec = TraceRecorder("m", L, E)
    record(rec, np.random.default_rng(3))
    ts = TraceStore("m")
    with np.load(ts.path) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["version"] = np.int64(FORMAT_VERSION + 1)
    with open(ts.path, "wb") as f:
        np.savez(f, **arrays)
    with caplog.at_level(logging.WARNING, logger="moeinf.trace"):
        assert ts.read() is None
    assert (ts.dir / "traces.npz.corrupt").exists()


def test_eam_policy_survives_a_corrupt_store(caplog):
    from engine.policy.registry import make_policy

    ts = TraceStore("m")
    ts.dir.mkdir(parents=True)
    ts.path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="moeinf.trace"):
        p = make_policy("eam", model_name="m")
        p.setup(L, E, 6)
    assert len(p.collection) == 0


def _writer(n: int, seed: int, barrier) -> None:
    rec = TraceRecorder("shared", L, E)
    rng = np.random.default_rng(seed)
    barrier.wait()
    for _ in range(n):
        record(rec, rng, prompt=3, decode=2)


def test_two_processes_recording_at_once_lose_nothing():
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 12
    procs = [ctx.Process(target=_writer, args=(n, seed, barrier)) for seed in (10, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = TraceStore("shared").read()
    assert st is not None, "the file must be readable (not corrupt)"
    assert st.collection.requests == 2 * n
    assert st.collection.tokens.tolist() == [2 * n * 3, 2 * n * 2]
    assert len(st.raw_starts) == 2 * n and st.raw_ids.shape[0] == 2 * n * 5
    assert st.collection.transitions.sum() == 2 * n * 5 * (L - 1) * K * K
    assert not (TraceStore("shared").dir / "traces.npz.corrupt").exists()


def test_sizes_are_bounded(monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_RAW_TOKENS", 20)
    rec = TraceRecorder("m", L, E)
    rng = np.random.default_rng(4)
    for _ in range(8):
        record(rec, rng, prompt=3, decode=4)  # 7 tokens each
    st = TraceStore("m").read()
    assert st.raw_ids.shape[0] <= 20 and st.raw_starts[0] == 0
    assert st.collection.requests == 8  # counts are never lost, only old raw routing


def test_collection_merges_into_most_similar_when_full():
    coll = EAMCollection(1, 4, capacity=2)
    a = EAM.from_ids(np.array([[[0, 1]]] * 4), 4)
    b = EAM.from_ids(np.array([[[2, 3]]] * 4), 4)
    a2 = EAM.from_ids(np.array([[[0, 1]], [[0, 2]]]), 4)
    for eam in (a, b, a2):
        coll.add(eam)
    assert len(coll) == 2 and coll.requests == 3
    assert sorted(coll.weights.tolist()) == [1.0, 2.0]
    merged = coll.rates[int(np.argmax(coll.weights)), 1, 0]
    assert merged[0] == pytest.approx(1.0) and merged[2] == pytest.approx(0.25)
    # matching: a request that used 2 and 3 predicts 2 and 3
    partial = EAM.from_ids(np.array([[[2, 3]]]), 4).rates()
    pred = coll.predict(partial, seen_layers=1, target_layer=0)
    assert set(np.argsort(-pred[0])[:2]) == {2, 3}


def test_near_duplicates_merge_even_when_not_full():
    coll = EAMCollection(1, 4, capacity=10)
    for _ in range(5):
        coll.add(EAM.from_ids(np.array([[[0, 1]]]), 4))
    assert len(coll) == 1 and coll.weights[0] == 5 and coll.requests == 5


def test_remove():
    record(TraceRecorder("m", L, E), np.random.default_rng(5))
    assert TraceStore("m").remove()
    assert not TraceStore("m").exists() and not TraceStore("m").remove()

"""The budgeted cache through the ExpertSource calls: right weights, pins, prefill streaming, prefetch
bookkeeping, interrupted fetches, and O_DIRECT bytes as the OS counts them."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from engine.bench.synthetic import make_synthetic_model
from engine.memory import open_experts
from engine.memory.offload import OffloadedExperts
from engine.model.experts import MappedExperts
from engine.policy.base import Policy

LAYERS, EXPERTS, TOP_K = 3, 8, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-models")
    return make_synthetic_model("cache-test", "mixtral", num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K,
                                hidden=64, intermediate=96, vocab=300, dtype=torch.float32, root=root)


@pytest.fixture(scope="module")
def reference(model):
    return MappedExperts(model, torch.float32)


def _slot_budget(model, slots: int) -> str:
    probe = open_experts(model, torch.float32, "cpu", "99%", "lru", prefetch=False)
    n = probe.transfer.slot_bytes
    probe.close()
    return str(slots * n)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("gate", "up", "down"))


def _ref(reference, layer, e):
    return dict(reference.fetch(layer, [e]))[e]


def _decode_step(src, layer, ids):
    src.observe(layer, torch.tensor([ids]), torch.zeros(1, 64))
    return list(src.fetch(layer, ids))


class ScriptedPolicy(Policy):
    """LRU eviction; prefetches exactly what the test scripts per layer."""

    name = "scripted"

    def __init__(self, plan: dict[int, list[tuple[int, int]]]):
        self.plan = plan
        self.clock = 0
        self.last: dict = {}

    def on_route(self, layer, experts, counts=None):
        for e in experts:
            self.clock += 1
            self.last[(layer, e)] = self.clock

    def on_load(self, key):
        self.clock += 1
        self.last.setdefault(key, self.clock)

    def victim(self, resident, pinned):
        return min((k for k in resident if k not in pinned), key=lambda k: self.last.get(k, 0))

    def prefetch(self, layer, limit):
        return self.plan.get(layer, [])[:limit]


def _open(model, slots, policy="lru", **kw) -> OffloadedExperts:
    src = open_experts(model, torch.float32, "cpu", _slot_budget(model, slots), policy, **kw)
    assert isinstance(src, OffloadedExperts)
    return src


def test_decode_fetch_gives_the_right_weights_and_pins_the_layer(model, reference):
    src = _open(model, slots=TOP_K)  # the minimum: exactly one layer's top-k
    rng = random.Random(0)
    try:
        for _token in range(6):
            for layer in range(LAYERS):
                ids = rng.sample(range(EXPERTS), TOP_K)
                got = _decode_step(src, layer, ids)
                assert sorted(e for e, _ in got) == sorted(ids)
                for e, w in got:
                    assert _same(w, _ref(reference, layer, e))
                # the layer's experts stay resident and pinned until the next fetch
                assert {(layer, e) for e in ids} <= src.resident_keys()
                assert {s.key for s in src._pinned.values()} == {(layer, e) for e in ids}
        st = src.stats()
        assert st.slots == TOP_K and st.stream_slots == 0
        assert st.accesses == 6 * LAYERS * TOP_K and st.hits + st.demand_loads == st.accesses
        assert st.resident_experts <= TOP_K
        assert 0 < st.bytes_loaded and sum(st.layer_accesses.values()) == st.accesses
    finally:
        src.close()


def test_disk_busy_time_covers_the_loads_and_no_more_than_the_run(model):
    """``disk_busy_s``: the time at least one load was reading, counted once however many overlap."""
    import time

    src = _open(model, slots=TOP_K + 2)
    rng = random.Random(1)
    try:
        t0 = time.perf_counter()
        for _token in range(4):
            for layer in range(LAYERS):
                _decode_step(src, layer, rng.sample(range(EXPERTS), TOP_K))
        elapsed = time.perf_counter() - t0
        st = src.stats()
        assert st.demand_loads > 0
        assert 0 < st.disk_busy_s <= elapsed
        with src.lock:
            assert src._reading == 0  # every load that started finished
    finally:
        src.close()


def test_prefill_streams_past_the_cache_without_flushing_it(model, reference):
    slots = 2 * TOP_K + 2  # main cache of 4 + 2 stream slots
    src = _open(model, slots=slots, prefetch=False)
    try:
        assert src.n_stream == 2 and src.main_capacity == 4
        # decode fills the cache with 4 experts
        _decode_step(src, 0, [0, 1])
        _decode_step(src, 1, [2, 3])
        warm = src.resident_keys()
        assert warm == {(0, 0), (0, 1), (1, 2), (1, 3)}
        # a prefill step over every expert of layer 2: more than the whole budget
        ids = torch.tensor([[e, (e + 1) % EXPERTS] for e in range(EXPERTS)])
        src.observe(2, ids, torch.zeros(EXPERTS, 64))
        got = []
        for e, w in src.fetch(2, list(range(EXPERTS))):
            assert _same(w, _ref(reference, 2, e))  # valid while the caller holds it
            got.append(e)
        assert sorted(got) == list(range(EXPERTS))
        assert src.resident_keys() == warm  # the decode working set survived
        st = src.stats()
        assert st.streamed == EXPERTS and st.peak_resident_bytes <= st.budget_bytes
        # and a later decode step still hits it
        before = st.hits
        _decode_step(src, 0, [0, 1])
        assert src.stats().hits == before + 2
    finally:
        src.close()


def test_prefill_admits_into_free_slots_first(model, reference):
    src = _open(model, slots=2 * TOP_K + 2, prefetch=False)
    try:
        ids = torch.tensor([[e, (e + 1) % EXPERTS] for e in range(EXPERTS)])
        src.observe(0, ids, torch.zeros(EXPERTS, 64))
        assert sorted(e for e, _ in src.fetch(0, list(range(EXPERTS)))) == list(range(EXPERTS))
        st = src.stats()
        assert st.resident_experts == 4 and st.streamed == EXPERTS - 4  # cold cache filled, rest streamed
    finally:
        src.close()


def test_prefill_with_no_stream_slots_evicts_through_the_policy(model, reference):
    src = _open(model, slots=TOP_K + 1, prefetch=False)
    try:
        assert src.n_stream == 0
        ids = torch.tensor([[e, (e + 1) % EXPERTS] for e in range(EXPERTS)])
        src.observe(1, ids, torch.zeros(EXPERTS, 64))
        for e, w in src.fetch(1, list(range(EXPERTS))):
            assert _same(w, _ref(reference, 1, e))
        assert src.stats().evictions >= EXPERTS - (TOP_K + 1)
    finally:
        src.close()


def test_prefetch_useful_and_wasted_are_counted(model, reference):
    # after layer 0, prefetch (1, 4) (will be used) and (1, 5) (will not)
    plan = {0: [(1, 4), (1, 5)]}
    src = _open(model, slots=20, policy="lru")
    src.policy = ScriptedPolicy(plan)
    src.prefetch_limit = 4
    try:
        _decode_step(src, 0, [0, 1])
        for key in [(1, 4), (1, 5)]:
            job = src.loader.get(key)
            if job is not None:
                assert job.done.wait(5)
        assert {(1, 4), (1, 5)} <= src.resident_keys()
        got = _decode_step(src, 1, [4, 6])
        for e, w in got:
            assert _same(w, _ref(reference, 1, e))
        st = src.stats()
        assert st.prefetch_loads == 2 and st.prefetch_useful == 1
        assert st.hits >= 1  # (1, 4) was a hit thanks to the prefetch
        # evicting the unused (1, 5) makes it a wasted prefetch
        src.policy.last[(1, 5)] = -1
        slot = src._evict_one()
        assert slot is not None
        assert src.stats().prefetch_wasted == 1
    finally:
        src.close()


def test_stale_prefetches_are_cancelled(model):
    src = _open(model, slots=20)
    try:
        src.loader.close()  # no workers: queued jobs stay queued
        from engine.memory.loader import PREFETCH, Loader

        src.loader = Loader(src.lock, src._start, src._run, src._finish, workers=0)
        for key in [(1, 5), (1, 6), (2, 7)]:
            src.loader.submit(key, PREFETCH)
        # layer 1 routes to 5 only: the guess (1, 6) is stale; (1, 5) is needed now and stays
        src.observe(1, torch.tensor([[5, 0]]), torch.zeros(1, 64))
        assert src.loader.get((1, 6)) is None
        assert src.loader.get((1, 5)) is not None
        assert src.loader.cancelled >= 1
    finally:
        src.loader.close()


def test_interrupted_fetch_leaves_the_cache_consistent(model, reference):
    src = _open(model, slots=2 * TOP_K + 4, prefetch=False)
    try:
        ids = torch.tensor([[e, (e + 1) % EXPERTS] for e in range(EXPERTS)])
        src.observe(0, ids, torch.zeros(EXPERTS, 64))
        gen = src.fetch(0, list(range(EXPERTS)))
        next(gen)
        next(gen)
        gen.close()  # Ctrl+C in the middle of a prefill layer
        # the next steps work and give the right weights; no slot leaked
        for layer in range(LAYERS):
            for e, w in _decode_step(src, layer, [3, 7]):
                assert _same(w, _ref(reference, layer, e))
        src.observe(1, ids, torch.zeros(EXPERTS, 64))
        assert sorted(e for e, _ in src.fetch(1, list(range(EXPERTS)))) == list(range(EXPERTS))
        src.fetch(2, [])  # releases the pins
        with src.lock:
            busy = [s for s in src.slots if s.state == "loading" or s.pins]
        assert busy == []
    finally:
        src.close()
    assert not any(t.is_alive() for t in src.loader._threads)


def test_close_is_idempotent_and_stops_workers(model):
    src = _open(model, slots=6)
    threads = list(src.loader._threads)
    _decode_step(src, 0, [1, 2])
    src.close()
    src.close()
    assert not any(t.is_alive() for t in threads)


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_o_direct_reads_match_the_os_count(tmp_path):
    # experts of about 1.5 MB (hidden 256, intermediate 1024, fp32 -> 3 MB); 2 layers x 8
    root = make_synthetic_model("io-test", "mixtral", num_layers=2, num_experts=8, top_k=2, hidden=256,
                                intermediate=1024, vocab=300, dtype=torch.float32, root=tmp_path)
    src = open_experts(root, torch.float32, "cpu", _slot_budget(root, 3), "lru", prefetch=False)
    assert isinstance(src, OffloadedExperts)
    try:
        if src.transfer.io != "O_DIRECT":
            pytest.skip("this file system does not support O_DIRECT")
        rng = random.Random(1)
        before_os, before_own = _read_bytes(), src.stats().bytes_loaded
        for _token in range(8):
            for layer in range(2):
                _decode_step(src, layer, rng.sample(range(8), 2))
        st = src.stats()
        own = st.bytes_loaded - before_own
        os_count = _read_bytes() - before_os
        assert st.io == "O_DIRECT"
        assert own >= 10 * 3_000_000  # measurable: tens of MB
        assert abs(os_count - own) <= 0.05 * own, (os_count, own)
    finally:
        src.close()


def test_fetch_without_observe_of_many_ids_streams(model, reference):
    src = _open(model, slots=TOP_K, prefetch=False)
    try:
        got = {e: _same(w, _ref(reference, 0, e)) for e, w in src.fetch(0, list(range(EXPERTS)))}
        assert got == {e: True for e in range(EXPERTS)}
    finally:
        src.close()


def test_interpreter_exit_without_close_is_clean(model):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from engine.memory import open_experts
        src = open_experts({str(model)!r}, torch.float32, "cpu", "60%", "lru")
        src.observe(0, torch.tensor([[1, 2]]), torch.zeros(1, 64))
        gen = src.fetch(0, [1, 2])
        next(gen)
        print("ok", flush=True)
        raise SystemExit(0)  # no close(): the loader must not hang the exit
    """)
    env = dict(os.environ, PYTHONPATH=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_speculative_hints_reach_the_policy(model):
    from engine.memory.hints import RouterHints
    from engine.store.families import get_family
    from engine.store.opened import as_store_model

    class Hinted(ScriptedPolicy):
        def __init__(self):
            super().__init__({})
            self.hints = []

        def on_hint(self, layer, scores):
            self.hints.append((layer, list(scores)))

    src = _open(model, slots=20)
    src.policy = Hinted()
    src.hints = RouterHints(as_store_model(model).dense, list(range(LAYERS)), get_family("mixtral"))
    try:
        h = torch.randn(1, 64)
        src.observe(0, torch.tensor([[1, 2]]), h)
        list(src.fetch(0, [1, 2]))
        src.observe(LAYERS - 1, torch.tensor([[1, 2]]), h)  # the last layer: nothing after it
        list(src.fetch(LAYERS - 1, [1, 2]))
        src.observe(0, torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 64))  # prefill: no hints
        assert [layer for layer, _ in src.policy.hints] == [1]  # the next MoE layer by default
        from safetensors import safe_open

        dense = next((model / "dense").glob("*.safetensors"))
        with safe_open(str(dense), "pt") as f:
            w = f.get_tensor("model.layers.1.mlp.gate.weight")
        assert torch.allclose(torch.tensor(src.policy.hints[0][1]), w @ h[0], atol=1e-5)
        src.policy.hints.clear()
        src.hint_depth = 3  # as many coming layers as there are (two here)
        src.observe(0, torch.tensor([[1, 2]]), h)
        assert [layer for layer, _ in src.policy.hints] == [1, 2]
    finally:
        src.close()


class RandomPrefetch(ScriptedPolicy):
    """LRU eviction and random prefetch guesses: exercises prefetch/demand/evict/promote races."""

    def __init__(self, seed: int):
        super().__init__({})
        self.rng = random.Random(seed)

    def prefetch(self, layer, limit):
        return [((layer + self.rng.randint(0, 2)) % LAYERS, self.rng.randrange(EXPERTS)) for _ in range(limit)]


@pytest.mark.parametrize("slots,workers", [(TOP_K + 4, 2), (3 * TOP_K + 2, 2), (2 * TOP_K + 2, 1)])
def test_random_prefetch_races_never_give_wrong_weights(model, reference, slots, workers):
    src = _open(model, slots=slots, workers=workers)
    src.policy = RandomPrefetch(slots)
    src.prefetch_limit = 3
    rng = random.Random(slots)
    try:
        for step in range(30):
            for layer in range(LAYERS):
                if step % 10 == 0:  # now and then a prefill step over most experts
                    ids = torch.tensor([[rng.randrange(EXPERTS), rng.randrange(EXPERTS)] for _ in range(6)])
                    want = sorted(set(ids.flatten().tolist()))
                    src.observe(layer, ids, torch.zeros(6, 64))
                    got = []
                    for e, w in src.fetch(layer, want):
                        assert _same(w, _ref(reference, layer, e))
                        got.append(e)
                    assert sorted(got) == want
                else:
                    ids = rng.sample(range(EXPERTS), TOP_K)
                    for e, w in _decode_step(src, layer, ids):
                        assert _same(w, _ref(reference, layer, e))
                with src.lock:
                    assert len(src._resident) <= src.main_capacity
        st = src.stats()
        assert st.prefetch_loads > 0
        assert st.prefetch_useful + st.prefetch_wasted <= st.prefetch_loads
        assert st.peak_resident_bytes <= st.budget_bytes
    finally:
        src.close()


def _victims_of_a_decode(model, reference, early: bool) -> tuple[list, dict, int]:
    src = _open(model, slots=2 * TOP_K + 4, policy="eam", prefetch=False)
    src.early_demand = early
    victims, landed = [], [0]
    pick, submit = src.policy.victim, src.loader.submit

    def victim(resident, pinned):
        key = pick(resident, pinned)
        victims.append(key)
        return key

    def counted(key, priority, waiter=None, **data):
        landed[0] += data.get("kind") == "land"
        return submit(key, priority, waiter, **data)

    src.policy.victim, src.loader.submit = victim, counted
    rng = random.Random(3)
    try:
        src.begin_sequence()
        for _token in range(24):
            for layer in range(LAYERS):
                ids = rng.sample(range(EXPERTS), TOP_K)
                src.observe(layer, torch.tensor([ids]), torch.zeros(1, 64))
                # the early loads have started reading before fetch (as on an idle machine: a loaded one can
                # leave one queued, which then takes fetch's demand path, whose victim is picked later)
                deadline = time.monotonic() + 10
                while any(j.state == "queued" for j in src._landing.values()) and time.monotonic() < deadline:
                    time.sleep(0.0002)
                for e, w in src.fetch(layer, ids):
                    assert _same(w, _ref(reference, layer, e))
        src.end_sequence()
        st = src.stats()
        return victims, {k: getattr(st, k) for k in ("hits", "demand_loads", "evictions", "streamed")}, landed[0]
    finally:
        src.close()


def test_early_demand_loads_evict_what_the_loads_in_fetch_evict(model, reference, monkeypatch):
    """A decode miss starts reading in ``observe`` (into a stream slot); the policy still picks its
    victim in ``fetch``, after it heard the routing: the same victims, counts and weights."""
    from engine.policy.eam import EAMPolicy

    monkeypatch.setattr(EAMPolicy, "save_state", lambda self: None)  # both runs start from the same state
    late = _victims_of_a_decode(model, reference, early=False)
    early = _victims_of_a_decode(model, reference, early=True)
    assert late[2] == 0 and early[2] > 0
    assert early[0] == late[0] and early[1] == late[1]
    assert late[1]["streamed"] == 0 and late[1]["evictions"] > 20


def test_gil_switch_interval_is_shorter_while_a_source_is_open(model):
    import sys

    before = sys.getswitchinterval()
    a, b = _open(model, slots=TOP_K), _open(model, slots=TOP_K)
    try:
        assert sys.getswitchinterval() == min(before, 0.0005)
        a.close()
        assert sys.getswitchinterval() == min(before, 0.0005)  # b still loads
    finally:
        a.close()
        b.close()
    assert sys.getswitchinterval() == before


"""Offloading never changes the output: greedy tokens with any budget and policy equal the all-resident
run, on tiny models of every MoE family; and the cache never holds more than its budget."""

from __future__ import annotations

import pytest
import torch
from memory_models import greedy, tiny_store

from engine.bench.synthetic import make_synthetic_model
from engine.memory import open_experts
from engine.memory.offload import OffloadedExperts
from engine.memory.resident import ResidentExperts
from engine.model.loader import load_model
from engine.policy.registry import POLICY_NAMES

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 200]
STEPS = 8
# transformers-made tiny checkpoints (converted by the store) and synthetic ones (written directly)
HF_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")
SYNTHETIC_FAMILIES = ("qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-stores")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared machine
    yield {}, root
    torch.set_num_threads(threads)


def _store(stores, family):
    built, root = stores
    if family not in built:
        if family in SYNTHETIC_FAMILIES:
            built[family] = make_synthetic_model(
                f"syn-{family}", family, num_layers=3, num_experts=8, top_k=2, hidden=64, intermediate=96,
                vocab=384, dtype=torch.float32, head_dim=16, root=root)
        else:
            built[family] = tiny_store(family, root)
    return built[family]


def _reference(stores, family, dtype=torch.float32):
    key = ("ref", family, dtype)
    built, _ = stores
    if key not in built:
        model = load_model(_store(stores, family), dtype=dtype)
        built[key] = greedy(model, PROMPT, STEPS)
    return built[key]


def _budgets(root, dtype) -> list[tuple[str, int]]:
    """(label, budget bytes): exactly top-k slots (one layer's minimum), one layer's experts, 50%."""
    probe = open_experts(root, dtype, "cpu", "99%", "lru", prefetch=False)
    try:
        slot, top_k = probe.transfer.slot_bytes, probe.top_k
        n_slots_all = probe.stats().expert_bytes_total // probe.transfer.layout.compute_bytes()
    finally:
        probe.close()
    num_experts = 8
    return [
        ("top-k", top_k * slot),
        ("one-layer", num_experts * slot),
        ("half", (n_slots_all // 2) * slot),
    ]


def _run(root, dtype, budget: int, policy: str, **kw):
    src = open_experts(root, dtype, "cpu", str(budget), policy, **kw)
    assert isinstance(src, OffloadedExperts)
    try:
        assert sum(s.nbytes for s in src.slots) <= budget  # all slot memory, allocated up front
        model = load_model(root, dtype=dtype, experts=src)
        tokens = greedy(model, PROMPT, STEPS)
        st = src.stats()
        assert st.peak_resident_bytes <= budget
        assert st.resident_experts <= st.slots - st.stream_slots
        assert st.hits + st.demand_loads + st.prefetch_useful >= st.accesses - st.prefetch_loads
        assert st.prefetch_useful + st.prefetch_wasted <= st.prefetch_loads
        return tokens, st
    finally:
        src.close()


def test_mixtral_every_budget_and_every_policy(stores):
    root = _store(stores, "mixtral")
    ref = _reference(stores, "mixtral")
    for label, budget in _budgets(root, torch.float32):
        for policy in POLICY_NAMES:
            tokens, st = _run(root, torch.float32, budget, policy)
            assert tokens == ref, f"budget {label} policy {policy}: {tokens} != {ref}"
            assert st.demand_loads > 0 and st.bytes_loaded > 0


@pytest.mark.parametrize("family", [f for f in HF_FAMILIES + SYNTHETIC_FAMILIES if f != "mixtral"])
def test_each_family_each_policy_gives_the_resident_tokens(stores, family):
    """Every policy once, on a budget that rotates over top-k / one layer / half."""
    root = _store(stores, family)
    ref = _reference(stores, family)
    budgets = _budgets(root, torch.float32)
    for i, policy in enumerate(POLICY_NAMES):
        label, budget = budgets[i % len(budgets)]
        tokens, st = _run(root, torch.float32, budget, policy)
        assert tokens == ref, f"{family} budget {label} policy {policy}: {tokens} != {ref}"
        assert st.demand_loads > 0

def test_resident_through_open_experts(stores):
    root = _store(stores, "mixtral")
    ref = _reference(stores, "mixtral")
    src = open_experts(root, torch.float32, "cpu", "100%", None)
    assert isinstance(src, ResidentExperts)
    assert greedy(load_model(root, dtype=torch.float32, experts=src), PROMPT, STEPS) == ref
    assert src.stats().hits > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_compute_dtype_differs_from_store_dtype(stores, family):
    """bf16 compute over fp32 shards: the loader converts into the slots; same tokens as resident bf16."""
    root = _store(stores, family)
    ref = _reference(stores, family, torch.bfloat16)
    for label, budget in _budgets(root, torch.bfloat16)[:2]:
        tokens, _ = _run(root, torch.bfloat16, budget, "lru")
        assert tokens == ref, label


def test_buffered_reads_give_the_same_tokens(stores):
    root = _store(stores, "mixtral")
    _label, budget = _budgets(root, torch.float32)[1]
    tokens, st = _run(root, torch.float32, budget, "lfu", direct=False)
    assert st.io == "buffered"
    assert tokens == _reference(stores, "mixtral")


def test_single_worker_and_no_prefetch(stores):
    root = _store(stores, "olmoe")
    _label, budget = _budgets(root, torch.float32)[2]
    tokens, st = _run(root, torch.float32, budget, "eam", workers=1, prefetch=False)
    assert st.prefetch_loads == 0
    assert tokens == _reference(stores, "olmoe")


def _logits(model, prompt, steps):
    out = []
    with torch.inference_mode():
        logits = model.forward(torch.tensor(prompt, dtype=torch.long), 0)
        out.append(logits[-1].clone())
        pos = len(prompt)
        for _ in range(steps - 1):
            logits = model.forward(torch.tensor([int(out[-1].argmax())], dtype=torch.long), pos)
            pos += 1
            out.append(logits[-1].clone())
    return out


def test_offloaded_bf16_logits_are_the_resident_ones_bit_for_bit(stores):
    """Decode with a tight budget (each miss added as it lands, one native call per expert) against
    everything resident: the same logits, bit for bit."""
    root = _store(stores, "mixtral")
    ref = _logits(load_model(root, dtype=torch.bfloat16), PROMPT, STEPS)
    label, budget = _budgets(root, torch.bfloat16)[1]
    src = open_experts(root, torch.bfloat16, "cpu", str(budget), "eam")
    try:
        got = _logits(load_model(root, dtype=torch.bfloat16, experts=src), PROMPT, STEPS)
        assert src.stats().demand_loads > 0
    finally:
        src.close()
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

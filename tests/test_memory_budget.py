"""Budget strings, the auto budget, and the errors users see."""

from __future__ import annotations

import pytest
import torch

from engine.bench.synthetic import make_synthetic_model
from engine.errors import MoeinfError
from engine.memory import open_experts, parse_budget
from engine.memory.budget import resolve_budget
from engine.memory.offload import OffloadedExperts
from engine.memory.resident import ResidentExperts

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "text,kind,size,share",
    [
        ("12GiB", "size", 12 << 30, 0.0),
        ("500MB", "size", 500_000_000, 0.0),
        ("1.5G", "size", int(1.5 * (1 << 30)), 0.0),
        ("64 MiB", "size", 64 << 20, 0.0),
        ("4096", "size", 4096, 0.0),
        ("25%", "share", 0, 0.25),
        ("auto", "auto", 0, 0.0),
        ("100%", "all", 0, 0.0),
        (None, "all", 0, 0.0),
    ],
)
def test_parse_budget(text, kind, size, share):
    spec = parse_budget(text)
    assert (spec.kind, spec.size, spec.share) == (kind, size, share)


@pytest.mark.parametrize("bad", ["lots", "12XB", "-3GB", "0", "0%", "150%", "GB", "1e3GB", "%"])
def test_bad_budget_is_one_line_error(bad):
    with pytest.raises(MoeinfError) as err:
        parse_budget(bad)
    msg = str(err.value)
    assert "\n" not in msg and bad.strip() in msg


def test_resolve_share_size_and_auto():
    total = 1000 << 20
    assert resolve_budget(parse_budget("25%"), total, CPU).bytes == total // 4
    assert resolve_budget(parse_budget("100MiB"), total, CPU).bytes == 100 << 20
    assert resolve_budget(parse_budget("2GiB"), total, CPU).bytes is None  # holds everything
    gib = 1 << 30
    r = resolve_budget(parse_budget("auto"), 100 * gib, CPU, dense_bytes=2 * gib, kv_bytes=gib, available=20 * gib)
    assert r.bytes == 20 * gib - 2 * gib - gib - 2 * gib  # margin: 10% of the free memory (>= 1 GiB)
    assert r.note.startswith("auto:") and "dense" in r.note and "KV cache" in r.note
    r = resolve_budget(parse_budget("auto"), gib, CPU, available=20 * gib)
    assert r.bytes is None and "all experts resident" in r.note


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_synthetic_model("budget-test", "mixtral", num_layers=2, num_experts=4, top_k=2, hidden=64,
                                intermediate=128, vocab=300, dtype=torch.float32, root=root)


def test_open_experts_kinds(small_model):
    assert isinstance(open_experts(small_model, torch.float32, "cpu", None, None), ResidentExperts)
    assert isinstance(open_experts(small_model, torch.float32, "cpu", "100%", None), ResidentExperts)
    src = open_experts(small_model, torch.float32, "cpu", "50%", "lru")
    try:
        assert isinstance(src, OffloadedExperts)
        st = src.stats()
        assert st.slots == (st.expert_bytes_total // 2) // st.slot_bytes >= 2
        assert st.slots * st.slot_bytes <= st.budget_bytes
        assert st.policy == "lru" and st.io in ("O_DIRECT", "buffered")
    finally:
        src.close()


def test_auto_budget_is_reported(small_model):
    from engine.store.opened import as_store_model

    free = (1 << 30) + as_store_model(small_model).dense_bytes(torch.float32) + (400 << 10)  # 1 GiB margin + 400 KiB
    src = open_experts(small_model, torch.float32, "cpu", "auto", "lru", ctx=0, available=free)
    try:
        st = src.stats()
        assert st.budget_note.startswith("auto:")
        assert st.budget_bytes == 400 << 10 and st.slots == (400 << 10) // st.slot_bytes >= 2
    finally:
        src.close()
    # plenty of memory: everything resident, and it says so
    src = open_experts(small_model, torch.float32, "cpu", "auto", "lru", available=64 << 30)
    assert isinstance(src, ResidentExperts) and "all experts resident" in src.stats().budget_note


def test_budget_below_one_layer_names_the_minimum(small_model):
    with pytest.raises(MoeinfError) as err:
        open_experts(small_model, torch.float32, "cpu", "100KB", "lru")
    msg = str(err.value)
    assert "minimum" in msg and "--expert-budget" in msg and "\n" not in msg
    # the minimum it names is enough
    need = msg.split("--expert-budget ")[1].split()[0]
    src = open_experts(small_model, torch.float32, "cpu", need, "lru")
    assert src.stats().slots == 2
    src.close()


def test_unknown_policy_is_user_error(small_model):
    for budget in ("50%", None):
        with pytest.raises(MoeinfError) as err:
            open_experts(small_model, torch.float32, "cpu", budget, "fifo-magic")
        assert "lru" in str(err.value)

"""The request lifecycle and what closing releases.

* in a live chat the expert cache's policy hears one sequence per turn (begin before the turn's
  first routing, end after its last);
* twenty ``/load`` cycles in a chat leave the thread count and the resident memory flat (the old
  session's cache arena, loader threads and files are released by ``close``, not by the garbage
  collector);
* ``moeinf bench`` over several configurations ends within one expert budget of the memory it had
  after the first (each repetition closes what it opened).
"""

from __future__ import annotations

import gc
import io
import os
import threading

import pytest
import torch
from rich.console import Console

import engine
from engine.bench.run import bench_main
from engine.bench.synthetic import make_synthetic_model
from engine.errors import MoeinfError
from moeinf_cli.repl import ChatRepl

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def big_model(name: str = "life"):
    """4 layers x 8 experts of 1.5 MiB (float32): 48 MiB of experts, a 24 MiB arena at 50%."""
    return make_synthetic_model(
        name,
        "mixtral",
        num_layers=4,
        num_experts=8,
        top_k=2,
        hidden=256,
        intermediate=512,
        vocab=300,
        dtype=torch.float32,
    )


def make_repl(name: str, **load_kwargs) -> ChatRepl:
    return ChatRepl(
        name,
        {"ctx": 96, **load_kwargs},
        {"num_predict": 3, "temperature": 0},
        None,
        False,
        console=Console(file=io.StringIO(), width=100),
        err_console=Console(file=io.StringIO()),
        answer_stream=io.StringIO(),
    )


def test_chat_policy_hears_one_sequence_per_turn():
    big_model()
    repl = make_repl("life", expert_budget="50%", policy="lru")
    repl.load()
    try:
        events: list[str] = []
        policy = repl.session.experts.policy
        for hook in ("begin_sequence", "end_sequence", "on_route"):
            inner = getattr(policy, hook)

            def spy(*a, _inner=inner, _hook=hook, **k):
                events.append(_hook)
                return _inner(*a, **k)

            setattr(policy, hook, spy)
        for text in ("hello there", "and again", "one more"):
            assert repl.handle(text)
        turns, prev = [], None
        for e in events:  # collapse the runs of routing events
            if e != prev:
                turns.append(e)
            prev = e
        assert turns == ["begin_sequence", "on_route", "end_sequence"] * 3
        assert repl.session.experts.stats().sequences == 3
    finally:
        repl.close()


def test_twenty_loads_leave_threads_and_memory_flat():
    big_model()
    repl = make_repl("life", expert_budget="50%", policy="lru")
    gc.collect()
    gc.disable()  # what close releases must not wait for the garbage collector
    try:
        repl.load()
        assert repl.handle("hello")
        budget = repl.session.experts.stats().budget_bytes
        assert budget and budget >= 20 << 20
        first_threads, first_rss = threading.active_count(), rss()
        for _ in range(19):
            assert repl.handle("/load life")
            assert repl.handle("hello")
        assert threading.active_count() == first_threads
        grown = rss() - first_rss
        assert grown < budget, (
            f"resident memory grew {grown >> 20} MiB over 20 loads (budget {budget >> 20} MiB)"
        )
    finally:
        gc.enable()
        repl.close()
    assert repl.session is None


def test_closed_session_refuses_work_and_releases_the_cache():
    big_model()
    with engine.load("life", expert_budget="50%", policy="lru", ctx=64) as s:
        experts = s.experts
        out = "".join(p for p in s.generate("hi", num_predict=2, temperature=0) if isinstance(p, str))
        assert isinstance(out, str)
        loaders = [t for t in threading.enumerate() if t.name.startswith("moeinf-loader")]
        assert loaders
    assert s.closed and s.model is None and not experts.slots
    assert not any(t.is_alive() for t in loaders)
    with pytest.raises(MoeinfError, match="session is closed"):
        s.generate("hi")
    s.close()  # idempotent


def test_bench_memory_stays_within_one_budget_of_the_first_configuration():
    big_model("bench-life")
    samples: list[int] = []

    def progress(msg: str) -> None:
        if "policy" in msg:  # "batch 1, budget 50%, policy lru: 2 runs ..."
            samples.append(rss())

    doc = bench_main(
        model="bench-life",
        synthetic=None,
        scale=1.0,
        prompt_tokens=8,
        gen_tokens=4,
        repetitions=2,
        budgets=["50%"],
        policies=["lru", "lfu", "eam", "lru"],
        replay=None,
        profile=False,
        dtype=None,
        device="cpu",
        progress=progress,
    )
    samples.append(rss())
    budget = doc["rows"][0]["budget_bytes"]
    assert budget and budget >= 20 << 20
    after_first = samples[1]  # sampled as the second configuration starts
    assert max(samples[1:]) - after_first < budget, [s >> 20 for s in samples]


@pytest.mark.parametrize("budget", [None, "25%"])
def test_rm_during_a_run_says_so_and_brings_no_traces_back(budget, tmp_path):
    from tiny_models import make_tiny_checkpoint

    from engine.store.paths import traces_dir
    from engine.store.pull import pull_model, remove_model

    pull_model(str(make_tiny_checkpoint("mixtral", tmp_path / "src")), name="gone")
    with engine.load("gone", expert_budget=budget) as s:
        remove_model("gone")  # `moeinf rm gone` from another shell while this one runs
        if budget is None:  # every expert was read at load: the run goes on
            assert list(s.generate("hello", num_predict=4, temperature=0))
        else:  # the next shard it needs is gone: one line that says why
            with pytest.raises(MoeinfError, match=r"'gone' was removed from the store while in use \(`moeinf rm`\)"):
                list(s.generate("hello", num_predict=4, temperature=0))
    assert not traces_dir("gone").exists()

"""The async loader on its own: priority, de-duplication, cancellation, bound, shutdown."""

from __future__ import annotations

import threading
import time
from threading import Condition, RLock

from engine.memory.loader import CANCELLED, DEMAND, DONE, FAILED, PREFETCH, Loader


class Recorder:
    """Loader hooks that log the order of runs; ``gate`` holds the worker inside ``run`` until set."""

    def __init__(self, fail: set | None = None):
        self.lock = Condition(RLock())
        self.started: list = []
        self.ran: list = []
        self.finished: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_run = threading.Event()
        self.fail = fail or set()

    def start(self, job) -> bool:
        self.started.append(job.key)
        return True

    def run(self, job) -> None:
        self.in_run.set()
        self.gate.wait(5)
        if job.key in self.fail:
            raise OSError(f"cannot read {job.key}")
        self.ran.append(job.key)

    def finish(self, job, error) -> None:
        self.finished.append((job.key, error is None))

    def loader(self, **kw) -> Loader:
        return Loader(self.lock, self.start, self.run, self.finish, **kw)


def _block_worker(rec: Recorder, loader: Loader, key="blocker"):
    """Occupy the single worker with one job so the next submissions stay queued."""
    rec.gate.clear()
    rec.in_run.clear()
    job = loader.submit(key, DEMAND)
    assert rec.in_run.wait(5)
    return job


def test_demand_runs_before_prefetch_and_fifo_within_a_priority():
    rec = Recorder()
    loader = rec.loader(workers=1)
    _block_worker(rec, loader)
    loader.submit("p1", PREFETCH)
    loader.submit("p2", PREFETCH)
    loader.submit("d1", DEMAND)
    loader.submit("d2", DEMAND)
    rec.gate.set()
    deadline = time.time() + 5
    while loader.pending() and time.time() < deadline:
        time.sleep(0.01)
    assert rec.ran == ["blocker", "d1", "d2", "p1", "p2"]
    loader.close()


def test_duplicate_requests_share_one_job_and_demand_promotes_a_queued_prefetch():
    rec = Recorder()
    loader = rec.loader(workers=1)
    _block_worker(rec, loader)
    p = loader.submit("x", PREFETCH)
    loader.submit("y", PREFETCH)
    seen = []
    again = loader.submit("x", DEMAND, waiter=lambda j: seen.append(j.state))
    assert again is p and p.priority == DEMAND and p.first_priority == PREFETCH
    assert loader.submit("x", PREFETCH) is p  # still one job, priority not lowered
    assert p.priority == DEMAND
    rec.gate.set()
    assert p.done.wait(5)
    loader.close()
    assert rec.ran.count("x") == 1
    assert rec.ran.index("x") < rec.ran.index("y")  # promoted past the older prefetch
    assert seen == [DONE]


def test_join_a_running_job():
    rec = Recorder()
    loader = rec.loader(workers=1)
    job = _block_worker(rec, loader, key="k")
    seen = []
    assert loader.submit("k", DEMAND, waiter=lambda j: seen.append(j.state)) is job
    rec.gate.set()
    assert job.done.wait(5)
    loader.close()
    assert rec.ran == ["k"] and seen == [DONE]


def test_cancel_drops_only_queued_prefetches():
    rec = Recorder()
    loader = rec.loader(workers=1)
    _block_worker(rec, loader, key=(0, 9))
    a = loader.submit((1, 0), PREFETCH)
    b = loader.submit((1, 1), PREFETCH)
    c = loader.submit((2, 0), PREFETCH)
    d = loader.submit((1, 2), DEMAND)
    n = loader.cancel(lambda k: k[0] == 1)
    assert n == 2 and a.state == CANCELLED and b.state == CANCELLED
    assert loader.cancel(lambda k: k == (0, 9)) == 0  # running: not cancellable
    rec.gate.set()
    assert c.done.wait(5) and d.done.wait(5)
    loader.close()
    assert sorted(rec.ran, key=str) == sorted([(0, 9), (1, 2), (2, 0)], key=str)
    assert loader.cancelled == 2


def test_queue_of_prefetches_is_bounded_demand_is_not():
    rec = Recorder()
    loader = rec.loader(workers=1, max_prefetch=3)
    _block_worker(rec, loader)
    got = [loader.submit(("p", i), PREFETCH) for i in range(5)]
    assert [g is not None for g in got] == [True, True, True, False, False]
    assert loader.dropped == 2
    demands = [loader.submit(("d", i), DEMAND) for i in range(10)]
    assert all(d is not None for d in demands)
    # promoting a queued prefetch frees its place in the bound
    loader.submit(("p", 0), DEMAND)
    assert loader.submit(("p", 9), PREFETCH) is not None
    rec.gate.set()
    loader.close()


def test_failure_reaches_waiters_and_worker_survives():
    rec = Recorder(fail={"bad"})
    loader = rec.loader(workers=1)
    states = []
    bad = loader.submit("bad", DEMAND, waiter=lambda j: states.append((j.state, type(j.error).__name__)))
    assert bad.done.wait(5)
    good = loader.submit("good", DEMAND)
    assert good.done.wait(5)
    loader.close()
    assert states == [(FAILED, "OSError")]
    assert good.state == DONE and ("bad", False) in rec.finished


def test_close_cancels_queue_finishes_running_and_joins_workers():
    rec = Recorder()
    loader = rec.loader(workers=2)
    rec.gate.clear()
    first = loader.submit("a", DEMAND)
    assert rec.in_run.wait(5)
    queued = [loader.submit(("q", i), PREFETCH) for i in range(5)]
    closer = threading.Thread(target=loader.close)
    closer.start()
    time.sleep(0.05)
    rec.gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert first.state == DONE
    assert all(q.state in (CANCELLED, DONE) for q in queued)
    assert not any(t.is_alive() for t in loader._threads)
    assert loader.submit("late", DEMAND) is None
    loader.close()  # idempotent


def test_loader_threads_end_when_owner_is_collected():
    import gc

    rec = Recorder()
    loader = rec.loader(workers=2)
    threads = list(loader._threads)
    loader.submit("x", DEMAND).done.wait(5)
    loader.close()
    del loader
    gc.collect()
    assert not any(t.is_alive() for t in threads)

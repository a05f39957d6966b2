"""The async loader: background workers draining a priority queue of expert loads.

* Priorities: ``DEMAND`` (the compute waits for it) before ``PREFETCH`` (a guess), FIFO within one.
* De-duplication: one job per key while it is queued or running; a second request joins it, and a
  demand request for a queued prefetch promotes it.
* Cancellation: queued prefetches can be dropped by predicate (stale predictions); running jobs finish.
* Bounded: at most ``max_prefetch`` prefetches wait in the queue; more are refused.
* Shutdown: ``close()`` cancels what is queued, lets running jobs finish and joins the workers; workers
  are daemon threads and ``close`` is also registered to run at interpreter exit.

The loader knows nothing about slots or files: the owner passes three hooks, called with the shared
lock held except ``run``: ``start(job) -> bool`` (prepare, e.g. claim a slot; False drops the job),
``run(job)`` (the I/O, lock released) and ``finish(job, error)``.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

DEMAND = 0
PREFETCH = 1

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(eq=False)
class Job:
    """One load. ``waiters`` are called (lock held) when it completes, fails or is cancelled."""

    key: Hashable
    priority: int
    seq: int
    state: str = QUEUED
    first_priority: int = PREFETCH
    slot: Any = None
    error: BaseException | None = None
    waiters: list[Callable[[Job], None]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    data: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class Loader:
    def __init__(
        self,
        lock: threading.Condition,
        start: Callable[[Job], bool],
        run: Callable[[Job], None],
        finish: Callable[[Job, BaseException | None], None],
        workers: int = 2,
        max_prefetch: int = 64,
        name: str = "moeinf-loader",
    ):
        self.lock = lock
        self._start, self._run, self._finish = start, run, finish
        self.max_prefetch = max_prefetch
        self._heap: list[tuple[int, int, Job]] = []
        self._jobs: dict[Hashable, Job] = {}  # queued or running, by key
        self._seq = itertools.count()
        self._queued_prefetch = 0
        self._closing = False
        self.cancelled = 0
        self.dropped = 0
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda s: s.close() if s is not None else None)(ref())
        atexit.register(self._atexit)

    # -- requests (callers may or may not hold the lock: it is reentrant) --

    def get(self, key: Hashable) -> Job | None:
        """The queued or running job for ``key``, if any."""
        with self.lock:
            return self._jobs.get(key)

    def submit(
        self, key: Hashable, priority: int, waiter: Callable[[Job], None] | None = None, **data: Any
    ) -> Job | None:
        """Queue a load of ``key`` (or join the one in flight). None if refused (closing, queue full)."""
        with self.lock:
            if self._closing:
                return None
            job = self._jobs.get(key)
            if job is not None:
                if priority < job.priority and job.state == QUEUED:
                    if job.priority == PREFETCH:
                        self._queued_prefetch -= 1
                    job.priority = priority
                    job.data.update(data)
                    heapq.heappush(self._heap, (priority, next(self._seq), job))
                    self.lock.notify_all()
                if waiter is not None:
                    job.waiters.append(waiter)
                return job
            if priority == PREFETCH and self._queued_prefetch >= self.max_prefetch:
                self.dropped += 1
                return None
            seq = next(self._seq)
            job = Job(key, priority, seq, first_priority=priority, data=dict(data))
            if waiter is not None:
                job.waiters.append(waiter)
            self._jobs[key] = job
            if priority == PREFETCH:
                self._queued_prefetch += 1
            heapq.heappush(self._heap, (priority, seq, job))
            self.lock.notify_all()
            return job

    def cancel(self, predicate: Callable[[Hashable], bool]) -> int:
        """Cancel queued (not running) prefetch jobs whose key matches. Returns how many."""
        with self.lock:
            n = 0
            for job in list(self._jobs.values()):
                if job.state == QUEUED and job.priority == PREFETCH and predicate(job.key):
                    self._drop(job)
                    n += 1
            self.cancelled += n
            return n

    def pending(self) -> int:
        with self.lock:
            return len(self._jobs)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel queued jobs, let running ones finish, join the workers. Idempotent."""
        with self.lock:
            if not self._closing:
                self._closing = True
                for job in list(self._jobs.values()):
                    if job.state == QUEUED:
                        self._drop(job)
                self.lock.notify_all()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me and t.is_alive():
                t.join(timeout)
        try:
            atexit.unregister(self._atexit)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    @property
    def closed(self) -> bool:
        return self._closing

    # -- internals (lock held) --

    def _drop(self, job: Job) -> None:
        if job.priority == PREFETCH and job.state == QUEUED:
            self._queued_prefetch -= 1
        job.state = CANCELLED
        self._jobs.pop(job.key, None)
        self._complete(job)

    def _complete(self, job: Job) -> None:
        for w in job.waiters:
            w(job)
        job.done.set()
        self.lock.notify_all()

    def _next(self) -> Job | None:
        while self._heap:
            priority, _seq, job = heapq.heappop(self._heap)
            if job.state != QUEUED or priority != job.priority:
                continue  # cancelled, or superseded by a promotion
            return job
        return None

    def _worker(self) -> None:
        while True:
            with self.lock:
                job = None
                while job is None:
                    if self._closing:
                        return
                    job = self._next()
                    if job is None:
                        self.lock.wait()
                if job.priority == PREFETCH:
                    self._queued_prefetch -= 1
                job.state = RUNNING
                try:
                    ok = self._start(job)
                except BaseException as e:  # noqa: BLE001 - reported to the waiters
                    job.error, ok = e, False
                if not ok:
                    job.state = FAILED if job.error else CANCELLED
                    self._jobs.pop(job.key, None)
                    self._complete(job)
                    continue
            error: BaseException | None = None
            try:
                self._run(job)
            except BaseException as e:  # noqa: BLE001 - reported to the waiters
                error = e
            with self.lock:
                job.error = error
                job.state = FAILED if error else DONE
                self._jobs.pop(job.key, None)
                try:
                    self._finish(job, error)
                finally:
                    self._complete(job)

"""The one model worker: a bounded, fair queue of generations and the thread that runs them.

The session is not shared between threads: only the worker thread touches it. A request becomes a
``Job`` (prompt token ids, sampling options and the client it came from), waits its turn in the queue
(at most ``max_queue`` wait; beyond that ``submit`` raises ``QueueFull``). The queue is fair between
clients: each client's requests run in the order they came, and the clients take turns (round
robin), so one client sending many requests does not hold back another's single one. A running job
streams its pieces back to the event loop that submitted it. ``Job.cancel`` (a client that went away) takes a waiting job out of the queue, or stops a
running one before its next token; the session's KV cache stays consistent either way. Requests run
one after another, so no request ever sees another's tokens; the session reuses the KV cache of the
longest common token prefix with the previous request (a conversation resent with one more turn
prefills only the new turn). With ``batch_size`` above 1 up to that many jobs run at once on a
``BatchScheduler`` (continuous batching: a job joins the running batch at the next step and leaves it
the step it ends, each with its own KV-cache slot, sampler and stop strings, so none sees another's
tokens); the fair queue still decides who comes next, and the prompt is prefilled whole each time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from engine.errors import MoeinfError
from engine.runtime.batch_scheduler import BatchScheduler, BatchStream
from engine.runtime.stats import GenerationStats

log = logging.getLogger("moeinf.serve")

_END = object()


class QueueFull(Exception):
    """Every queue slot is taken; the client should retry later."""


class Job:
    """One generation: its prompt ids and options, a cancel flag and the stream of what it produced."""

    def __init__(
        self,
        ids: Sequence[int],
        sampling: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        reuse_prefix: bool = True,
        client: str = "",
    ):
        self.ids = [int(t) for t in ids]
        self.sampling = dict(sampling)
        self.reuse_prefix = reuse_prefix  # False: prefill the whole prompt (the KV cache is cleared first)
        self.client = client  # whose request: the queue takes turns between clients
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when the worker took it
        self.first_piece: float | None = None  # when its first text piece came
        self.stats: GenerationStats | None = None
        self.failed = False  # the generation raised
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()
        self._scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop this job: out of the queue if it waits, before its next token if it runs."""
        self.cancelled.set()
        if self._scheduler is not None:
            self._scheduler._discard(self)

    def _emit(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def stream(self) -> AsyncIterator[str | GenerationStats]:
        """Text pieces, then the GenerationStats (absent when cancelled); raises the generation's error."""
        while True:
            item = await self._items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                self.failed = True
                raise item
            if isinstance(item, GenerationStats):
                self.stats = item
            elif self.first_piece is None:
                self.first_piece = time.perf_counter()
            yield item


class FairQueue:
    """Waiting jobs, one first-in-first-out line per client; ``popleft`` takes the clients in turn."""

    def __init__(self) -> None:
        self._lines: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def __iter__(self) -> Iterator[Job]:
        return (job for line in list(self._lines.values()) for job in list(line))

    def append(self, job: Job) -> None:
        self._lines.setdefault(job.client, collections.deque()).append(job)

    def popleft(self) -> Job:
        client, line = next(iter(self._lines.items()))
        job = line.popleft()
        del self._lines[client]
        if line:  # the client's next job waits behind the other clients' first ones
            self._lines[client] = line
        return job

    def remove(self, job: Job) -> bool:
        line = self._lines.get(job.client)
        if line is None or job not in line:
            return False
        line.remove(job)
        if not line:
            del self._lines[job.client]
        return True

    def clear(self) -> None:
        self._lines.clear()


class Scheduler:
    """Runs jobs on ``session`` (clients in turn, each in order) in its own thread: one at a time
    (``batch_size`` 1), or up to ``batch_size`` decoded together by a ``BatchScheduler``."""

    def __init__(self, max_queue: int, batch_size: int = 1):
        if max_queue < 0:
            raise MoeinfError(f"--max-queue must be 0 or more, got {max_queue}")
        if batch_size < 1:
            raise MoeinfError(f"--batch-size must be at least 1, got {batch_size}")
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.session: Any = None
        self.batch: BatchScheduler | None = None  # batch_size > 1: the running batch
        self.cancelled_count = 0  # jobs cancelled while waiting or running
        self._queue = FairQueue()
        self._cond = threading.Condition()
        self._running: dict[Job, BatchStream | None] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the event loop's side -------------------------------------------------------------

    def start(self, session: Any) -> None:
        self.session = session
        if self.batch_size > 1:
            self.batch = BatchScheduler(session, max_batch=self.batch_size)
        self._thread = threading.Thread(target=self._work, name="moeinf-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; ``QueueFull`` when ``max_queue`` jobs already wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            busy = len(self._running) >= self.batch_size or len(self._queue) > 0
            if busy and len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            job._scheduler = self
            self._queue.append(job)
            self._cond.notify_all()
        return job

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def batch_stats(self) -> tuple[int, int, int] | None:
        """(steps, sequences summed over the steps, most sequences in one step) of the batch, or None."""
        if self.batch is None:
            return None
        b = self.batch.batch
        return b.steps, b.sequence_steps, b.peak_batch

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what waits, let the running jobs see their cancel flags, end the thread (and the batch)."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancelled.set()
                job._emit(_END)
            self._queue.clear()
            running = list(self._running.items())
            for job, _ in running:
                job.cancelled.set()
            self._cond.notify_all()
        for _, stream in running:
            if stream is not None:
                stream.close()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.batch is not None:
            self.batch.close()

    def _discard(self, job: Job) -> None:
        with self._cond:
            if self._queue.remove(job):
                self.cancelled_count += 1
                job._emit(_END)
                return
            stream = self._running.get(job)
        if stream is not None:
            stream.close()  # leaves the batch before its next step

    # ---- the worker thread -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not len(self._queue) or len(self._running) >= self.batch_size):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running[job] = None
            if self.batch is None:
                try:
                    self._run(job)
                finally:
                    self._done(job)
            else:
                self._join_batch(job)

    def _done(self, job: Job) -> None:
        with self._cond:
            self._running.pop(job, None)
            if job.cancelled.is_set():
                self.cancelled_count += 1
            self._cond.notify_all()

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        try:
            if not job.reuse_prefix:
                self.session.reset()
            gen = self.session.generate_ids(job.ids, **job.sampling)
            try:
                for item in gen:
                    if job.cancelled.is_set():
                        break
                    job._emit(item)
            finally:
                gen.close()  # a cancelled generation stops here, its KV cache consistent
        except Exception as err:
            _fail(job, err)
        finally:
            job._emit(_END)

    def _join_batch(self, job: Job) -> None:
        """Hand ``job`` to the running batch; a thread of its own carries its pieces back."""
        assert self.batch is not None
        job.started = time.perf_counter()
        try:
            stream = self.batch.submit_ids(job.ids, **job.sampling)
        except Exception as err:
            _fail(job, err)
            job._emit(_END)
            self._done(job)
            return
        with self._cond:
            self._running[job] = stream
        if job.cancelled.is_set():
            stream.close()
        threading.Thread(target=self._relay, args=(job, stream), name="moeinf-relay", daemon=True).start()

    def _relay(self, job: Job, stream: BatchStream) -> None:
        try:
            for item in stream:
                if job.cancelled.is_set():
                    break
                job._emit(item)
        except Exception as err:
            _fail(job, err)
        finally:
            stream.close()
            job._emit(_END)
            self._done(job)


def _fail(job: Job, err: Exception) -> None:
    """The job ends with ``err``: a MoeinfError as it is; a bug or a device error logged (the server goes on)."""
    if not isinstance(err, MoeinfError):
        log.exception("generation failed", exc_info=err)
    job._emit(err)

"""Continuous batching for a server: a thread steps a ``BatchSession`` while requests come and go.

``BatchScheduler(session, max_batch)`` starts one worker thread that owns the batch. Any thread may
``submit`` a request; it gets a ``BatchStream`` that yields exactly what ``Session.generate`` yields
(text pieces, then one ``GenerationStats``), so a server written against ``Session.generate`` decodes
its concurrent requests together by calling ``scheduler.submit(...)`` instead. A request joins the
running batch at the next step and leaves it the step it ends; ``stream.close()`` (or leaving the
iteration early, e.g. a client that disconnected) cancels it and frees its place at once.

Bad options, an empty prompt or a prompt longer than the context raise ``MoeinfError`` from ``submit``
itself. An error inside a step (a failing expert load) ends every request then running with that error
(each stream raises it) and the scheduler goes on with the next requests.

Example (a server's handler threads)::

    sched = BatchScheduler(engine.load("mixtral"), max_batch=8)
    for piece in sched.submit([{"role": "user", "content": "Hi"}], temperature=0):
        ...  # str pieces, then GenerationStats
    sched.close()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from engine.errors import MoeinfError
from engine.runtime.batch import BatchEvent, BatchRequest, BatchSession
from engine.runtime.sampling import SamplingParams
from engine.runtime.stats import GenerationStats

_END = object()


class BatchStream:
    """One request's output, as an iterator of ``str`` pieces then one ``GenerationStats``.
    ``request`` is its ``BatchRequest`` once the worker has queued it (None before)."""

    def __init__(self, scheduler: BatchScheduler):
        self._scheduler = scheduler
        self.request: BatchRequest | None = None
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ended = False
        self.cancelled = False

    def _put(self, item: Any) -> None:
        self._items.put(item)

    def __iter__(self) -> Iterator[str | GenerationStats]:
        return self

    def __next__(self) -> str | GenerationStats:
        if self._ended:
            raise StopIteration
        item = self._items.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def close(self) -> None:
        """Stop this request (cancel it if it is still queued or running). Idempotent."""
        if not self._ended:
            self._ended = True
            self._scheduler._cancel(self)

    def __del__(self) -> None:  # a stream dropped unread must not hold its place in the batch
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


class BatchScheduler:
    """A worker thread running ``BatchSession.step()`` whenever requests are queued or running.

    Callers never wait for a step: ``submit`` renders and checks the prompt in the caller's thread and
    hands it to the worker, which adds it to the batch between two steps (so does ``cancel``)."""

    def __init__(self, session: Any, max_batch: int = 8, prefill_chunk: int | None = None):
        self.session = session
        self.batch = BatchSession(session, max_batch=max_batch, prefill_chunk=prefill_chunk)
        self._lock = threading.Condition()
        self._inbox: list[tuple[BatchStream, list[int], SamplingParams]] = []
        self._cancels: list[BatchStream] = []
        self._streams: dict[int, BatchStream] = {}  # by id(request); the worker's alone
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="moeinf-batch", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: Any, raw: bool = False, system: str | None = None, **sampling: Any
    ) -> BatchStream:
        """Queue a request; its stream (see the module docstring). Thread-safe."""
        return self.submit_ids(self.session.prompt_ids(prompt, raw=raw, system=system), **sampling)

    def submit_ids(self, ids: list[int], **sampling: Any) -> BatchStream:
        """Queue a request given as prompt token ids (already rendered); its stream. Thread-safe."""
        params = SamplingParams.from_options(sampling)
        ids = [int(t) for t in ids]
        self.batch.check_prompt(ids)
        stream = BatchStream(self)
        with self._lock:
            if self._closing:
                raise MoeinfError("the batch scheduler is closed")
            self._inbox.append((stream, ids, params))
            self._lock.notify_all()
        return stream

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return len(self.batch.running)

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        with self._lock:
            return len(self.batch.queued) + len(self._inbox)

    def _cancel(self, stream: BatchStream) -> None:
        with self._lock:
            stream.cancelled = True
            if not self._closing:
                self._cancels.append(stream)
                self._lock.notify_all()

    def _deliver(self, ev: BatchEvent) -> None:
        stream = self._streams.get(id(ev.request))
        if stream is None:
            return
        if ev.text:
            stream._put(ev.text)
        if ev.stats is not None:
            stream._put(ev.stats)
            stream._put(_END)
            del self._streams[id(ev.request)]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._inbox or self._cancels or self.batch.busy):
                    self._lock.wait()
                if self._closing:
                    return
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for stream in cancels:
                if stream.request is not None:
                    self._streams.pop(id(stream.request), None)
                    self.batch.cancel(stream.request)
                stream._put(_END)  # a reader blocked on the closed stream (another thread) wakes up
            for stream, ids, params in inbox:
                if stream.cancelled:
                    continue
                stream.request = self.batch.submit_ids(ids, params)
                self._streams[id(stream.request)] = stream
            if not self.batch.busy:
                continue
            try:
                events = self.batch.step()
            except Exception as err:  # noqa: BLE001 - handed to the requests it broke
                for req in self.batch.running:
                    stream = self._streams.pop(id(req), None)
                    self.batch.cancel(req)
                    if stream is not None:
                        stream._put(err)
                continue
            for ev in events:
                self._deliver(ev)

    def close(self) -> None:
        """Stop the worker; requests still queued or running end with a MoeinfError. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
        self._thread.join()
        gone = MoeinfError("the batch scheduler was closed before this request finished")
        for stream in [*self._streams.values(), *(s for s, _, _ in self._inbox)]:
            stream._put(gone)
        self._streams.clear()
        self._inbox.clear()
        self.batch.close()

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

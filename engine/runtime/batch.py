"""Continuous batching: many sequences decoded together, each joining and leaving at any step.

``BatchSession(session, max_batch)`` gives the session's model ``max_batch`` KV-cache slots. Requests
are ``submit``-ted (a prompt and its own sampling options) and wait in a queue; every ``step()`` admits
queued requests into free slots, then runs ONE forward pass over every running sequence: a decode
token for each sequence that has one, and a chunk of the prompt of each sequence still prefilling
(at most ``prefill_chunk`` prompt tokens per step in all, so a long prompt does not stall the others
for long). Each sequence then samples its next token with its own sampler, detokeniser and stop
scanner, exactly as ``Session.generate`` does; a sequence that ends (EOS, stop string, ``num_predict``,
full context, ``cancel``) leaves at once and its slot is free for the next request in the same step.

The MoE layers see the whole batch's tokens at once and run expert-major (``MoEBlock``): each distinct
expert of a layer is fetched once per step, whatever the batch size, so a load is shared by every
sequence that routes to it.

``step()`` returns ``BatchEvent``s: the text each sequence produced in that step, and for a sequence
that finished, its ``GenerationStats``. A server drives ``step()`` from one thread while requests come
and go (``submit``/``cancel`` between steps); ``run()`` is the offline loop of ``moeinf run --batch``.

Example::

    s = engine.load("mixtral")
    with BatchSession(s, max_batch=8) as batch:
        a = batch.submit("Why is the sky blue?", temperature=0)
        b = batch.submit([{"role": "user", "content": "Hi"}], num_predict=16)
        while batch.busy:
            for ev in batch.step():
                print(ev.request.id, ev.text, ev.stats)

A batch records no routing traces: one step's rows belong to several requests, not one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import MoeinfError
from engine.runtime.detokenize import StreamDecoder
from engine.runtime.sampling import Sampler, SamplingParams
from engine.runtime.stats import GenerationStats
from engine.runtime.stops import StopScanner

QUEUED, PREFILL, DECODE, DONE = "queued", "prefill", "decode", "done"


@dataclass(eq=False)
class BatchRequest:
    """One sequence of a batch: its prompt ids, options and progress (read it; the session updates it)."""

    id: Any
    ids: list[int]
    params: SamplingParams
    state: str = QUEUED
    slot: int | None = None
    pos: int = 0  # tokens of this sequence in its KV-cache slot
    next_token: int | None = None  # sampled, not yet run through the model
    text: list[str] = field(default_factory=list)  # every piece of text produced so far
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted_at: float = 0.0
    joined_at: float | None = None  # first step it took part in
    first_token_at: float | None = None  # its prompt was all in the cache
    finished_at: float | None = None
    # per-sequence sampling state
    _history: list[int] = field(default_factory=list, repr=False)
    _sampler: Any = field(default=None, repr=False)
    _decoder: Any = field(default=None, repr=False)
    _stopper: Any = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def queued_s(self) -> float:
        """Seconds between ``submit`` and the first step it took part in."""
        end = self.joined_at if self.joined_at is not None else time.perf_counter()
        return end - self.submitted_at

    @property
    def response(self) -> str:
        return "".join(self.text)


@dataclass
class BatchEvent:
    """What one step did for one request: new ``text`` (may be empty) and, when it finished, ``stats``."""

    request: BatchRequest
    text: str = ""
    stats: GenerationStats | None = None


class BatchSession:
    """Decode the requests of many callers together on one ``Session``'s model (see the module docstring).

    While it is open the model has ``max_batch`` KV-cache slots of the session's ``ctx`` positions each
    (``max_batch`` times the KV memory of one sequence) and the session's own cached conversation is
    forgotten; ``close()`` gives the model back one slot.
    """

    def __init__(self, session: Any, max_batch: int = 8, prefill_chunk: int | None = None):
        if max_batch < 1:
            raise MoeinfError(f"the batch size must be at least 1, got {max_batch}")
        model = session.model
        if not hasattr(model, "forward_batch"):
            raise MoeinfError("this model cannot run batches (its forward has no batch path)")
        self.session = session
        self.model = model
        self.max_batch = int(max_batch)
        self.ctx = int(session.ctx)
        self.prefill_chunk = max(1, int(prefill_chunk or getattr(session, "prefill_chunk", 512)))
        self.eos = set(session.tokenizer.eos_ids)
        self._queue: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        self._free_slots = list(range(self.max_batch))
        self._ids = itertools.count()
        self.steps = 0
        self.sequence_steps = 0  # sequences summed over the steps (steps x mean batch size)
        self.peak_batch = 0  # most sequences in one step
        self.tokens_generated = 0
        session.reset()
        model.setup_caches(self.ctx, session.dtype, session.device, slots=self.max_batch)
        experts = getattr(session, "experts", None)
        self._recorder = getattr(experts, "recorder", None)
        if self._recorder is not None:
            experts.recorder = None  # rows of several requests are not one request's routing
        self._closed = False

    # ---- requests ------------------------------------------------------------------------------

    def submit(
        self, prompt: Any, raw: bool = False, system: str | None = None, id: Any = None, **sampling: Any
    ) -> BatchRequest:
        """Queue a request (a text, or a list of messages, rendered as ``Session.generate`` renders it).

        Bad options, an empty prompt or one that does not fit the context raise MoeinfError here."""
        self._check_open()
        params = SamplingParams.from_options(sampling)
        ids = self.session.prompt_ids(prompt, raw=raw, system=system)
        return self.submit_ids(ids, params, id=id)

    def submit_ids(self, ids: list[int], params: SamplingParams, id: Any = None) -> BatchRequest:
        """Queue a request given as token ids."""
        self._check_open()
        ids = [int(t) for t in ids]
        self.check_prompt(ids)
        req = BatchRequest(id=next(self._ids) if id is None else id, ids=ids, params=params)
        req.submitted_at = time.perf_counter()
        req.stats.prompt_tokens = req.stats.prompt_eval_count = len(ids)
        req._history = list(ids)
        req._sampler = Sampler(params)
        req._decoder = StreamDecoder(self.session.tokenizer)
        req._stopper = StopScanner(params.stop)
        self._queue.append(req)
        return req

    def check_prompt(self, ids: list[int]) -> None:
        """MoeinfError unless ``ids`` is a prompt this batch can take (not empty, room left for a reply)."""
        if not ids:
            raise MoeinfError("the prompt is empty; give some text")
        if len(ids) >= self.ctx:
            raise MoeinfError(
                f"the prompt is {len(ids)} tokens but the context holds {self.ctx} (and needs room for the reply); "
                f"shorten the prompt or raise --ctx"
            )

    def cancel(self, request: BatchRequest) -> BatchEvent | None:
        """Take a request out (queued or running) at once; its slot is free for the next step.
        Returns its final event (done_reason "cancel"), or None when it had already finished."""
        if request.done:
            return None
        if request in self._queue:
            self._queue.remove(request)
        return self._finish(request, "cancel", time.perf_counter(), flush=False)

    @property
    def running(self) -> list[BatchRequest]:
        return list(self._running)

    @property
    def queued(self) -> list[BatchRequest]:
        return list(self._queue)

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._queue or self._running)

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[BatchEvent]:
        """Admit what fits, run one forward pass over every running sequence, sample; the events."""
        self._check_open()
        now = time.perf_counter()
        while self._queue and self._free_slots:
            req = self._queue.popleft()
            req.slot = self._free_slots.pop(0)
            req.state = PREFILL
            req.joined_at = now
            self._running.append(req)
        if not self._running:
            return []
        tokens: list[int] = []
        segments: list[tuple[int, int, int]] = []
        members: list[BatchRequest] = []
        budget = self.prefill_chunk
        for req in self._running:
            if req.state == DECODE:
                assert req.next_token is not None
                run = [req.next_token]
            else:
                if budget <= 0:
                    continue  # its prompt waits for the next step
                run = req.ids[req.pos : req.pos + budget]
                budget -= len(run)
            assert req.slot is not None
            tokens += run
            segments.append((req.slot, req.pos, len(run)))
            members.append(req)
        with torch.inference_mode():
            logits = self.model.forward_batch(
                torch.tensor(tokens, dtype=torch.long, device=self.session.device), segments
            )
        self.steps += 1
        self.sequence_steps += len(members)
        self.peak_batch = max(self.peak_batch, len(members))
        now = time.perf_counter()
        events: list[BatchEvent] = []
        for row, req in enumerate(members):
            req.pos += segments[row][2]
            if req.state == PREFILL:
                if req.pos < len(req.ids):
                    continue  # more of its prompt next step
                req.state = DECODE
                req.first_token_at = now
                req.stats.prompt_eval_s = now - (req.joined_at or now)
            events.append(self._advance(req, logits[row], now))
        return events

    def _advance(self, req: BatchRequest, logits: torch.Tensor, now: float) -> BatchEvent:
        """Sample ``req``'s next token from ``logits`` and move it on (the decode loop of ``Session``)."""
        st = req.stats
        token = req._sampler(logits, req._history)
        if token in self.eos:
            return self._finish(req, "stop", now)
        st.generated_tokens += 1
        self.tokens_generated += 1
        req._history.append(token)
        text, stopped = req._stopper.push(req._decoder.push(token))
        if stopped:
            return self._finish(req, "stop", now, text, flush=False)
        limit = req.params.num_predict
        if req.pos >= self.ctx or (limit >= 0 and st.generated_tokens >= limit):
            return self._finish(req, "length", now, text)
        req.next_token = token
        if text:
            req.text.append(text)
        return BatchEvent(req, text)

    def _finish(
        self, req: BatchRequest, reason: str, now: float, text: str = "", flush: bool = True
    ) -> BatchEvent:
        """``req`` leaves the batch (``flush``: release what its detokeniser and stop scanner hold, as
        ``Session`` does at the end of a reply not cut by a stop string)."""
        if flush and req.state == DECODE:
            tail, hit = req._stopper.push(req._decoder.flush())
            if not hit:
                tail += req._stopper.flush()
            text += tail
            if hit:
                reason = "stop"
        if text:
            req.text.append(text)
        st = req.stats
        st.eval_s = now - req.first_token_at if req.first_token_at is not None else 0.0
        st.total_s = now - req.submitted_at
        st.done_reason = reason
        req.state = DONE
        req.finished_at = now
        if req in self._running:
            self._running.remove(req)
        if req.slot is not None:
            self._free_slots.append(req.slot)
            self._free_slots.sort()
            req.slot = None
        return BatchEvent(req, text, st)

    # ---- the offline loop ----------------------------------------------------------------------

    def run(self) -> Iterator[BatchEvent]:
        """Step until every submitted request has finished; every event as it comes."""
        while self.busy:
            yield from self.step()

    # ---- lifecycle -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MoeinfError("this batch session is closed")

    def close(self) -> None:
        """Cancel what is left, give the model back its single KV-cache slot. Idempotent."""
        if self._closed:
            return
        for req in list(self._running) + list(self._queue):
            self.cancel(req)
        self._closed = True
        experts = getattr(self.session, "experts", None)
        if self._recorder is not None and experts is not None:
            experts.recorder = self._recorder
        self.model.setup_caches(self.ctx, self.session.dtype, self.session.device, slots=1)
        self.session.reset()

    def __enter__(self) -> BatchSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

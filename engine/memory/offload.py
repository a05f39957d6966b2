"""The budgeted expert source: a fixed set of slots, a policy choosing victims and prefetches, and the
async loader filling slots in the background.

Decode step of one MoE layer: ``observe`` tells the policy (and the trace recorder) what the router
picked, cancels queued prefetches the routing made stale and queues the policy's new prefetches;
``fetch`` pins the resident experts and hands them out first, queues demand loads for the misses and
hands each out as it lands, so compute on the first experts overlaps loading the rest. Pins last until
the next ``fetch`` (the ExpertSource contract), so a layer's experts are never evicted under it.
A decode step's misses start reading already in ``observe``, before the policy's bookkeeping, into the
stream slots (idle in decode); their victims are still chosen in ``fetch`` (see "early demand loads").

Prefill (a step with more than one token) touches most experts of every layer. Its misses go to a free
cache slot when there is one (admission without eviction) and otherwise through a couple of stream
slots kept aside from the budget, which are reused as soon as the compute moved on: the decode working
set is not flushed. In a prefill ``fetch`` a handed-out expert stays valid until the caller asks for
the next one. With budgets too small for stream slots, prefill misses evict through the policy.

A decode step of a batch of sequences (``engine.runtime.batch``) is such a step too: the MoE block asks
once for each distinct expert its tokens routed to, the policy hears the whole batch's routing (the
experts and how many tokens each) in one ``on_route``, and the misses stream. At a batch size where a
step needs more experts than the cache holds (at a 25% budget from batch 2 or so) that is what the
offline optimum does as well (``engine.policy.replay.belady_bypass_loads``: keep what fits, stream the
rest); prefetching the next layer would only take slots from that.

Lifecycle: ``begin_sequence`` / ``end_sequence`` bracket each request (the policy hears both; the end
releases pins and drops queued prefetches, guesses for tokens that will not come); ``close`` stops the
loader threads and releases the slot arena, the transfer's buffers and the router hints' maps.
The loader reaches this object only through weak references, so one never closed is still freed
(and its loader stopped) by the garbage collector.

Locking: one reentrant lock (a Condition) guards slots, residency, pins, policy calls and the loader
queue. Policy methods are only ever called with it held.
"""

from __future__ import annotations

import queue
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from threading import Condition, Lock, RLock

import torch

from engine.memory.loader import DEMAND, PREFETCH, Job, Loader
from engine.memory.stats import CacheStats
from engine.memory.transfer import FREE, LOADING, RESIDENT, STREAM, Slot, Transfer
from engine.model.experts import ExpertWeights
from engine.policy.base import Key, Policy

LANDED = "landed"  # an early demand load read into a stream slot, not yet in the cache


class OffloadedExperts:
    """ExpertSource over a budget of ``capacity`` slots (``stream_slots`` of them for prefill streaming)."""

    delivers_as_loaded = True  # fetch yields resident experts first, then each miss as it lands (MoEBlock)

    def __init__(
        self,
        shard_path: Callable[[int, int], Path],
        transfer: Transfer,
        policy: Policy,
        capacity: int,
        num_layers: int,
        num_experts: int,
        top_k: int,
        stream_slots: int | None = None,
        recorder=None,
        workers: int = 2,
        prefetch: bool = True,
        stats: CacheStats | None = None,
        hints=None,
        hint_depth: int = 1,
        early_demand: bool = True,
    ):
        if capacity < top_k:
            raise ValueError(f"capacity {capacity} below top_k {top_k}")
        if stream_slots is None:
            stream_slots = 2 if capacity >= 2 * top_k + 2 else 0
        self._path = shard_path
        self.transfer = transfer
        self.policy = policy
        self.recorder = recorder
        self.top_k = top_k
        self.lock = Condition(RLock())
        self.slots: list[Slot] = transfer.make_slots(capacity, stream_slots)
        self.main_capacity = capacity - stream_slots
        self.n_stream = stream_slots
        self._free_main = [s for s in self.slots if not s.stream]
        self._free_stream = [s for s in self.slots if s.stream]
        self._resident: dict[Key, Slot] = {}
        self._pinned: dict[int, Slot] = {}  # by slot index
        self._landing: dict[Key, Job] = {}  # early demand loads into stream slots (``_land``)
        self.early_demand = early_demand  # decode misses start reading in ``observe`` (see ``_land``)
        self._epoch = 0
        self._last_layer: int | None = None
        self._step_tokens: dict[int, int] = {}
        self.prefetch_limit = max(0, min(4 * top_k, self.main_capacity - 2 * top_k)) if prefetch else 0
        # speculative gating only for policies that listen to hints
        self.hints = hints if hints and type(policy).on_hint is not Policy.on_hint else None
        self.hint_depth = max(1, int(hint_depth))  # how many coming MoE layers get early router scores
        self._stats = stats or CacheStats()
        self._stats.mode = "offload"
        self._stats.io = transfer.io
        self._stats.policy = getattr(policy, "name", type(policy).__name__)
        self._stats.slot_bytes = transfer.slot_bytes
        self._stats.slots = capacity
        self._stats.stream_slots = stream_slots
        policy.setup(num_layers, num_experts, self.main_capacity)
        self._closed = False
        self._reading = 0  # loads between ``_start`` and ``_finish`` (for ``disk_busy_s``)
        self._busy_since = 0.0
        me = weakref.ref(self)
        self.loader = Loader(
            self.lock, _weak(me, "_start", False), _weak(me, "_run", None), _weak(me, "_finish", None),
            workers=workers, max_prefetch=4 * top_k + 16,
        )
        _shorter_gil_switch(True)
        self._finalizer = weakref.finalize(self, _stop_loader, self.loader)

    # -- ExpertSource --

    def begin_sequence(self) -> None:
        """A new request starts (the policy hears it)."""
        with self.lock:
            self._check_open()
            self._drop_landing()
            self._last_layer = None
            self._step_tokens.clear()
            self._stats.sequences += 1
            self.policy.begin_sequence()

    def end_sequence(self) -> None:
        """The request ended: pins released, queued prefetches dropped, the policy told. Idempotent."""
        with self.lock:
            if self._closed:
                return
            self._release_pins()
            self.loader.cancel(lambda _key: True)
            self._drop_landing()
            self._last_layer = None
            self._step_tokens.clear()
            self.policy.end_sequence()

    def observe(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        routed_ids = topk_ids.reshape(-1).tolist()
        tally: dict[int, int] = {}
        for e in routed_ids:
            tally[e] = tally.get(e, 0) + 1
        experts = sorted(tally)  # as torch.unique gives them: ascending, with their counts
        cnts = [tally[e] for e in experts]
        tokens = int(topk_ids.shape[0]) if topk_ids.dim() > 1 else 1
        if tokens == 1 and self.n_stream and self.early_demand:
            self._land(layer, list(dict.fromkeys(routed_ids)))
        if self.recorder is not None:
            self.recorder.on_route(layer, topk_ids)
        hints = []
        if self.hints is not None and tokens == 1 and self.prefetch_limit:
            hints = [(nl, self.hints.scores(nl, hidden[-1])) for nl in self.hints.ahead(layer, self.hint_depth)]
        with self.lock:
            if self._last_layer is None or layer <= self._last_layer:
                self.policy.begin_token()
            self._last_layer = layer
            self._step_tokens[layer] = tokens
            self.policy.on_route(layer, experts, cnts)
            routed = set(experts)
            # what was guessed for this layer and not routed is stale now
            self.loader.cancel(lambda k: k[0] == layer and k[1] not in routed)
            if tokens > 1 or self.prefetch_limit == 0:
                return
            for nl, scores in hints:
                self.policy.on_hint(nl, scores)
            wanted = [k for k in self.policy.prefetch(layer, self.prefetch_limit) if k not in self._resident]
            wanted_set = set(wanted)
            # a newer prediction replaces the queued older ones
            self.loader.cancel(lambda k: k not in wanted_set and k[0] != layer)
            for key in wanted[: self.prefetch_limit]:
                if self.loader.get(key) is None:
                    if self.loader.submit(key, PREFETCH, kind="prefetch") is None:
                        self._stats.prefetch_dropped += 1

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        self._check_open()
        ids = list(dict.fromkeys(int(e) for e in expert_ids))
        # more than one token in this step (or more ids than one token routes): stream the misses
        streaming = self._step_tokens.pop(layer, 1) > 1 or len(ids) > self.top_k
        with self.lock:
            self._release_pins()
            self._epoch += 1
            epoch = self._epoch
            st = self._stats
            hits: list[tuple[int, Slot]] = []
            misses: list[int] = []
            st.layer_accesses[layer] = st.layer_accesses.get(layer, 0) + len(ids)
            st.accesses += len(ids)
            for e in ids:
                slot = self._resident.get((layer, e))
                if slot is None or (layer, e) in self._landing:  # an early load that landed is no hit
                    misses.append(e)
                    continue
                self._pin(slot)
                if slot.prefetched:
                    slot.prefetched = False
                    st.prefetch_useful += 1
                hits.append((e, slot))
            st.hits += len(hits)
            st.layer_hits[layer] = st.layer_hits.get(layer, 0) + len(hits)
            landed = self._admit_landed(layer, misses)
            # queued prefetches of this layer that the routing did not ask for are stale
            wanted = set(ids)
            self.loader.cancel(lambda k: k[0] == layer and k[1] not in wanted)
        return self._deliver(layer, epoch, hits, misses, streaming, landed)

    def stats(self) -> CacheStats:
        with self.lock:
            st = self._stats
            st.prefetch_cancelled = self.loader.cancelled
            st.prefetch_dropped = max(st.prefetch_dropped, self.loader.dropped)
            st.resident_experts = len(self._resident)
            st.resident_bytes = len(self._resident) * self.transfer.slot_bytes
            st.io = self.transfer.io
            return CacheStats(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(st).items()})

    def resident_keys(self) -> set[Key]:
        with self.lock:
            return set(self._resident)

    def close(self) -> None:
        """Stop the loader threads (queued loads are cancelled, running ones finish), then release the
        slot arena, the transfer's buffers and the hints' maps. Idempotent; the source is unusable after."""
        self._finalizer()
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._resident.clear()
            self._pinned.clear()
            self._free_main, self._free_stream = [], []
            slots, self.slots = self.slots, []
        for slot in slots:
            slot.weights, slot.tensors, slot.raw_t, slot.flat = None, {}, None, None
            if slot.raw is not None:
                slot.raw.release()
                slot.raw = None
        del slots
        self.transfer.close()
        if self.hints is not None:
            self.hints.close()
            self.hints = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this expert source is closed")

    def __enter__(self) -> OffloadedExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- delivery --

    def _deliver(
        self, layer: int, epoch: int, hits: list[tuple[int, Slot]], misses: list[int], streaming: bool,
        landed: dict[int, Slot | None] | None = None,
    ) -> Iterator[tuple[int, ExpertWeights]]:
        for e, slot in hits:
            self.transfer.before_use(slot)
            assert slot.weights is not None
            yield e, slot.weights
            if streaming:
                with self.lock:
                    self._unpin(slot)
        if not misses:
            return
        done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        pending = list(reversed(misses))
        outstanding = 0

        def waiter(job: Job) -> None:  # lock held, on a worker (or here)
            if job.state == "done":
                if self._epoch == epoch:
                    self._pin(job.slot)
                elif job.slot.stream and job.slot.pins == 0:  # this fetch was abandoned
                    self._free_stream_slot(job.slot)
            done.put(job)

        def issue() -> int:
            """Queue demand loads; in a prefill only as many as there are slots to stream through."""
            n = 0
            with self.lock:
                while pending:
                    if streaming and outstanding + n >= self._stream_window():
                        break
                    e = pending.pop()
                    key = (layer, e)
                    slot = self._resident.get(key)
                    if landed and landed.get(e) is not None:  # its early load had landed: pinned in fetch
                        done.put(Job(key, DEMAND, -1, state="done", slot=landed[e]))
                    elif landed and e in landed and slot is not None:  # its early load landed since
                        waiter(Job(key, DEMAND, -1, state="done", slot=slot))
                    elif slot is not None:  # landed meanwhile (a prefetch)
                        fake = Job(key, DEMAND, -1, state="done", slot=slot)
                        self._stats.hits += 1
                        self._stats.layer_hits[layer] = self._stats.layer_hits.get(layer, 0) + 1
                        if slot.prefetched:
                            slot.prefetched = False
                            self._stats.prefetch_useful += 1
                        waiter(fake)
                    else:
                        kind = "stream" if streaming else "demand"
                        job = self.loader.submit(key, DEMAND, waiter, kind=kind)
                        if job is None:
                            raise RuntimeError("the expert loader is closed")
                    n += 1
            return n

        outstanding += issue()
        while outstanding:
            try:
                job = done.get_nowait()
            except queue.Empty:
                t0 = time.perf_counter()
                job = done.get()
                self._stats.stall_s += time.perf_counter() - t0
            outstanding -= 1
            if job.state != "done":
                raise job.error or RuntimeError(f"loading expert {job.key} was cancelled")
            slot = job.slot
            self.transfer.before_use(slot)
            yield job.key[1], slot.weights
            if streaming:
                with self.lock:
                    self._unpin(slot)
                outstanding += issue()

    def _stream_window(self) -> int:
        if self.n_stream:
            return self.n_stream
        return max(1, self.main_capacity - len(self._pinned))

    # -- early demand loads (decode) --
    #
    # A decode step's misses are known as soon as the router picked, but the victims they replace are
    # chosen by the policy only after it heard the routing (``on_route``, the hints): in ``fetch``.
    # The stream slots sit idle in decode, so ``observe`` starts each miss's read into one of them at
    # once (``_land``: the disk works while the policy does its bookkeeping); ``fetch`` then evicts the
    # policy's victim exactly as the load would have, and the two slots swap roles: the landing slot
    # joins the cache with the expert, the victim's slot becomes a stream slot
    # (``_admit_landed``). The budget, the cache's capacity and every eviction are unchanged.

    def _land(self, layer: int, ids: list[int]) -> None:
        with self.lock:
            self._drop_landing()
            if self._closed or self.loader.closed:
                return
            todo = [(layer, e) for e in ids if (layer, e) not in self._resident and self.loader.get((layer, e)) is None]
            if not todo or len(todo) > len(self._free_stream):
                return  # no room to land them all: the loads start in fetch
            for key in todo:
                job = self.loader.submit(key, DEMAND, kind="land")
                if job is not None:
                    self._landing[key] = job

    def _admit_landed(self, layer: int, misses: list[int]) -> dict[int, Slot | None]:
        """For each miss whose read ``observe`` started in a stream slot: evict the policy's victim (as the
        demand load would have, in the misses' order and before any of them joins the cache) and swap
        the slots' roles. Returns the misses that had an early load: their slot, pinned, where it is
        read already, else None (``_deliver`` joins the load; either way a load, not a hit)."""
        out: dict[int, Slot | None] = {}
        ready: list[tuple[Job, Slot]] = []
        for e in misses:
            job = self._landing.pop((layer, e), None)
            if job is None or job.state in ("failed", "cancelled"):
                continue
            out[e] = None
            slot = job.slot
            if job.state == "queued" or slot is None:  # not started: it claims a slot as a demand load
                job.data["kind"] = "demand"
                continue
            if not slot.stream:  # it found a free cache slot: an ordinary load
                if job.state == "done":
                    ready.append((job, slot))
                continue
            victim = self._evict_one()
            if victim is None:  # nothing evictable: it streams (freed once the compute is done with it)
                job.data["kind"] = "stream"
                if job.state == "done":
                    slot.state = STREAM
                    self._stats.streamed += 1
                    ready.append((job, slot))
                continue
            victim.stream, slot.stream = True, False
            self._free_stream.append(victim)
            if job.state == "done":  # read already: it joins the cache below
                ready.append((job, slot))
        for job, slot in ready:
            if slot.state == LANDED:
                self._admit(job.key, slot, prefetched=False)
            self._pin(slot)
            out[job.key[1]] = slot
        self._drop_landing()
        return out

    def _drop_landing(self) -> None:
        """Early loads no ``fetch`` took (the step was abandoned): their stream slots are freed."""
        for key, job in list(self._landing.items()):
            slot = job.slot
            if job.state in ("failed", "cancelled"):
                del self._landing[key]
            elif job.state == "done":
                if slot is not None and slot.stream and slot.state == LANDED:
                    self._free_stream_slot(slot)
                del self._landing[key]
            else:
                job.data["orphan"] = True  # still reading: freed when it lands

    # -- pins (lock held) --

    def _pin(self, slot: Slot) -> None:
        slot.pins += 1
        self._pinned[slot.index] = slot

    def _unpin(self, slot: Slot) -> None:
        if slot.pins <= 0:
            return
        slot.pins -= 1
        if slot.pins == 0:
            self.transfer.after_use(slot)
            self._pinned.pop(slot.index, None)
            if slot.state == STREAM:
                self._free_stream_slot(slot)
            self.lock.notify_all()

    def _free_stream_slot(self, slot: Slot) -> None:
        slot.state, slot.key = FREE, None
        if slot not in self._free_stream:
            self._free_stream.append(slot)
        self.lock.notify_all()

    def _release_pins(self) -> None:
        for slot in list(self._pinned.values()):
            slot.pins = 1
            self._unpin(slot)

    # -- slots (lock held) --

    def _evict_one(self) -> Slot | None:
        pinned = {s.key for s in self._pinned.values() if s.state == RESIDENT}
        if len(self._resident) <= len(pinned):
            return None
        victim = self.policy.victim(self._resident.keys(), pinned)
        slot = self._resident.get(victim)
        if slot is None or victim in pinned:
            raise RuntimeError(f"policy {self._stats.policy} chose {victim}, not an evictable expert")
        del self._resident[victim]
        self.policy.on_evict(victim)
        self._stats.evictions += 1
        if slot.prefetched:
            self._stats.prefetch_wasted += 1
            slot.prefetched = False
        slot.key, slot.state = None, FREE
        return slot

    def _claim(self, kind: str) -> Slot | None:
        """A slot for a load of ``kind``: demand (may wait), stream (free, else stream slot), prefetch,
        land (an early demand load: a free slot, else a stream slot, else None: it evicts nothing, since
        the policy has not heard this layer's routing yet; ``fetch`` loads the miss as demand)."""
        while True:
            if self._free_main:
                return self._free_main.pop()
            if kind == "land":
                return self._free_stream.pop() if self._free_stream else None
            if kind == "stream" and self._free_stream:
                return self._free_stream.pop()
            if kind == "stream" and self.n_stream:
                if self.loader.closed:
                    return None
                self.lock.wait(0.5)
                continue
            slot = self._evict_one()
            if slot is not None or kind == "prefetch" or self.loader.closed:
                return slot
            self.lock.wait(0.5)  # every slot is pinned or loading: wait for one to land or be released

    # -- loader hooks --

    def _start(self, job: Job) -> bool:
        kind = "prefetch" if job.priority == PREFETCH else job.data.get("kind", "demand")
        if kind == "prefetch" and job.key in self._resident:
            return False
        slot = self._claim(kind)
        if slot is None:
            if kind == "land":  # dropped: _admit_landed leaves the miss to fetch's demand load
                return False
            if kind == "prefetch":
                self._stats.prefetch_dropped += 1
                return False
            raise RuntimeError("the expert loader is closed")
        slot.key, slot.state = job.key, LOADING
        job.slot = slot
        if self._reading == 0:
            self._busy_since = time.perf_counter()
        self._reading += 1
        return True

    def _run(self, job: Job) -> None:
        layer, expert = job.key
        job.data["bytes"] = self.transfer.load(job.slot, self._path(layer, expert))

    def _finish(self, job: Job, error: BaseException | None) -> None:
        slot: Slot = job.slot
        st = self._stats
        self._reading -= 1
        if self._reading == 0:
            st.disk_busy_s += time.perf_counter() - self._busy_since
        if error is not None:
            slot.key, slot.state = None, FREE
            (self._free_stream if slot.stream else self._free_main).append(slot)
            return
        st.bytes_loaded += job.data.get("bytes", 0)
        if job.first_priority == PREFETCH:
            st.prefetch_loads += 1
            if job.priority == DEMAND:  # the compute came for it while it was loading
                st.prefetch_useful += 1
        else:
            st.demand_loads += 1
        if slot.stream and job.data.get("kind") == "land":  # landed early: waits for fetch's eviction
            slot.state = LANDED
            if job.data.get("orphan"):
                self._landing.pop(job.key, None)
                self._free_stream_slot(slot)
        elif slot.stream:
            slot.state = STREAM
            st.streamed += 1
        else:
            self._admit(job.key, slot, prefetched=job.priority == PREFETCH)

    def _admit(self, key: Key, slot: Slot, prefetched: bool) -> None:
        slot.state = RESIDENT
        slot.prefetched = prefetched
        self._resident[key] = slot
        self.policy.on_load(key)
        n = len(self._resident) * self.transfer.slot_bytes
        self._stats.peak_resident_bytes = max(self._stats.peak_resident_bytes, n)


# While loader threads run, the interpreter hands the GIL over every 0.5 ms instead of 5: a worker whose
# read just returned needs the GIL for a few lines (finish the job, wake the compute, start the next
# read) and, with the default interval, waited up to 5 ms for the compute thread's Python work (the
# policy's bookkeeping) to give it up while the disk stood idle. The 32-layer Mixtral-shaped q4_k model
# at 25% (README, offload formats) decoded 1.5-1.7x faster with the same loads.
GIL_SWITCH_S = 0.0005
_gil = {"users": 0, "saved": None}
_gil_lock = Lock()


def _shorter_gil_switch(on: bool) -> None:
    with _gil_lock:
        if on:
            if _gil["users"] == 0:
                _gil["saved"] = sys.getswitchinterval()
                if _gil["saved"] > GIL_SWITCH_S:
                    sys.setswitchinterval(GIL_SWITCH_S)
            _gil["users"] += 1
        elif _gil["users"] > 0:
            _gil["users"] -= 1
            if _gil["users"] == 0 and _gil["saved"] is not None:
                sys.setswitchinterval(_gil["saved"])


def _stop_loader(loader: Loader) -> None:
    loader.close()
    _shorter_gil_switch(False)


def _weak(ref: weakref.ref, name: str, gone: object) -> Callable:
    """``ref().name(*args)``, or ``gone`` once the object was collected (keeps the loader from holding it)."""

    def call(*args):
        obj = ref()
        return gone if obj is None else getattr(obj, name)(*args)

    return call

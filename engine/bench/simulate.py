"""The expert cache of a run, replayed without reading a byte: which experts each forward waits for.

The engine's own budgeted cache (``engine.memory.offload.OffloadedExperts``: its policy, slots, stream
slots, admission without eviction in a prefill, prefetching) is driven through a run's forwards with a
transfer that moves nothing (``DryTransfer``): each MoE layer of each forward is told its routing
(``observe``) and asked for its experts (``fetch``), as the MoE block asks, and the cache's counters are
read around it. So the routing model of ``moeinf predict`` is the cache itself, not a model of it, and it
changes when the cache or a policy does. It also times the cache's and the policy's own work on each
forward's requests (``Forward.book_s``: no I/O in it). What it cannot know offline: the early router scores of
speculative gating (it runs without them; with ``prefetch=False`` it runs without prefetching at all, the
other end of the band), and the timing of loads (they land at once here).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.memory.offload import OffloadedExperts
from engine.memory.transfer import Slot, Transfer
from engine.model.experts import ExpertWeights

_NOTHING = ExpertWeights(gate=None, up=None, down=None)  # type: ignore[arg-type]


class DryTransfer(Transfer):
    """Slots of ``slot_bytes`` that hold nothing; a load moves no data and reports ``file_bytes``."""

    io = "dry"

    def __init__(self, slot_bytes: int, file_bytes: int):
        super().__init__(None, torch.device("cpu"))  # type: ignore[arg-type]
        self._slot = int(slot_bytes)
        self._file = int(file_bytes)

    @property
    def slot_bytes(self) -> int:
        return self._slot

    def make_slots(self, n: int, n_stream: int) -> list[Slot]:
        return [Slot(i, i >= n - n_stream, self._slot) for i in range(n)]

    def load(self, slot: Slot, path: Path) -> int:
        slot.weights = _NOTHING
        return self._file


@dataclass
class LayerAccess:
    experts: int  # distinct experts the layer asked for
    misses: int  # of them not resident when asked (the forward waits for them)
    tokens: list[int]  # tokens routed to each of those experts


@dataclass
class Forward:
    phase: str  # "prefill" | "decode"
    tokens: int
    seqs: int
    layers: list[LayerAccess] = field(default_factory=list)
    prefetch_loads: int = 0  # loads started ahead of use during this forward
    book_s: float = 0.0  # seconds the cache and its policy took over this forward's requests (the dry run's)
    policy_extra_s: float = 0.0  # of them, beyond what the ``lru`` policy takes (``engine.bench.forecast``)


def simulate(
    forwards: list[tuple[str, list[int], int]],
    routing: np.ndarray,
    moe_layers: list[int],
    num_experts: int,
    top_k: int,
    capacity: int | None,
    policy: str | None,
    slot_bytes: int = 1,
    file_bytes: int = 1,
    prefetch: bool = True,
    policy_kw: dict | None = None,
) -> list[Forward]:
    """The accesses of ``forwards`` ((phase, routing row of each token, sequences) in order) through a cache
    of ``capacity`` experts (None: every expert resident, nothing missed) under ``policy``.
    ``routing``: [T, L, k] expert ids (a trace's), row r of it for a token at trace row r."""
    from engine.policy.registry import make_policy

    ids_all = np.asarray(routing)
    src = None
    if capacity is not None:
        num_layers = max(moe_layers) + 1
        pol = make_policy(policy, **(policy_kw or {}))
        src = OffloadedExperts(
            lambda layer, e: Path(os.devnull), DryTransfer(slot_bytes, file_bytes), pol, capacity,
            num_layers=num_layers, num_experts=num_experts, top_k=top_k, workers=1, prefetch=prefetch,
        )
        src.begin_sequence()
    out: list[Forward] = []
    hidden = torch.zeros(1, 1)
    try:
        for phase, rows, seqs in forwards:
            ids = ids_all[rows][:, :, :top_k]  # [T, L, k]
            fwd = Forward(phase, len(rows), seqs)
            before_pf = src.stats().prefetch_loads if src is not None else 0
            book = 0.0
            for li, layer in enumerate(moe_layers):
                lid = torch.as_tensor(ids[:, li, :].astype(np.int64))
                uniq, counts = torch.unique(lid, return_counts=True)
                asked = lid[0].tolist() if len(rows) == 1 else uniq.tolist()
                misses = 0
                if src is not None:
                    st = src.stats()
                    t0 = time.perf_counter()
                    src.observe(layer, lid, hidden)
                    for _ in src.fetch(layer, asked):
                        pass
                    book += time.perf_counter() - t0
                    st2 = src.stats()
                    misses = (st2.accesses - st.accesses) - (st2.hits - st.hits)
                fwd.layers.append(LayerAccess(len(set(asked)), misses, [int(c) for c in counts.tolist()]))
            if src is not None:
                fwd.prefetch_loads = src.stats().prefetch_loads - before_pf
                fwd.book_s = book
            out.append(fwd)
    finally:
        if src is not None:
            src.end_sequence()
            src.close()
    return out

"""The all-resident expert source (no budget): every expert kept in memory, as stored or in the compute
dtype. ``preload`` reads them all when the model loads (several shards at once), so the first prompt runs
at full speed and the reading is counted in the load time; an expert not preloaded is read on first use.
Same behaviour as ``engine.model.experts.MappedExperts``, plus counters and the recorder.
Shards are read through the opened model (``StoreModel.read_expert``): a damaged or missing shard is
the same one-line error as with a budget."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import torch

from engine.memory.stats import CacheStats
from engine.model.experts import ExpertWeights, load_expert
from engine.store.opened import StoreModel


class ResidentExperts:
    def __init__(
        self,
        store: StoreModel,
        dtype: torch.dtype,
        device: torch.device,
        recorder=None,
        stats: CacheStats | None = None,
    ):
        self.store = store
        self.dtype = dtype
        self.device = device
        self.recorder = recorder
        self._cache: dict[tuple[int, int], ExpertWeights] = {}
        self._stats = stats or CacheStats()
        self._stats.mode = "resident"
        self._stats.io = "mmap"
        self._lock = Lock()
        self._closed = False

    def preload(self, keys: Iterable[tuple[int, int]], workers: int = 4) -> None:
        """Read every (layer, expert) of ``keys`` now, ``workers`` shards at a time."""
        keys = [k for k in keys if k not in self._cache]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="moeinf-preload") as pool:
            loaded = list(pool.map(lambda k: self._load(*k), keys))
        st = self._stats
        for key, (weights, size) in zip(keys, loaded, strict=True):
            self._cache[key] = weights
            st.preload_bytes += size
        st.preloaded += len(keys)
        st.preload_s += time.perf_counter() - t0
        st.resident_experts = len(self._cache)

    def begin_sequence(self) -> None:
        """A request starts (counted; nothing to decide when everything stays resident)."""
        if self._closed:
            raise RuntimeError("this expert source is closed")
        self._stats.sequences += 1

    def end_sequence(self) -> None:
        """The request ended (nothing to release: every expert stays)."""

    def observe(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.on_route(layer, topk_ids)

    def _load(self, layer: int, expert: int) -> tuple[ExpertWeights, int]:
        return load_expert(self.store, layer, expert, self.dtype, self.device)

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        if self._closed:
            raise RuntimeError("this expert source is closed")
        st = self._stats
        for e in expert_ids:
            key = (layer, int(e))
            st.accesses += 1
            st.layer_accesses[layer] = st.layer_accesses.get(layer, 0) + 1
            w = self._cache.get(key)
            if w is None:
                t0 = time.perf_counter()
                w, size = self._load(layer, int(e))
                with self._lock:
                    self._cache[key] = w
                    st.demand_loads += 1
                    st.bytes_loaded += size
                    st.stall_s += time.perf_counter() - t0
                    st.resident_experts = len(self._cache)
            else:
                st.hits += 1
                st.layer_hits[layer] = st.layer_hits.get(layer, 0) + 1
            yield int(e), w

    def resident_count(self) -> int:
        """How many experts are in memory now (it grows as experts are first used)."""
        return len(self._cache)

    def native_experts(self, layer: int, num_experts: int) -> list[ExpertWeights] | None:
        """Every expert of ``layer`` (0..num_experts-1) when all are in memory, for a native decode step
        that reads them without asking ``fetch`` (its hits are counted by ``count_hits``); else None."""
        if self._closed:
            return None
        found = [self._cache.get((layer, e)) for e in range(num_experts)]
        return None if any(w is None for w in found) else found

    def count_hits(self, layer: int, count: int) -> None:
        """``count`` uses of experts of ``layer`` that were in memory (what ``fetch`` counts for a hit)."""
        st = self._stats
        st.accesses += count
        st.hits += count
        st.layer_accesses[layer] = st.layer_accesses.get(layer, 0) + count
        st.layer_hits[layer] = st.layer_hits.get(layer, 0) + count

    def stats(self) -> CacheStats:
        st = self._stats
        esize = torch.empty((), dtype=self.dtype).element_size()
        st.resident_experts = len(self._cache)
        st.resident_bytes = sum(
            sum(t.numel() for t in vars(w).values() if isinstance(t, torch.Tensor)) * esize
            for w in self._cache.values()
        )
        st.peak_resident_bytes = max(st.peak_resident_bytes, st.resident_bytes)
        return CacheStats(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(st).items()})

    def close(self) -> None:
        """Drop every expert this source converted (their memory goes with the last reference). Idempotent."""
        with self._lock:
            self._closed = True
            self._cache.clear()

    def __enter__(self) -> ResidentExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

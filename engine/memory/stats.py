"""Counters of the expert memory hierarchy, shown by ``--verbose`` and used by the bench."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.memory.budget import fmt_bytes


@dataclass
class CacheStats:
    """A snapshot of the expert source's counters (all since it was opened)."""

    mode: str = "resident"  # "resident" (everything in memory) or "offload" (budgeted cache)
    io: str = ""  # how bytes arrive: "O_DIRECT", "buffered", "mmap+pinned->cuda", "mmap"
    policy: str = ""
    budget_bytes: int | None = None  # None: no budget (everything resident)
    budget_note: str = ""  # how the budget was chosen (``auto: ...``)
    slot_bytes: int = 0
    slots: int = 0  # cache slots (experts the budget holds)
    stream_slots: int = 0  # of those, kept for streaming prefill experts past the cache
    expert_bytes_total: int = 0  # all routed experts, compute dtype
    sequences: int = 0  # requests begun (begin_sequence)
    accesses: int = 0  # (layer, expert) uses asked of fetch
    hits: int = 0  # resident when asked
    demand_loads: int = 0  # loads the compute waited for
    prefetch_loads: int = 0  # loads started ahead of use
    prefetch_useful: int = 0  # prefetched and then used (or waited on while loading)
    prefetch_wasted: int = 0  # prefetched and evicted before any use
    prefetch_cancelled: int = 0  # queued prefetches dropped as stale before loading
    prefetch_dropped: int = 0  # prefetches refused: queue full or no evictable slot
    streamed: int = 0  # prefill experts passed through the stream slots without caching
    evictions: int = 0
    bytes_loaded: int = 0  # bytes the loader read (disk) or copied (host to device)
    preloaded: int = 0  # experts read when the model loaded (all-resident mode)
    preload_bytes: int = 0
    preload_s: float = 0.0
    stall_s: float = 0.0  # time the compute waited for demand loads
    disk_busy_s: float = 0.0  # time at least one load was reading (the slow tier was working)
    resident_experts: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    layer_hits: dict[int, int] = field(default_factory=dict)
    layer_accesses: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0

    def layer_hit_rate(self) -> dict[int, float]:
        return {
            layer: self.layer_hits.get(layer, 0) / n for layer, n in sorted(self.layer_accesses.items()) if n
        }

    def summary_line(self) -> str:
        """One line: hit rate, loads, MB loaded, time stalled, budget. With every expert read at load
        (all resident), it says so instead of counting loads that did not happen."""
        if self.budget_bytes is None and self.preloaded and not self.demand_loads:
            return (
                f"experts: all {self.preloaded} resident, {fmt_bytes(self.preload_bytes)} read at load "
                f"({self.preload_s:.2f} s), hit rate {100 * self.hit_rate:.1f}%"
            )
        if self.budget_bytes is None:
            budget = f"all resident {fmt_bytes(self.expert_bytes_total)}"
        else:
            budget = f"budget {fmt_bytes(self.budget_bytes)} ({self.slots} slots)"
        parts = [
            f"experts: hit rate {100 * self.hit_rate:.1f}%",
            f"{self.demand_loads} demand + {self.prefetch_loads} prefetch loads"
            f" ({self.prefetch_useful} useful, {self.prefetch_wasted} wasted)",
            f"{self.bytes_loaded / 1e6:.1f} MB loaded",
            f"{self.stall_s:.2f} s stalled",
            budget,
        ]
        if self.policy:
            parts.append(f"policy {self.policy}")
        if self.io:
            parts.append(self.io)
        return ", ".join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["layer_hit_rate"] = self.layer_hit_rate()
        return d

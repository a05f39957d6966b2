"""A quick probe of the machine for the hardware model of ``moeinf bench --profile``.

The slow tier's bandwidth is measured, not assumed: a sample of the model's own expert shards is
read the way the loader reads them (O_DIRECT on the CPU, so the page cache does not flatter the
figure; as many reads in flight as the loader has workers). Disk speed here varies a lot from
moment to moment, so the bandwidth used is the larger of the probe's and the best the loader itself
sustained during the bench's runs (bytes loaded over the run's time, a lower bound of what the disk did). Compute time per token comes from the all-resident run of the same bench (or, without one,
from each run's time minus its stalls), so both sides of the model are measured in the same run.

The model (MoE-Lens style): a token costs its compute ``c`` plus what loading adds. Demand loads
stall the compute; prefetches overlap it. Predicted time per token:
``c + demand_bytes / bw + max(0, prefetch_bytes / bw - c)``. The limit of the machine for a routing
trace and a budget is ``max(c, belady_bytes / bw)``: no policy moves fewer bytes than Belady's. The *reachable* time is
the same with the token oracle's bytes (``engine/policy/oracle.py``: the rest of each token known
exactly, plus exact per-expert rates), the closest to Belady a causal policy can hope to get.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.memory.shard import ShardReader, aligned_buffer
from engine.store.paths import expert_shard_path


@dataclass
class Probe:
    disk_bytes: int
    disk_s: float
    io: str
    observed_bps: float = 0.0  # the best bytes/s the loader sustained in the bench's own runs

    @property
    def probe_bps(self) -> float:
        return self.disk_bytes / self.disk_s if self.disk_s > 0 else float("inf")

    @property
    def bandwidth(self) -> float:
        """Bytes per second the hardware model uses: the larger of the probe and the observed rate."""
        return max(self.probe_bps, self.observed_bps)

    def as_dict(self) -> dict:
        return {**asdict(self), "probe_gbps": self.probe_bps / 1e9, "bandwidth_gbps": self.bandwidth / 1e9}


def probe_disk(model_root: Path, moe_layers: list[int], num_experts: int, sample_bytes: int = 512 << 20,
               seed: int = 0, workers: int = 2) -> Probe:
    """Read a random sample of expert shards (about ``sample_bytes``) with the loader's reader,
    ``workers`` reads at a time (the loader's default)."""
    keys = [(layer, e) for layer in moe_layers for e in range(num_experts)]
    random.Random(seed).shuffle(keys)
    size = expert_shard_path(model_root, *keys[0]).stat().st_size
    count = max(4, min(len(keys), sample_bytes // max(size, 1)))
    bufs = [aligned_buffer(size + (1 << 20)) for _ in range(workers)]
    readers = [ShardReader(direct=True) for _ in range(workers)]

    def read_share(w: int) -> int:
        view = memoryview(bufs[w])
        try:
            return sum(readers[w].read_into(expert_shard_path(model_root, *k), view) for k in keys[w:count:workers])
        finally:
            view.release()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(read_share, range(workers)))
    elapsed = time.perf_counter() - t0
    for b in bufs:
        b.close()
    return Probe(disk_bytes=total, disk_s=elapsed, io=readers[0].mode)


def probe_disk_median(model_root: Path, moe_layers: list[int], num_experts: int, passes: int = 3,
                      sample_bytes: int = 256 << 20, workers: int = 2) -> Probe:
    """The median of ``passes`` probes over different samples: disk speed here varies from run to run."""
    probes = [probe_disk(model_root, moe_layers, num_experts, sample_bytes, seed=i, workers=workers)
              for i in range(passes)]
    return sorted(probes, key=lambda p: p.bandwidth)[len(probes) // 2]


def predicted_s(compute_s: float, demand_bytes: float, prefetch_bytes: float, bandwidth: float) -> float:
    """Predicted time per token from its compute time and the bytes it loaded (see the module doc)."""
    return compute_s + demand_bytes / bandwidth + max(0.0, prefetch_bytes / bandwidth - compute_s)


def limit_s(compute_s: float, belady_bytes: float, bandwidth: float) -> float:
    """The machine's limit per token for a trace and budget: the larger of compute and Belady's I/O."""
    return max(compute_s, belady_bytes / bandwidth)

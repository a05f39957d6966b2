"""A quick probe of the machine for the hardware model of ``moeinf bench --profile``.

The slow tier's bandwidth is measured, not assumed: a sample of the model's own expert shards is
read the way the loader reads them (O_DIRECT on the CPU, so the page cache does not flatter the
figure). Compute time per token comes from the all-resident run of the same bench (or, without one,
from each run's time minus its stalls), so both sides of the model are measured in the same run.

The model (MoE-Lens style): a token costs its compute ``c`` plus what loading adds. Demand loads
stall the compute; prefetches overlap it. Predicted time per token:
``c + demand_bytes / bw + max(0, prefetch_bytes / bw - c)``. The limit of the machine for a routing
trace and a budget is ``max(c, belady_bytes / bw)``: no policy moves fewer bytes than Belady's.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.memory.shard import ShardReader, aligned_buffer
from engine.store.paths import expert_shard_path


@dataclass
class Probe:
    disk_bytes: int
    disk_s: float
    io: str

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.disk_bytes / self.disk_s if self.disk_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "bandwidth_gbps": self.bandwidth / 1e9}


def probe_disk(model_root: Path, moe_layers: list[int], num_experts: int, sample_bytes: int = 512 << 20,
               seed: int = 0) -> Probe:
    """Read a random sample of expert shards (about ``sample_bytes``) with the loader's reader."""
    keys = [(layer, e) for layer in moe_layers for e in range(num_experts)]
    random.Random(seed).shuffle(keys)
    size = expert_shard_path(model_root, *keys[0]).stat().st_size
    count = max(4, min(len(keys), sample_bytes // max(size, 1)))
    buf = aligned_buffer(size + (1 << 20))
    view = memoryview(buf)
    reader = ShardReader(direct=True)
    t0 = time.perf_counter()
    total = 0
    for key in keys[:count]:
        total += reader.read_into(expert_shard_path(model_root, *key), view)
    elapsed = time.perf_counter() - t0
    view.release()
    buf.close()
    return Probe(disk_bytes=total, disk_s=elapsed, io=reader.mode)


def predicted_s(compute_s: float, demand_bytes: float, prefetch_bytes: float, bandwidth: float) -> float:
    """Predicted time per token from its compute time and the bytes it loaded (see the module doc)."""
    return compute_s + demand_bytes / bandwidth + max(0.0, prefetch_bytes / bandwidth - compute_s)


def limit_s(compute_s: float, belady_bytes: float, bandwidth: float) -> float:
    """The machine's limit per token for a trace and budget: the larger of compute and Belady's I/O."""
    return max(compute_s, belady_bytes / bandwidth)

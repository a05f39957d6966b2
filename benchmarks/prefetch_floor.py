"""Is a guess worth loading? eam's next-layer probabilities on held-out traces against the floor the
disk's costs imply.

    .venv/bin/python benchmarks/prefetch_floor.py [TRACES...] [--fraction 0.25] [--gap-ms 1.3]
        [--read-ms bf16=15,q8_0=8,q4_k=4]

Part 1 (deterministic): each held-out split of each trace (``engine.policy.holdout``: each sequence
against the others, a single sequence's halves against each other) is replayed through eam with the
state learned on the rest, demand paging at ``--fraction``; before each layer is routed, eam's
probability that each expert not in the cache is used at that layer's next run is written down (what
a prefetch or a guess would act on) and bucketed against what the router then did: how many
candidates each bucket holds and how often they were used (the calibration).

Part 2 (arithmetic): a prefetch of probability ``p`` issued while the disk idles starts a load at most
the idle gap ``g`` early (the compute between one layer's loads and the next layer's routing); when
wrong it costs the disk the rest of its read, ``t - g``, which the next demand loads wait behind. It
pays when ``p * g > (1 - p) * (t - g)``: ``p > 1 - g / t``. Printed for each format's read time ``t``.
The defaults are the 32-layer Mixtral-shaped model's at 25% on this project's machine (README,
"Formats"): a 1.2-1.5 ms gap, reads of 22 / 11.7 / 6.2 MB at about 1.5 GB/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.policy.eam import EAMPolicy  # noqa: E402
from engine.policy.holdout import heldout_splits, learned_state  # noqa: E402
from engine.policy.replay import capacity_for, replay  # noqa: E402
from engine.trace.format import load_trace  # noqa: E402

BUCKETS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.01]


class Calibrated(EAMPolicy):
    """eam, noting each layer's predicted next-run probabilities just before that layer is routed."""

    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        self.noted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (p, used, resident) per step
        self._pending: tuple[int, np.ndarray] | None = None

    def on_route(self, layer, experts, counts=None) -> None:
        if self._pending is not None and self._pending[0] == layer:
            used = np.zeros(self.num_experts, dtype=bool)
            used[list(experts)] = True
            self.noted.append((self._pending[1], used, self.resident[layer].copy()))
        super().on_route(layer, experts, counts)
        nl = (layer + 1) % self.num_layers
        self._pending = (nl, self.probabilities()[nl].copy())


def calibration(paths: list[Path], fraction: float) -> str:
    lines = ["| trace | P(use at next run) | candidates not in the cache | used |", "|---|---|---:|---:|"]
    for path in paths:
        trace = load_trace(path)
        ps, us = [], []
        for test, train in heldout_splits(trace):
            pol = Calibrated(persist=False, **learned_state(train))
            replay(test, pol, capacity_for(fraction, test.num_layers, test.num_experts), with_belady=False)
            for p, used, resident in pol.noted:
                ps.append(p[~resident])
                us.append(used[~resident])
        p, u = np.concatenate(ps), np.concatenate(us)
        for lo, hi in zip(BUCKETS, BUCKETS[1:], strict=False):
            m = (p >= lo) & (p < hi)
            share = f"{u[m].mean():.2f}" if m.any() else "-"
            lines.append(f"| {path.stem} | {lo:.1f}-{min(hi, 1.0):.1f} | {int(m.sum())} | {share} |")
    return "\n".join(lines)


def floors(gap_ms: float, reads: dict[str, float]) -> str:
    lines = ["| format | read ms | idle gap ms | floor 1 - g/t |", "|---|---:|---:|---:|"]
    for fmt, t in reads.items():
        lines.append(f"| {fmt} | {t:.1f} | {gap_ms:.1f} | {max(0.0, 1 - gap_ms / t):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="*")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--gap-ms", type=float, default=1.3)
    ap.add_argument("--read-ms", default="bf16=15,q8_0=8,q4_k=4")
    a = ap.parse_args()
    shared = ROOT.parent / "shared" / "traces"
    paths = [Path(p) for p in a.traces] or [shared / "mixtral-8x7b-instruct-humaneval0.npz"]
    reads = {k: float(v) for k, v in (kv.split("=") for kv in a.read_ms.split(","))}
    print(calibration(paths, a.fraction))
    print()
    print(floors(a.gap_ms, reads))


if __name__ == "__main__":
    main()

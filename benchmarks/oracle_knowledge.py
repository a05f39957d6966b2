"""What the token oracle knows that an online policy cannot: held-out loads of references with less.

    .venv/bin/python benchmarks/oracle_knowledge.py [TRACE_DIR_OR_FILES...] [--fractions 0.1,0.25,0.5]

On the held-out replays of benchmarks/policies_on_traces.py (each sequence alone, fresh cache; a
one-sequence trace cut in halves), summed over the parts:

* ``token oracle``: engine/policy/oracle.py (the rest of the current token known exactly, and each
  expert's exact use rate over its sequence and reuse rates over the trace);
* ``rates only``: the same exact rates, the rest of the token unknown (the last observed run of each
  layer stands for its next), evicting the expert least likely to be used within the cache's horizon;
* ``causal rates``: as ``rates only``, but each rate estimated from the sequence so far (64 pseudo-tokens
  of the other parts' mean rate as the prior) and the reuse rates from the other parts: what a policy
  of this form can know online;
* ``eam``: the default policy, starting from the state the other parts left (``engine.policy.holdout``).

If ``rates only`` is near the oracle and ``causal rates`` is near eam, the oracle's edge is knowing each
sequence's future use rates, which no online policy has. Deterministic; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.policy.holdout import heldout_splits, learned_state  # noqa: E402
from engine.policy.oracle import TokenOraclePolicy, used_matrix  # noqa: E402
from engine.policy.registry import make_policy  # noqa: E402
from engine.policy.replay import capacity_for, replay  # noqa: E402
from engine.trace.format import RoutingTrace, load_trace  # noqa: E402


class RatesOnly(TokenOraclePolicy):
    """Exact rates, the rest of the token unknown; keeps P(use within the cache's horizon)."""

    name = "rates-only"

    def _runs_state(self):
        L, T = self.num_layers, self.used.shape[0]
        t, cur = min(self.t, T - 1), self.layer
        ahead = np.arange(L)[:, None] - cur
        d0 = np.where(ahead > 0, ahead, ahead + L)  # steps to the layer's next run
        last = np.where(ahead > 0, self.used[max(t - 1, 0)], self.used[t])  # its last observed run
        p1 = np.where(last, self.p11, self.p01)
        return d0, p1, np.clip(self.current_rate(t), 1e-6, 1 - 1e-6)

    def current_rate(self, t: int) -> np.ndarray:
        return self.rate[self.seq_of[t]]

    def victim(self, resident, pinned):
        d0, p1, r = self._runs_state()
        L = self.num_layers

        def within(n):  # P(used within n runs): p1 at the next run, then geometric at rate r
            n = np.maximum(n, 0.0)
            return np.where(n >= 1, 1 - (1 - p1) * (1 - r) ** (n - 1), p1 * n)

        grid = 2.0 ** np.arange(0, 8.01, 0.25)
        used = [float(within(np.full((L, 1), g)).sum()) for g in grid]
        h = grid[min(max(int(np.searchsorted(used, self.capacity)), 1), len(grid) - 1)]
        score = within((h * L - d0) / L + 1) - 1e-9 * (d0 + L * (1 - p1) / r)
        mask = np.zeros_like(self.resident)
        for k in resident:
            mask[k] = True
        for k in pinned:
            mask[k] = False
        flat = int(np.argmin(np.where(mask, score, np.inf)))
        return (flat // self.num_experts, flat % self.num_experts)


class CausalRates(RatesOnly):
    """Rates from the sequence so far (a prior of ``m`` pseudo-tokens), reuse rates from elsewhere."""

    name = "causal-rates"

    def __init__(self, trace: RoutingTrace, train: RoutingTrace, m: float = 64.0):
        super().__init__(trace)
        u = used_matrix(train)
        before, after = u[:-1], u[1:]
        self.p11 = (before & after).sum(0) / np.maximum(before.sum(0), 1)
        self.p01 = (~before & after).sum(0) / np.maximum((~before).sum(0), 1)
        self.prior, self.m = u.mean(0), m

    def setup(self, num_layers, num_experts, capacity):
        super().setup(num_layers, num_experts, capacity)
        self.counts = np.zeros((num_layers, num_experts))
        self.tok = np.zeros(num_layers)

    def begin_sequence(self):
        self.counts[:] = 0
        self.tok[:] = 0

    def on_route(self, layer, experts, counts=None):
        super().on_route(layer, experts, counts)
        self.counts[layer, list(experts)] += 1
        self.tok[layer] += 1

    def current_rate(self, t: int) -> np.ndarray:
        return (self.counts + self.m * self.prior) / (self.tok[:, None] + self.m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", default=[str(ROOT.parent / "shared" / "traces")])
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    args = ap.parse_args()
    files: list[Path] = []
    for t in args.traces:
        p = Path(t)
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    print("| trace (held out) | cache | token oracle | rates only | causal rates | eam | eam / oracle | eam / causal rates |")
    print("|---|---|---|---|---|---|---|---|")
    for f in files:
        tr = load_trace(f)
        splits = [(test, train, learned_state(train)) for test, train in heldout_splits(tr)]
        for frac in [float(x) for x in args.fractions.split(",")]:
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            tot = np.zeros(4, dtype=np.int64)
            for test, train, state in splits:
                pols = [
                    TokenOraclePolicy(test),
                    RatesOnly(test),
                    CausalRates(test, train),
                    make_policy("eam", persist=False, **copy.deepcopy(state)),
                ]
                tot += [replay(test, p, cap, with_belady=False).loads for p in pols]
            o, r, c, e = map(int, tot)
            print(f"| {f.stem} | {frac:.0%} | {o} | {r} | {c} | {e} | {e / o:.3f} | {e / c:.3f} |", flush=True)


if __name__ == "__main__":
    main()

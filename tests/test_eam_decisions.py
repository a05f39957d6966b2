"""The eam policy's decisions on the shared traces, pinned: every victim and every prefetch list of a
replay, hashed, must stay what it was when the policy's arithmetic was last changed on purpose.

The policy's cost per routed layer has been cut (lazy predictions, fewer temporaries) under the rule
that no decision moves; this is the check of that rule. A change meant to move decisions updates the
digests below (``python tests/test_eam_decisions.py`` prints them) and says why in its commit.

Cases: the Mixtral trace demand-only at 10%, 25% and 50%; at 25% with 4 prefetches per layer and
seeded random hints (speculative gating); FLAME's first two sequences at 25% with prefetch and hints
(two requests: the collection, the prior and the persisted-state path between them).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.policy.eam import EAMPolicy
from engine.policy.replay import capacity_for, replay
from engine.trace.format import load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
MIXTRAL = "mixtral-8x7b-instruct-humaneval0.npz"
FLAME = "flame-moe-290m.npz"
needs_traces = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces is not present in this checkout")

# name, sequences, fraction, prefetch per layer, hints
CASES = {
    "mixtral-10": (MIXTRAL, None, 0.10, 0, False),
    "mixtral-25": (MIXTRAL, None, 0.25, 0, False),
    "mixtral-50": (MIXTRAL, None, 0.50, 0, False),
    "mixtral-25-prefetch-hints": (MIXTRAL, None, 0.25, 4, True),
    "flame-25-prefetch-hints": (FLAME, [0, 1], 0.25, 4, True),
}
DIGESTS = {
    "mixtral-10": "bab63cb521d74bc3ac8dc35d7130a7ea6e4653277639dc4acede0419bb39a4a6",  # 4409 loads
    "mixtral-25": "2c2cfad88e02b779b105c8cb0a819713fb2361ea72f7086333e5710f0fd1cba7",  # 3299 loads
    "mixtral-50": "7ff3bb4dddf4b1e0658c99c6b9536f5f61dc67d8b422b7b9bf24452993fc7983",  # 2037 loads
    "mixtral-25-prefetch-hints": "0814f260b90b77f4654b5640c50b6cd26efbcef3a0b54d5172fab7274d94d260",  # 3635 loads
    "flame-25-prefetch-hints": "b433b4d593f8c0ce2c69e162f63bc821212b53570275f278aab6136a54ae6207",  # 35428 loads
}


class Recorder(EAMPolicy):
    """eam, writing down every decision it hands out."""

    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        self.log: list = []

    def victim(self, resident, pinned):
        key = super().victim(resident, pinned)
        self.log.append(("v", int(key[0]), int(key[1])))
        return key

    def prefetch(self, layer, limit):
        keys = super().prefetch(layer, limit)
        self.log.append(("p", layer, tuple((int(a), int(b)) for a, b in keys)))
        return keys


def decisions(case: str) -> tuple[str, int]:
    """(sha256 of the decision log, loads) of one case."""
    name, sequences, fraction, prefetch, with_hints = CASES[case]
    trace = load_trace(SHARED / name)
    if sequences is not None:
        trace = trace.select(sequences)
    hints = None
    if with_hints:
        rng = np.random.default_rng(13)
        hints = rng.normal(size=(trace.num_tokens, trace.num_layers, trace.num_experts))
        # the routed experts score higher, as a router's early logits would
        for t in range(trace.num_tokens):
            for layer in range(trace.num_layers):
                ids = trace.expert_ids[t, layer]
                hints[t, layer, ids[ids >= 0]] += 2.0
    policy = Recorder(persist=False)
    cap = capacity_for(fraction, trace.num_layers, trace.num_experts)
    res = replay(trace, policy, cap, prefetch_per_layer=prefetch, hints=hints, with_belady=False)
    return hashlib.sha256(repr(policy.log).encode()).hexdigest(), res.loads


@needs_traces
@pytest.mark.parametrize("case", sorted(CASES))
def test_eam_decisions_unchanged(case):
    digest, _loads = decisions(case)
    assert digest == DIGESTS[case]


if __name__ == "__main__":
    for case in CASES if len(sys.argv) < 2 else sys.argv[1:]:
        print(case, *decisions(case))

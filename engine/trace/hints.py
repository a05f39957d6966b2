"""Simulated speculative-gating hints for offline replay (no hidden states in a routing trace).

A live engine gets hints by applying layer l+1's router to layer l's hidden state. A trace has no
hidden states, so to study how hints combine with the trace-driven policy, ``simulated_hints``
builds early router scores [T, L, E] of a given recall: each true expert of (t, l) gets a high score
with probability ``recall``, otherwise a random wrong expert does; everything else is noise. Figures
measured with them are labelled as simulated; they show what a predictor of that quality buys.
"""

from __future__ import annotations

import numpy as np

from engine.trace.format import RoutingTrace


def simulated_hints(trace: RoutingTrace, recall: float, seed: int = 0) -> np.ndarray:
    """Early router scores [T, L, E] whose top-k holds each true expert with probability ``recall``."""
    rng = np.random.default_rng(seed)
    T, L, k = trace.expert_ids.shape
    E = trace.num_experts
    scores = rng.normal(0.0, 1.0, size=(T, L, E)).astype(np.float32)
    ids = trace.expert_ids
    hit = rng.random((T, L, k)) < recall
    wrong = rng.integers(0, E, size=(T, L, k))
    chosen = np.where(hit & (ids >= 0), ids, wrong)
    t_idx, l_idx = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
    for j in range(k):
        scores[t_idx, l_idx, chosen[:, :, j]] += 6.0
    return scores

"""Routing forced from a recorded trace, so a synthetic model sees a real access pattern.

``force_routing(model, trace)`` wraps the router of every MoE block: for decode step ``t`` (one token
per forward), layer ``l`` of the model's MoE layers uses the trace's ``expert_ids[t, l]`` instead of
its own choice (the trace's -1 entries keep the model's own pick). A forward of several tokens takes
the trace's tokens ``step, step+1, ...``, or, when ``rows`` is set (a batch of sequences, each at its
own place in the trace), trace token ``rows[i]`` for row ``i``. The router still runs, so compute
per token is that of the real model; only *which* experts are used changes. Weights are spread evenly
over the forced experts (a synthetic model's output is meaningless anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import MoeinfError
from engine.trace.format import RoutingTrace


class ForcedRouting:
    """Shared state of the wrapped routers: which trace token the next forward replays."""

    def __init__(self, trace: RoutingTrace):
        self.ids = torch.as_tensor(trace.expert_ids.astype("int64"))  # [T, L, k]
        self.step = 0
        self.rows: list[int] | None = None  # trace token of each row of the next forward (a batch)

    def ids_for(self, moe_index: int, own: torch.Tensor) -> torch.Tensor:
        """The forced ids [T, k] for a forward of T tokens (each token its own trace step)."""
        T = own.shape[0]
        if self.rows is not None:
            if len(self.rows) != T:
                raise ValueError(f"forced routing was given {len(self.rows)} trace rows for a forward of {T} tokens")
            rows = self.ids[self.rows, moe_index]  # [T, k]
        else:
            rows = self.ids[self.step : self.step + T, moe_index]  # [T, k]
        if rows.shape[0] < T:
            raise MoeinfError(f"the trace has {self.ids.shape[0]} tokens; run at most that many with --replay")
        k = own.shape[1]
        forced = rows[:, :k].clone()
        if forced.shape[1] < k:  # the model routes to more experts than the trace lists: keep its own extra
            forced = torch.cat([forced, own[:, forced.shape[1] :]], dim=1)
        unknown = forced < 0
        forced[unknown] = own[unknown]
        return forced


class _ForcedRouter(nn.Module):
    def __init__(self, inner: nn.Module, state: ForcedRouting, moe_index: int):
        super().__init__()
        self.inner = inner
        self.state = state
        self.moe_index = moe_index

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.inner(x)
        forced = self.state.ids_for(self.moe_index, ids)
        even = torch.full_like(weights, 1.0 / weights.shape[1])
        return even, forced


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks in layer order (modules with a ``gate`` router and an ``experts`` source)."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m, "layer_idx")]


def force_routing(model: nn.Module, trace: RoutingTrace) -> ForcedRouting:
    """Wrap every MoE router of ``model`` to follow ``trace``; returns the state whose ``step`` to advance."""
    blocks = moe_blocks(model)
    if len(blocks) != trace.num_layers:
        raise MoeinfError(
            f"the trace has {trace.num_layers} MoE layers but the model {len(blocks)}; "
            "replay it on a model of the same shape (e.g. --synthetic mixtral-8x7b for a Mixtral trace)"
        )
    num_experts = int(trace.num_experts)
    for block in blocks:
        have = getattr(getattr(block.gate, "weight", None), "shape", [num_experts])[0]
        if have != num_experts:
            raise MoeinfError(f"the trace has {num_experts} experts per layer but the model {have}")
    state = ForcedRouting(trace)
    for i, block in enumerate(blocks):
        block.gate = _ForcedRouter(block.gate, state, i)
    return state

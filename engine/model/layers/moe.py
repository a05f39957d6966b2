"""The generic sparse MoE block: route, observe, fetch, run each expert on its tokens, combine.

Two execution paths: one token (decode of one sequence: its k experts in one native call) and expert-major for
several tokens (a prefill chunk or a batch of sequences: one fetch and one matrix product per distinct
expert over all the tokens routed to it).

Routed expert weights are reached only through the ``ExpertSource`` (``engine.model.experts``):
``observe(layer, topk_ids, hidden)`` then ``fetch(layer, unique_ids)``; each fetched expert is used
inside the loop and never kept. Pluggable parts:

* ``gate``: the router (``SoftmaxTopKRouter`` or any module returning (weights [T,k], ids [T,k])),
* ``expert_fn(x [t, H], ExpertWeights) -> [t, H]``: the expert computation (SwiGLU by default),
* ``shared_expert`` (an ``MLP``) and ``shared_expert_gate`` (Linear(H, 1), sigmoid-gated, Qwen2-MoE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cuda_ext.cpu import experts_accumulate, linear
from cuda_ext.quant import qgemm_swiglu
from engine.model.experts import ExpertSource, ExpertWeights
from engine.model.layers.activations import activation

ExpertFn = Callable[[torch.Tensor, ExpertWeights], torch.Tensor]


def swiglu_expert(act: str = "silu") -> ExpertFn:
    """``down(act(gate(x)) * up(x))`` with the expert's own matrices (biases when it has them).

    With SiLU the function also has ``accumulate(x, experts, coefs, acc) -> bool``: ``acc += sum of
    run(x, w) * coef`` over one token's experts, all in one native call (``cuda_ext.cpu.experts_accumulate``),
    False (acc untouched) where that does not apply."""
    fn = activation(act)

    silu = act in ("silu", "swish")

    def run(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        h = None
        if silu and x.dtype == torch.float32 and w.gate_bias is None and w.up_bias is None:
            h = qgemm_swiglu(x, w.gate, w.up)  # int8 activations on a prompt: gate and up in one call
        if h is None:
            h = fn(linear(x, w.gate, w.gate_bias)) * linear(x, w.up, w.up_bias)
        return linear(h, w.down, w.down_bias)

    if act in ("silu", "swish"):
        run.accumulate = experts_accumulate  # type: ignore[attr-defined]
    return run


class MoEBlock(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        gate: nn.Module,
        experts: ExpertSource,
        expert_fn: ExpertFn | None = None,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = gate
        self.experts = experts
        self.expert_fn = expert_fn or swiglu_expert()
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]: T rows of one sequence (a prefill chunk) or of several (a batch)."""
        weights, ids = self.gate(x)  # [T, k], [T, k]
        self.experts.observe(self.layer_idx, ids, x)
        # weighted expert outputs are summed in float32 and rounded once (as transformers does)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if x.shape[0] == 1:
            self._one_token(x, weights, ids, acc)
        else:
            self._expert_major(x, weights, ids, acc)
        out = acc.to(x.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor) -> None:
        """Decode of one token: every expert it routes to, fetched (valid until the next fetch), then
        all of them in one native call where the expert function has one (``accumulate``), else one
        after the other; added in fetch order either way."""
        id_list = ids[0].tolist()
        coefs = weights[0].tolist()
        accumulate = getattr(self.expert_fn, "accumulate", None)
        if accumulate is not None and getattr(self.experts, "delivers_as_loaded", False):
            # a budgeted source hands out resident experts first and each miss as its load lands: each
            # one is added as it comes (the native call adds its experts one after the other in float32,
            # so one call per expert gives the same sums), and the first ones compute while the rest load
            for e, ew in self.experts.fetch(self.layer_idx, id_list):
                s = id_list.index(e)
                if not accumulate(x, [ew], [coefs[s]], acc):
                    acc.add_(self.expert_fn(x, ew) * weights[0, s])
            return
        fetched = list(self.experts.fetch(self.layer_idx, id_list))
        slots = [id_list.index(e) for e, _ in fetched]
        if accumulate is None or not accumulate(x, [ew for _, ew in fetched], [coefs[s] for s in slots], acc):
            for (_, ew), s in zip(fetched, slots, strict=True):
                acc.add_(self.expert_fn(x, ew) * weights[0, s])

    def _expert_major(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor) -> None:
        """Several tokens (a prefill chunk, or a batch of sequences): group the tokens by expert, fetch
        each distinct expert once (one request per expert to the source, whatever the number of
        tokens), run it on all its tokens as one matrix product and scatter the results back with
        their routing weights."""
        unique = torch.unique(ids).tolist()
        for e, ew in self.experts.fetch(self.layer_idx, unique):
            tok, slot = torch.where(ids == e)
            y = self.expert_fn(x[tok], ew) * weights[tok, slot, None]
            acc.index_add_(0, tok, y.float())


def softmax_moe(
    layer_idx: int,
    args,
    layout,
    experts: ExpertSource,
    shared_expert: nn.Module | None = None,
    shared_expert_gate: nn.Module | None = None,
) -> MoEBlock:
    """The MoE block of the Qwen2-MoE / Qwen3-MoE / OLMoE kind: a softmax top-k router over the layout's
    experts (renormalised when the config's ``norm_topk_prob`` says so) and SwiGLU experts.
    ``args``: the family's ModelArgs; ``layout``: its ``engine.store.families.moe_layout``."""
    from engine.model.layers.router import SoftmaxTopKRouter

    gate = SoftmaxTopKRouter(
        args.hidden_size,
        layout.num_experts,
        layout.top_k,
        renormalize=bool(args.get("norm_topk_prob", False)),
    )
    return MoEBlock(
        layer_idx, gate, experts, swiglu_expert(args.hidden_act), shared_expert, shared_expert_gate
    )

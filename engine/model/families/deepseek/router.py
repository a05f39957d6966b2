"""DeepSeek routers: pick each token's routed experts and their weights.

Both return ``(topk_weights [T, k] float32, topk_ids [T, k] int64)`` from ``hidden [T, H]``; the
parameter names (``weight``, V3's ``e_score_correction_bias``) are those of transformers'
``mlp.gate`` so dense checkpoints load by name.

* DeepSeek-V2: softmax over the float32 router logits, then top-k either over all experts
  (``topk_method="greedy"``) or within the ``topk_group`` groups (of ``n_group``) whose best expert
  scores highest (``"group_limited_greedy"``); weights times ``routed_scaling_factor``. As in
  transformers 5.23, ``norm_topk_prob`` is not applied for V2 (every released V2 checkpoint sets it
  to false, where the original code also only scales).
* DeepSeek-V3: sigmoid scores; ``e_score_correction_bias`` is added for the choice only. Groups are
  ranked by the sum of their two best biased scores, the ``topk_group`` best kept, top-k taken among
  their experts; weights are the unbiased scores, renormalised when ``norm_topk_prob``, times
  ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext.cpu import route_v3


def _group_mask(group_scores: torch.Tensor, topk_group: int, experts_per_group: int) -> torch.Tensor:
    """[T, G] group scores -> [T, G * experts_per_group] bool mask of the experts in the kept groups."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool)
    mask.scatter_(1, group_idx, True)
    return mask.repeat_interleave(experts_per_group, dim=1)


class DeepseekV2Router(nn.Module):
    """Softmax router with greedy or group-limited greedy top-k (DeepSeek-V2)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        topk_method: str = "greedy",
        n_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"unsupported DeepSeek-V2 topk_method {topk_method!r}")
        if topk_method == "group_limited_greedy" and (not n_group or not topk_group or num_experts % n_group):
            raise ValueError("group_limited_greedy needs n_group dividing n_routed_experts and topk_group")
        self.num_experts = num_experts
        self.top_k = top_k
        self.topk_method = topk_method
        self.n_group = n_group or 1
        self.topk_group = topk_group or 1
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1)
        if self.topk_method == "group_limited_greedy":
            per_group = self.num_experts // self.n_group
            group_scores = scores.view(-1, self.n_group, per_group).amax(dim=-1)  # [T, G]
            keep = _group_mask(group_scores, self.topk_group, per_group)
            scores = scores.masked_fill(~keep, 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.routed_scaling_factor, ids


class DeepseekV3Router(nn.Module):
    """Sigmoid router with correction bias, group-limited top-k and routed scaling (DeepSeek-V3)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int | None = None,
        topk_group: int | None = None,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_group = n_group or 1
        self.topk_group = topk_group or self.n_group
        if num_experts % self.n_group or num_experts // self.n_group < 2:
            raise ValueError(
                "DeepSeek-V3 routing needs n_group dividing n_routed_experts, >= 2 experts a group"
            )
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep the correction bias in float32 through ``.to(dtype)``, as transformers does."""
        bias = self.e_score_correction_bias.data
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = bias.to(self.e_score_correction_bias.device, torch.float32)
        return self

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.dim() == 2 and hidden.shape[0] == 1 and hidden.dtype == torch.bfloat16:
            routed = route_v3(  # one decode token on the CPU: one native call
                hidden, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                self.norm_topk_prob, self.routed_scaling_factor,
            )
            if routed is not None:
                return routed
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        keep = _group_mask(group_scores, self.topk_group, per_group)
        choice = choice.masked_fill(~keep, float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids

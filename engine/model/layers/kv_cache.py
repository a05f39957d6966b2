"""A static, preallocated KV cache with one slot per sequence (gpt-fast style; slot 0 alone for batch size one)."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values [slots, kv_heads, max_seq_len, head_dim]; ``update`` writes positions in place.

    Writing at an earlier ``start_pos`` overwrites what was there (a rewound conversation); what lies
    beyond ``start_pos + T`` is never read by a step that ends at ``start_pos + T``. Slots are
    independent sequences (a batch); each has its own positions.
    """

    def __init__(
        self,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_head_dim: int | None = None,
        slots: int = 1,
    ):
        super().__init__()
        self.max_seq_len = max_seq_len
        shape_k = (slots, kv_heads, max_seq_len, head_dim)
        shape_v = (slots, kv_heads, max_seq_len, v_head_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape_k, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape_v, dtype=dtype, device=device), persistent=False)

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [T, kv_heads, dim] at ``start_pos..start_pos+T-1`` of ``slot``; return that slot's
        views [1, kv_heads, start_pos+T, dim] covering every position up to the last one written."""
        end = start_pos + k.shape[0]
        self.k[slot, :, start_pos:end] = k.transpose(0, 1)
        self.v[slot, :, start_pos:end] = v.transpose(0, 1)
        return self.k[slot : slot + 1, :, :end], self.v[slot : slot + 1, :, :end]

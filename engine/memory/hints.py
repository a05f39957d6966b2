"""Speculative gating (ProMoE): the coming MoE layers' routers applied to this layer's router input.

The hidden state changes little from one layer to the next, so ``W_router[l'] @ h_l`` ranks the
experts layer ``l'`` will pick well enough to start loading them a layer or more early (on the demo
model, top-2 recall 0.75 one layer ahead, 0.68 two, 0.63 three; 0.25 by chance). How far ahead is
``OffloadedExperts(hint_depth=...)``, default 1: on this project's disk, two or three layers raised
the hit rate by 1.5 points but their wasted prefetches ate the gain (``benchmarks/hint_depth.py``). The router
matrices ([E, H], small) are read from the dense shards through a copy-on-write memory map, so they
cost page cache, not a second resident copy; their names are the family's
(``Family.router_weight``). The scores go to ``Policy.on_hint``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping

import torch

from engine.store.families import Family
from engine.store.header import TensorInfo


class RouterHints:
    """Router logits of a later MoE layer for a hidden state of an earlier one."""

    def __init__(self, dense: Mapping[str, TensorInfo], moe_layers: list[int], family: Family):
        """``dense``: the opened model's dense tensors (``StoreModel.dense``); the routers are among them."""
        self.moe_layers = list(moe_layers)
        self._next = {a: b for a, b in zip(self.moe_layers, self.moe_layers[1:], strict=False)}
        self._weights: dict[int, torch.Tensor] = {}
        self._maps: list[mmap.mmap] = []
        wanted = {family.router_weight(layer): layer for layer in self.moe_layers}
        by_file: dict[object, dict[str, TensorInfo]] = {}
        for name, t in dense.items():
            if name in wanted and t.file is not None:
                by_file.setdefault(t.file, {})[name] = t
        for f, hits in sorted(by_file.items(), key=lambda kv: str(kv[0])):
            fd = os.open(f, os.O_RDONLY)
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
            self._maps.append(mm)
            whole = torch.frombuffer(mm, dtype=torch.uint8)
            for name, t in hits.items():
                self._weights[wanted[name]] = whole[t.start : t.end].view(t.torch_dtype).view(t.shape)

    def close(self) -> None:
        """Drop the router views and their maps (a map is unmapped when no view of it is left)."""
        self._weights.clear()
        maps, self._maps = self._maps, []
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a router view is still held somewhere: unmapped with it
                pass

    def __bool__(self) -> bool:
        return bool(self._weights)

    def next_layer(self, layer: int) -> int | None:
        """The MoE layer after ``layer`` (None at the last one)."""
        nxt = self._next.get(layer)
        return nxt if nxt in self._weights else None

    def ahead(self, layer: int, depth: int) -> list[int]:
        """Up to ``depth`` MoE layers after ``layer`` in this token, nearest first."""
        out: list[int] = []
        nxt = self.next_layer(layer)
        while nxt is not None and len(out) < depth:
            out.append(nxt)
            nxt = self.next_layer(nxt)
        return out

    def scores(self, layer: int, hidden: torch.Tensor) -> list[float]:
        """Router logits [E] of ``layer`` for one hidden vector [H]."""
        w = self._weights[layer]
        h = hidden.reshape(-1).to(device="cpu", dtype=w.dtype)
        return torch.mv(w, h).float().tolist()

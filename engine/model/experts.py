"""The one narrow interface through which model code reaches routed-expert weights.

Model code never opens expert shards itself. An MoE block routes its tokens, tells the source what
it routed (``observe``), then asks for the weights of the experts it needs (``fetch``) and combines
the results in whatever order they arrive. The memory hierarchy (``engine/memory``) implements the
same interface with a budgeted cache, an async loader and a policy underneath; ``MappedExperts``
below is the simple all-resident implementation that maps every shard.

Store format of one expert shard (``experts/L<layer>/E<expert>.safetensors``), as nn.Linear weights:
``gate_proj.weight`` [I, H], ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I], and for
families with expert biases (gpt-oss) ``gate_proj.bias`` [I], ``up_proj.bias`` [I], ``down_proj.bias`` [H]
(``engine.store.families.EXPERT_TENSORS``, ``EXPERT_BIASES``).
A weight may be block-quantised (``engine.formats``): it is then loaded as stored, a ``QuantTensor``
of the same logical shape, and the expert computes on it (``engine.formats.linear``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from engine.formats import storage
from engine.formats.tensor import QuantTensor

if TYPE_CHECKING:
    from engine.store.opened import StoreModel

Weight = torch.Tensor | QuantTensor


@dataclass
class ExpertWeights:
    """One routed expert's matrices on the compute device (nn.Linear layout)."""

    gate: Weight  # [I, H]
    up: Weight  # [I, H]
    down: Weight  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @classmethod
    def from_tensors(cls, t: dict[str, Weight]) -> ExpertWeights:
        return cls(
            gate=t["gate_proj.weight"],
            up=t["up_proj.weight"],
            down=t["down_proj.weight"],
            gate_bias=t.get("gate_proj.bias"),
            up_bias=t.get("up_proj.bias"),
            down_bias=t.get("down_proj.bias"),
        )


def load_expert(
    store: StoreModel, layer: int, expert: int, dtype: torch.dtype, device: torch.device
) -> tuple[ExpertWeights, int]:
    """One expert shard of the opened model as stored (read by ``StoreModel.read_expert``, so a damaged
    shard is a one-line error): float tensors in ``dtype``, block-quantised ones kept as they are (no
    upcast) on ``device``; and the shard's tensor bytes as stored."""
    raw = store.read_expert(layer, expert)
    kept = {n: (t.format, t.shape) for n, t in store.layer_expert_tensors(layer).items() if t.quantised}
    out: dict[str, Weight] = {}
    size = 0
    for name, r in raw.items():
        t = storage.as_stored(name, r, kept)
        if isinstance(t, QuantTensor):
            size += t.nbytes
            out[name] = t.to(device)
        else:
            size += t.numel() * t.element_size()
            out[name] = t.to(device=device, dtype=dtype)
    return ExpertWeights.from_tensors(out), size


class ExpertSource(Protocol):
    """What an MoE block sees. ``layer`` is the decoder layer index; experts are 0..E-1."""

    def observe(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Routing of ``layer`` for this step: topk_ids [T, k] (int64), hidden [T, H] the router input.

        Called before ``fetch`` for the same layer. Used to count accesses, record activation traces
        and predict (prefetch) the experts of the coming layers. May do nothing.
        """

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield ``(expert_id, weights)`` for every id in ``expert_ids``, in any order (loaded ones first).

        Weights stay valid until the next ``fetch`` call; the caller must not keep them longer.
        A budgeted source streaming a prefill step (more than one token, or more ids than top-k) may
        reuse an expert's memory once the caller asks for the next one: use each inside the loop.
        """


class ExpertLifecycle(Protocol):
    """What the runtime calls on the expert source besides the model's ``observe``/``fetch``.

    ``begin_sequence()`` when a request starts and ``end_sequence()`` when it ended (the policy of a
    budgeted cache learns where requests start); ``close()`` releases what the source holds (cache
    memory, loader threads, open files); afterwards it is unusable. The memory hierarchy's sources
    also have ``stats() -> CacheStats``.
    """

    def begin_sequence(self) -> None: ...

    def end_sequence(self) -> None: ...

    def close(self) -> None: ...


class MappedExperts:
    """All-resident expert source: every shard memory-mapped, converted to dtype/device on first use."""

    def __init__(self, store: StoreModel | Path | str, dtype: torch.dtype, device: torch.device | str = "cpu"):
        from engine.store.opened import as_store_model

        self.store = as_store_model(store)
        self.dtype = dtype
        self.device = torch.device(device)
        self._cache: dict[tuple[int, int], ExpertWeights] = {}

    def _load(self, layer: int, expert: int) -> ExpertWeights:
        return load_expert(self.store, layer, expert, self.dtype, self.device)[0]

    def begin_sequence(self) -> None:
        """A request starts (nothing to decide: every expert stays once loaded)."""

    def end_sequence(self) -> None:
        """The request ended."""

    def close(self) -> None:
        """Drop the converted experts."""
        self._cache.clear()

    def observe(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        return None

    def resident_count(self) -> int:
        """How many experts have been converted so far (each on its first use)."""
        return len(self._cache)

    def native_experts(self, layer: int, num_experts: int) -> list[ExpertWeights] | None:
        """Every expert of ``layer`` once all have been used (``engine.model.native_step``), else None."""
        found = [self._cache.get((layer, e)) for e in range(num_experts)]
        return None if any(w is None for w in found) else found

    def count_hits(self, layer: int, count: int) -> None:
        """Nothing is counted here."""

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        for e in expert_ids:
            key = (layer, int(e))
            w = self._cache.get(key)
            if w is None:
                w = self._cache[key] = self._load(layer, int(e))
            yield int(e), w

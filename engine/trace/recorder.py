"""Record a model's routing while it runs, and persist it as EAMs when a request ends.

The runtime passes a ``TraceRecorder`` into ``engine.memory.open_experts(recorder=...)``; the expert
source calls ``on_route`` from ``observe`` for every MoE layer of every step. The runtime (or
``moeinf trace``) brackets each request with ``begin_sequence`` / ``end_sequence``; ``end_sequence``
merges the request into ``$MOEINF_HOME/traces/<model>/`` (see ``engine/trace/store.py``).

A step whose router saw several tokens at once (T > 1) counts as prefill, a single token as decode,
unless the phase is set explicitly (``begin_sequence(phase)`` / ``set_phase``). Layers are decoder
layer indices; pass ``layers`` (the MoE layers' decoder indices) when not every layer is an MoE layer,
otherwise index l is row l of the EAM. With ``model_dir`` (the store model's directory) nothing is saved
once that directory is gone (the model was removed while it ran).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import MoeinfError
from engine.trace.eam import DECODE, EAM, PHASES, PREFILL, transition_counts
from engine.trace.store import StoredTraces, TraceStore

log = logging.getLogger("moeinf.trace")


class TraceRecorder:
    """Collects one request's routing (EAM + token-level ids) and persists it at ``end_sequence``."""

    def __init__(
        self,
        model_name: str,
        num_layers: int,
        num_experts: int,
        layers: Sequence[int] | None = None,
        persist: bool = True,
        model_dir: str | Path | None = None,
    ):
        self.model_name = model_name
        self.num_layers, self.num_experts = num_layers, num_experts
        self._row = {int(layer): i for i, layer in enumerate(layers)} if layers is not None else None
        self.persist = persist
        self.model_dir = Path(model_dir) if model_dir is not None else None  # a store model: skip saving once it is gone
        self.store = TraceStore(model_name)
        self.top_k: int | None = None
        self.sequences_recorded = 0
        self.save_error: OSError | None = None  # why the last sequence could not be saved, if it could not
        self._active = False
        self._phase: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._eam = EAM.empty(self.num_layers, self.num_experts)
        self._steps: list[np.ndarray] = []  # token-level ids per step: [T, L, k]
        self._step: dict[int, np.ndarray] = {}
        self._last_row = -1

    # -- request bracket ------------------------------------------------------------------------------
    def begin_sequence(self, phase: str | None = None) -> None:
        """A request starts; ``phase`` ("prefill"/"decode") fixes the phase, None infers it per step."""
        if self._active:
            self.end_sequence()
        self._reset()
        self._active = True
        self.set_phase(phase)

    def set_phase(self, phase: str | None) -> None:
        if phase is None:
            self._phase = None
        elif phase in PHASES:
            self._phase = PHASES.index(phase)
        else:
            raise MoeinfError(f"unknown trace phase {phase!r}; use prefill or decode")

    def on_route(self, layer: int, topk_ids) -> None:
        """Routing of ``layer`` for the current step: topk_ids [T, k] (torch or numpy, int)."""
        if not self._active:
            self.begin_sequence()
        ids = np.asarray(topk_ids.detach().cpu() if hasattr(topk_ids, "detach") else topk_ids).astype(np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        row = self._row.get(int(layer)) if self._row is not None else int(layer)
        if row is None or not 0 <= row < self.num_layers:
            return
        if self.top_k is None:
            self.top_k = int(ids.shape[1])
        if row <= self._last_row and self._step:
            self._flush_step()
        self._step[row] = ids
        self._last_row = row

    def _flush_step(self) -> None:
        if not self._step:
            return
        T = max(a.shape[0] for a in self._step.values())
        k = self.top_k or 1
        step = np.full((T, self.num_layers, k), -1, dtype=np.int64)
        for row, ids in self._step.items():
            n, kk = min(ids.shape[0], T), min(ids.shape[1], k)
            step[:n, row, :kk] = ids[:n, :kk]
        phase = self._phase if self._phase is not None else (PREFILL if T > 1 else DECODE)
        self._eam.add_ids(step, phase)
        self._steps.append(step)
        self._step = {}
        self._last_row = -1

    def end_sequence(self) -> StoredTraces | None:
        """The request ended: persist its EAM and routing (merged under the store's lock)."""
        self._flush_step()
        self._active = False
        if not self._steps:
            return None
        ids = np.concatenate(self._steps, axis=0)
        eam = self._eam
        self._reset()
        self.sequences_recorded += 1
        new = StoredTraces.empty(self.num_layers, self.num_experts, ids.shape[2])
        new.add_sequence(ids, eam, transition_counts(ids, self.num_experts))
        if not self.persist:
            return new
        if self.model_dir is not None and not self.model_dir.exists():
            log.info("not saving traces of %s: the model was removed from the store", self.model_name)
            return new  # `moeinf rm` during a run: do not bring back traces/<model> for a deleted model
        try:
            stored = self.store.update(new)
            self.save_error = None
            return stored
        except OSError as err:
            self.save_error = err
            log.warning("Warning: could not save traces of %s (%s)", self.model_name, err)
            return None

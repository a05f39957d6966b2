"""Moving traces between the store and the interchange format, and summarising stored traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import MoeinfError
from engine.trace.eam import DECODE, EAM, PHASES, PREFILL, transition_counts
from engine.trace.format import RoutingTrace, load_trace, save_trace
from engine.trace.store import StoredTraces, TraceStore


def _phase_of(meta: dict) -> int:
    return PREFILL if str(meta.get("phase", "")).lower().startswith("prefill") else DECODE


def import_trace(
    path: str | Path, model_name: str, model_shape: tuple[int, int, int] | None = None
) -> StoredTraces:
    """Merge an interchange ``.npz`` into the stored traces of ``model_name`` (one EAM per sequence).

    ``model_shape`` (MoE layers, experts, top-k) is the stored model's, when it is in the store: a trace
    of another shape is refused, as are traces of another shape than those already stored (never replaced)."""
    trace = load_trace(path)
    shape = (trace.num_layers, trace.num_experts, trace.top_k)
    if model_shape is not None and tuple(model_shape) != shape:
        raise MoeinfError(
            f"{path} holds {shape[0]} MoE layers x {shape[1]} experts, top-{shape[2]}, but {model_name!r} has "
            f"{model_shape[0]} x {model_shape[1]}, top-{model_shape[2]}; import a trace of this model"
        )
    phase = _phase_of(trace.meta)
    new = StoredTraces.empty(trace.num_layers, trace.num_experts, trace.top_k)
    for s, e in trace.sequences():
        ids = trace.expert_ids[s:e]
        new.add_sequence(ids, EAM.from_ids(ids, trace.num_experts, phase), transition_counts(ids, trace.num_experts))
    src = trace.meta.get("model") or trace.meta.get("source")
    if src:
        new.meta["imported_from"] = str(src)
    return TraceStore(model_name).update(new, replace_other_shape=False)


def require(model_name: str) -> StoredTraces:
    stored = TraceStore(model_name).read()
    if stored is None:
        raise MoeinfError(
            f"no traces for {model_name!r}; record some with `moeinf trace record {model_name} --prompts FILE`"
            " or `moeinf trace import FILE --model NAME`"
        )
    return stored


def export_traces(model_name: str, path: str | Path) -> RoutingTrace:
    """Write the stored token-level routing of ``model_name`` as an interchange ``.npz``."""
    stored = require(model_name)
    if stored.raw_ids.shape[0] == 0:
        raise MoeinfError(f"the traces of {model_name!r} hold no token-level routing to export; record some first")
    trace = RoutingTrace(
        stored.raw_ids,
        stored.num_experts,
        stored.raw_starts,
        meta={
            "model": model_name,
            "phase": "mixed (prefill steps then decode steps per sequence)",
            "source": "moeinf trace export",
        },
    )
    save_trace(trace, path)
    return trace


def heat(stored: StoredTraces, phase: str = "all") -> np.ndarray:
    """Per-token usage rate [L, E] over the stored EAMs, for one phase or both (token-weighted)."""
    mean = stored.collection.mean_rates()
    if mean is None:
        return np.zeros((stored.num_layers, stored.num_experts), dtype=np.float32)
    if phase in PHASES:
        return mean[PHASES.index(phase)]
    if phase != "all":
        raise MoeinfError(f"unknown phase {phase!r}; use prefill, decode or all")
    tok = stored.collection.tokens.astype(np.float64)
    if tok.sum() <= 0:
        return mean.sum(axis=0)
    return (mean[0] * tok[0] + mean[1] * tok[1]) / tok.sum()

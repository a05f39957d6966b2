"""Routing traces in the interchange format (one ``.npz`` per trace; docs/trace-format.md describes it).

| key | dtype, shape | meaning |
|---|---|---|
| ``expert_ids`` | int16 [T, L, k] | per token (execution order) and MoE layer, the k routed experts; -1 unknown |
| ``num_experts`` | int64 scalar | routed experts per layer (E) |
| ``seq_starts`` | int64 [S] | first token of each of S concatenated sequences |
| ``meta`` | str (JSON) | model, phase (prefill / decode), source, caveats |
| ``gate_scores`` | float32 [T, L, k] | optional router weights of those experts |
| ``token_ids`` | int64 [T] | optional input token ids |
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import MoeinfError


@dataclass
class RoutingTrace:
    """T tokens x L MoE layers x k routed expert ids (-1 = unknown), sequences concatenated."""

    expert_ids: np.ndarray  # int [T, L, k]
    num_experts: int
    seq_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # int64 [S]
    meta: dict = field(default_factory=dict)
    gate_scores: np.ndarray | None = None  # float32 [T, L, k]
    token_ids: np.ndarray | None = None  # int64 [T]

    def __post_init__(self) -> None:
        ids = np.asarray(self.expert_ids)
        if ids.ndim != 3:
            raise MoeinfError(f"a routing trace's expert_ids must be [tokens, layers, k], got shape {ids.shape}")
        self.expert_ids = ids.astype(np.int64, copy=False)
        self.num_experts = int(self.num_experts)
        starts = np.asarray(self.seq_starts, dtype=np.int64).reshape(-1)
        if starts.size == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts[starts > 0]]).astype(np.int64)
        self.seq_starts = starts
        if ids.size and (ids.max() >= self.num_experts or ids.min() < -1):
            raise MoeinfError(f"a routing trace has expert ids outside -1..{self.num_experts - 1}; check num_experts")

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def sequences(self) -> list[tuple[int, int]]:
        """(start, end) token ranges of the sequences."""
        ends = list(self.seq_starts[1:]) + [self.num_tokens]
        return [(int(s), int(e)) for s, e in zip(self.seq_starts, ends, strict=True) if e > s]

    def select(self, seq_indices: list[int]) -> RoutingTrace:
        """A new trace holding only the given sequences, in the given order."""
        ranges = self.sequences()
        parts = [ranges[i] for i in seq_indices]
        idx = np.concatenate([np.arange(s, e) for s, e in parts]) if parts else np.zeros(0, dtype=np.int64)
        starts = np.cumsum([0] + [e - s for s, e in parts[:-1]]).astype(np.int64)
        return RoutingTrace(
            expert_ids=self.expert_ids[idx],
            num_experts=self.num_experts,
            seq_starts=starts,
            meta=dict(self.meta),
            gate_scores=None if self.gate_scores is None else self.gate_scores[idx],
            token_ids=None if self.token_ids is None else self.token_ids[idx],
        )


def load_trace(path: str | Path) -> RoutingTrace:
    """Read an interchange ``.npz``; a missing or malformed file is a one-line MoeinfError."""
    path = Path(path)
    if not path.is_file():
        raise MoeinfError(f"trace file {path} not found; give the path of an .npz routing trace")
    try:
        with np.load(path, allow_pickle=False) as d:
            ids = d["expert_ids"]
            num_experts = int(d["num_experts"])
            starts = d["seq_starts"] if "seq_starts" in d.files else np.zeros(1, dtype=np.int64)
            meta = json.loads(str(d["meta"])) if "meta" in d.files else {}
            scores = d["gate_scores"] if "gate_scores" in d.files else None
            tokens = d["token_ids"] if "token_ids" in d.files else None
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise MoeinfError(f"{path} is not a routing trace in the interchange format ({err}); see docs/trace-format.md") from None
    return RoutingTrace(ids, num_experts, starts, meta if isinstance(meta, dict) else {}, scores, tokens)


def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    """Write ``trace`` as an interchange ``.npz`` (written aside, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "expert_ids": trace.expert_ids.astype(np.int16),
        "num_experts": np.int64(trace.num_experts),
        "seq_starts": trace.seq_starts.astype(np.int64),
        "meta": np.array(json.dumps(trace.meta)),
    }
    if trace.gate_scores is not None:
        arrays["gate_scores"] = np.asarray(trace.gate_scores, dtype=np.float32)
    if trace.token_ids is not None:
        arrays["token_ids"] = np.asarray(trace.token_ids, dtype=np.int64)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""Persisted traces of one model: ``$MOEINF_HOME/traces/<model>/traces.npz``.

One versioned ``.npz`` per model holds the EAM collection (rates [N, 2, L, E] float16, weights,
request and token totals, transition counts [L-1, E, E]) and the most recent token-level routing
(``raw_ids`` [T, L, k] int16 with ``raw_starts``, at most ``MAX_RAW_TOKENS`` tokens, oldest
sequences dropped first) for export in the interchange format. Sizes are bounded: at most the
collection's capacity of EAMs, ``MAX_RAW_TOKENS`` raw tokens, and transitions only for models where
they fit ``MAX_TRANSITION_ENTRIES``.

Writers take an exclusive ``fcntl.flock`` on ``traces/<model>/.lock``, read the current file, merge
their new data into it and write the result aside then ``os.replace`` it into place, so two
processes recording at once lose nothing and readers never see a half-written file. A file that
cannot be read (corrupt, wrong version or shape) is renamed ``traces.npz.corrupt`` with a one-line
warning and treated as empty.

Beside it, ``policy-<name>.npz`` holds a policy's learned state (``write_policy_state`` /
``read_policy_state``; the ``eam`` policy keeps its weights there, so the next session starts from
them); an unreadable one is ignored with a warning. ``remove`` deletes it with the traces.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import MoeinfError
from engine.store.paths import traces_dir
from engine.trace.eam import DEFAULT_CAPACITY, EAM, EAMCollection

FORMAT_VERSION = 1
MAX_RAW_TOKENS = 65536
FILE_NAME = "traces.npz"
log = logging.getLogger("moeinf.trace")


@dataclass
class StoredTraces:
    """Everything persisted for one model."""

    collection: EAMCollection
    top_k: int
    raw_ids: np.ndarray  # int16 [T, L, k]
    raw_starts: np.ndarray  # int64 [S]
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, top_k: int, capacity: int = DEFAULT_CAPACITY) -> StoredTraces:
        return cls(
            EAMCollection(num_layers, num_experts, capacity),
            top_k,
            np.zeros((0, num_layers, top_k), dtype=np.int16),
            np.zeros(0, dtype=np.int64),
        )

    @property
    def num_layers(self) -> int:
        return self.collection.num_layers

    @property
    def num_experts(self) -> int:
        return self.collection.num_experts

    def add_sequence(self, ids: np.ndarray, eam: EAM, transitions: np.ndarray | None) -> None:
        """Fold in one recorded sequence: its token-level ids [T, L, k], EAM and transition counts."""
        self.collection.add(eam)
        if transitions is not None:
            self.collection.add_transitions(transitions)
        self.append_raw(ids)

    def append_raw(self, ids: np.ndarray) -> None:
        ids = _fit_k(np.asarray(ids), self.top_k)
        if ids.shape[0] == 0:
            return
        self.raw_starts = np.concatenate([self.raw_starts, [self.raw_ids.shape[0]]]).astype(np.int64)
        self.raw_ids = np.concatenate([self.raw_ids, ids.astype(np.int16)], axis=0)
        while self.raw_ids.shape[0] > MAX_RAW_TOKENS and len(self.raw_starts) > 1:
            cut = int(self.raw_starts[1])
            self.raw_ids = self.raw_ids[cut:]
            self.raw_starts = self.raw_starts[1:] - cut
        if self.raw_ids.shape[0] > MAX_RAW_TOKENS:  # one sequence longer than the bound: keep its tail
            self.raw_ids = self.raw_ids[-MAX_RAW_TOKENS:]
            self.raw_starts = np.zeros(1, dtype=np.int64)

    def merge(self, other: StoredTraces) -> None:
        self.collection.merge(other.collection)
        ends = list(other.raw_starts[1:]) + [other.raw_ids.shape[0]]
        for s, e in zip(other.raw_starts, ends, strict=True):
            self.append_raw(other.raw_ids[int(s) : int(e)])


def _fit_k(ids: np.ndarray, k: int) -> np.ndarray:
    if ids.shape[-1] == k:
        return ids
    if ids.shape[-1] > k:
        return ids[..., :k]
    pad = np.full(ids.shape[:-1] + (k - ids.shape[-1],), -1, dtype=ids.dtype)
    return np.concatenate([ids, pad], axis=-1)


def _shape(t: StoredTraces) -> str:
    return f"{t.num_layers} MoE layers x {t.num_experts} experts, top-{t.top_k}"


class TraceStore:
    """Read, merge-write and remove the persisted traces of model ``model_name``."""

    def __init__(self, model_name: str):
        if model_name and model_name.startswith(("/", "./", "~")):
            model_name = Path(model_name).expanduser().name  # a store directory: its name
        if not model_name or ".." in model_name:
            raise MoeinfError(f"invalid model name {model_name!r} for traces; use the store name (moeinf list)")
        self.model_name = model_name
        self.dir = traces_dir(model_name.replace("/", "--"))
        self.path = self.dir / FILE_NAME

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive inter-process lock on this model's traces."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> StoredTraces | None:
        """The stored traces, or None when there are none (or the file was corrupt and set aside)."""
        if not self.path.is_file():
            return None
        with self.locked():
            return self._read_unlocked()

    def load_collection(self, num_layers: int, num_experts: int) -> EAMCollection | None:
        """The stored EAM collection if it matches the model's shape (None otherwise)."""
        stored = self.read()
        if stored is None or (stored.num_layers, stored.num_experts) != (num_layers, num_experts):
            return None
        return stored.collection

    def update(self, new: StoredTraces, replace_other_shape: bool = True) -> StoredTraces:
        """Merge ``new`` into the stored traces under the lock and write them atomically.

        Stored traces of another shape (layers, experts, top-k) are replaced, as after a re-pull of a
        changed model, unless ``replace_other_shape`` is False: then a one-line MoeinfError, nothing written."""
        with self.locked():
            cur = self._read_unlocked()
            if cur is None or (cur.num_layers, cur.num_experts, cur.top_k) != (new.num_layers, new.num_experts, new.top_k):
                if cur is not None and not replace_other_shape:
                    raise MoeinfError(
                        f"the traces of {self.model_name!r} are {_shape(cur)}, these are {_shape(new)}; "
                        f"import traces of the same model shape (or `moeinf trace rm {self.model_name}` first)"
                    )
                if cur is not None:
                    log.warning(
                        "Warning: replacing traces of %s recorded for another model shape", self.model_name
                    )
                cur = StoredTraces.empty(new.num_layers, new.num_experts, new.top_k, new.collection.capacity)
            cur.merge(new)
            cur.meta = {**cur.meta, **new.meta}
            self._write_unlocked(cur)
            return cur

    def policy_state_path(self, policy: str) -> Path:
        """``policy-<name>.npz`` beside the traces: a policy's learned state (``eam``: its weights)."""
        return self.dir / f"policy-{policy}.npz"

    def write_policy_state(self, policy: str, arrays: dict[str, np.ndarray]) -> None:
        """Store a policy's learned state (``policy-<name>.npz``), under the lock, written aside then
        renamed: readers see the old state or the new one, never a part; the last writer wins."""
        if not policy.replace("-", "").replace("_", "").isalnum():
            raise MoeinfError(f"invalid policy name {policy!r} for its state")
        with self.locked():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-policy-", suffix=".npz", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, self.policy_state_path(policy))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def read_policy_state(self, policy: str) -> dict[str, np.ndarray] | None:
        """A policy's stored state, or None when there is none or it cannot be read (a warning)."""
        path = self.policy_state_path(policy)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            log.warning("Warning: policy state %s is unreadable (%s); starting afresh", path, type(err).__name__)
            return None

    def remove(self) -> bool:
        """Delete this model's traces (corrupt ones set aside included); True if there were any."""
        if not self.dir.exists():
            return False
        with self.locked():
            found = False
            for p in self.dir.iterdir():
                if p.name != ".lock":
                    found = True
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        with contextlib.suppress(OSError):
            (self.dir / ".lock").unlink()
            self.dir.rmdir()
        return found

    # -- file format ----------------------------------------------------------------------------------
    def _read_unlocked(self) -> StoredTraces | None:
        if not self.path.is_file():
            return None
        try:
            return _decode(self.path)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as err:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.warning(
                "Warning: trace file %s is corrupt or of another version (%s); set aside as %s",
                self.path, type(err).__name__, aside.name,
            )
            return None

    def _write_unlocked(self, data: StoredTraces) -> None:
        c = data.collection
        arrays: dict[str, np.ndarray] = {
            "version": np.int64(FORMAT_VERSION),
            "num_layers": np.int64(c.num_layers),
            "num_experts": np.int64(c.num_experts),
            "top_k": np.int64(data.top_k),
            "capacity": np.int64(c.capacity),
            "rates": c.rates.astype(np.float16),
            "weights": c.weights.astype(np.float64),
            "requests": np.int64(c.requests),
            "tokens": c.tokens.astype(np.int64),
            "raw_ids": data.raw_ids.astype(np.int16),
            "raw_starts": data.raw_starts.astype(np.int64),
            "meta": np.array(json.dumps({"model": self.model_name, **data.meta})),
        }
        if c.transitions is not None:
            arrays["transitions"] = c.transitions.astype(np.float32)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _decode(path: Path) -> StoredTraces:
    with np.load(path, allow_pickle=False) as d:
        version = int(d["version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
        L, E, k = int(d["num_layers"]), int(d["num_experts"]), int(d["top_k"])
        coll = EAMCollection(L, E, int(d["capacity"]), with_transitions="transitions" in d.files)
        rates = d["rates"].astype(np.float32)
        weights = d["weights"].astype(np.float64)
        if rates.ndim != 4 or rates.shape[1:] != (2, L, E) or weights.shape != (rates.shape[0],):
            raise ValueError("EAM arrays have the wrong shape")
        coll.rates, coll.weights = rates, weights
        coll.requests = int(d["requests"])
        coll.tokens = d["tokens"].astype(np.int64).reshape(2)
        if "transitions" in d.files:
            tr = d["transitions"].astype(np.float32)
            if tr.shape != (max(L - 1, 0), E, E):
                raise ValueError("transition counts have the wrong shape")
            coll.transitions = tr
        raw = d["raw_ids"].astype(np.int16)
        starts = d["raw_starts"].astype(np.int64)
        if raw.ndim != 3 or raw.shape[1:] != (L, k):
            raise ValueError("routing arrays have the wrong shape")
        meta = json.loads(str(d["meta"]))
    return StoredTraces(coll, k, raw, starts, meta if isinstance(meta, dict) else {})

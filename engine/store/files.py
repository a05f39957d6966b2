"""Small file helpers of the store (no torch): sha256 of a file, JSON written aside then renamed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WrittenFile:
    rel: str
    size: int
    sha256: str


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> WrittenFile:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename; returns its size and sha256."""
    tmp = path.with_name(path.name + ".tmp")
    raw = (json.dumps(data, indent=2) + "\n").encode()
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return WrittenFile(path.name, len(raw), hashlib.sha256(raw).hexdigest())

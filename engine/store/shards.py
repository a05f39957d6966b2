"""Safetensors files written tensor by tensor, with the data section aligned (expert shards: 4 KiB).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header, then the tensor
data back to back. The writer pads the JSON with spaces (which every safetensors reader accepts) so
that ``8 + N`` is a multiple of ``align``: the data section then starts on an aligned offset and a
direct (O_DIRECT) read of an expert needs no copy (``engine.store.header`` reads the header back). Tensors are written in the order given, one at a
time, so memory stays at about one tensor; the sha256 of the file is computed while writing.
Files are not fsync'ed one by one (thousands of experts would pay for it): a resumed pull re-hashes
every file it keeps and ``moeinf verify`` re-hashes a model, so a file torn by a power cut is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.formats import storage
from engine.formats.tensor import QuantTensor
from engine.store.dtypes import code_of
from engine.store.header import ALIGN


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def build_header(specs: list[TensorSpec], align: int, metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for ``specs`` in order, padded so the data starts at ``align``·n."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": code_of(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    total = 8 + len(raw)
    step = max(align, 8)
    padded = -(-total // step) * step
    raw += b" " * (padded - total)
    return struct.pack("<Q", len(raw)) + raw


class StreamingShardWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time.

    ``with StreamingShardWriter(path, specs) as w: w.write(name, tensor) ...``; writes to
    ``path + ".tmp"`` and renames it into place on a clean exit. ``w.sha256`` and ``w.size`` after.
    """

    def __init__(self, path: str | Path, specs: list[TensorSpec], align: int = ALIGN, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256 = ""
        self._header = build_header(self.specs, align, metadata)
        self._f = None

    def __enter__(self) -> StreamingShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._put(self._header)
        return self

    def _put(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the planned "
                f"{spec.name} {spec.dtype} {spec.shape}"
            )
        self._next += 1
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._put(memoryview(t.view(torch.uint8).reshape(-1).numpy()))

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._f = self._f, None
        try:
            if exc_type is None:
                if self._next != len(self.specs):
                    raise ValueError(f"{self.path}: {len(self.specs) - self._next} planned tensors never written")
                f.flush()
        finally:
            f.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
            self.sha256 = self._hash.hexdigest()
        else:
            self._tmp.unlink(missing_ok=True)


def write_tensors(
    path: str | Path, tensors: Iterable[tuple[str, torch.Tensor | QuantTensor]], align: int = ALIGN
) -> StreamingShardWriter:
    """Write ``(name, tensor)`` pairs (in that order) to an aligned safetensors file; returns the writer.

    A ``QuantTensor`` is written as its raw U8 blocks and listed in the header's ``moeinf.formats``
    metadata (``engine.formats.storage``)."""
    stored = [(n, *storage.stored_form(t)) for n, t in tensors]
    items = [(n, t) for n, t, _ in stored]
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in items]
    meta = storage.metadata({n: entry for n, _, entry in stored if entry is not None})
    with StreamingShardWriter(path, specs, align, metadata=meta) as w:
        for n, t in items:
            w.write(n, t)
    return w

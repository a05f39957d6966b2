"""Expert shards on disk: the safetensors header, parsed by hand, and whole-file reads that bypass the
page cache (O_DIRECT) where the file system allows it.

A safetensors file is ``u64 little-endian N | N bytes of JSON header | data``; each header entry
gives ``dtype``, ``shape`` and ``data_offsets`` relative to the start of the data. The store pads
the header so data starts on a 4 KiB boundary; then a whole-file O_DIRECT read lands every tensor
where a view can use it without a copy.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.formats import storage

ALIGN = 4096

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: absolute byte range ``[start, end)`` in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ShardHeader:
    data_start: int
    tensors: dict[str, TensorEntry]
    formats: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # block-quantised tensors

    @property
    def data_end(self) -> int:
        return max((t.end for t in self.tensors.values()), default=self.data_start)

    def signature(self) -> tuple:
        """What must match between shards that share one slot layout."""
        return tuple(sorted((k, str(v.dtype), v.shape, self.formats.get(k)) for k, v in self.tensors.items()))


def parse_header(buf: bytes | memoryview, path: Path | str = "<buffer>") -> ShardHeader:
    """Parse the header at the start of ``buf`` (which holds at least the header bytes)."""
    try:
        (n,) = struct.unpack_from("<Q", buf, 0)
        if n <= 0 or 8 + n > len(buf):
            raise ValueError(f"header length {n} out of range")
        meta = json.loads(bytes(buf[8 : 8 + n]))
        data_start = 8 + n
        tensors = {}
        kept = storage.read_formats(meta.get("__metadata__"))
        for name, info in meta.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensors[name] = TensorEntry(dtype, tuple(info["shape"]), data_start + begin, data_start + end)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise MoeinfError(f"corrupt expert shard {path}: {e}; remove the model and pull it again") from e
    return ShardHeader(data_start, tensors, kept)


def read_header(path: Path | str) -> ShardHeader:
    """Read and parse a shard's header with ordinary buffered I/O (used once at open)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoeinfError(f"corrupt expert shard {path}: file too short; pull the model again")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise MoeinfError(f"corrupt expert shard {path}: header too large; pull the model again")
            return parse_header(head + f.read(n), path)
    except FileNotFoundError as e:
        raise MoeinfError(f"missing expert shard {path}: the model is incomplete; pull it again") from e


def aligned_buffer(nbytes: int, populate: bool = True) -> mmap.mmap:
    """Page-aligned anonymous memory (``nbytes`` rounded up to 4 KiB), faulted in when ``populate``."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate and hasattr(mmap, "MAP_POPULATE"):
        flags |= mmap.MAP_POPULATE
    return mmap.mmap(-1, max(round_up(nbytes), ALIGN), flags=flags)


class ShardReader:
    """Whole-file reads into page-aligned buffers: O_DIRECT when ``direct`` and the file system takes it,
    buffered otherwise (the first EINVAL switches this reader to buffered for good).

    ``bytes_read`` counts what the reads returned (O_DIRECT: what came from the disk).
    """

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.bytes_read = 0

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.direct else "buffered"

    def read_into(self, path: Path | str, buf: memoryview, size: int | None = None) -> int:
        """Read the whole file into ``buf`` (page-aligned, at least the file size rounded up to 4 KiB).

        Returns the file size. Raises MoeinfError if the file is missing or larger than ``buf``.
        """
        if self.direct:
            try:
                return self._read(path, buf, direct=True, size=size)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # this file system does not do O_DIRECT (tmpfs, some FUSE)
        return self._read(path, buf, direct=False, size=size)

    def _read(self, path: Path | str, buf: memoryview, direct: bool, size: int | None) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as e:
            raise MoeinfError(f"missing expert shard {path}: the model is incomplete; pull it again") from e
        try:
            if size is None:
                size = os.fstat(fd).st_size
            want = round_up(size) if direct else size
            if want > len(buf):
                raise MoeinfError(
                    f"expert shard {path} is larger than the others ({size} bytes); pull the model again"
                )
            got = 0
            while got < size:
                n = os.preadv(fd, [buf[got:want]], got)
                if n <= 0:
                    break
                got += n
                if direct and got % ALIGN and got < size:
                    # a short read off the block grid: finish with buffered reads
                    return self._finish_buffered(path, buf, got, size)
            self.bytes_read += got
            if got < size:
                raise MoeinfError(f"expert shard {path} is truncated; pull the model again")
            return size
        finally:
            os.close(fd)

    def _finish_buffered(self, path: Path | str, buf: memoryview, got: int, size: int) -> int:
        self.bytes_read += got
        with open(path, "rb", buffering=0) as f:
            f.seek(got)
            while got < size:
                n = f.readinto(buf[got:size])
                if not n:
                    raise MoeinfError(f"expert shard {path} is truncated; pull the model again")
                got += n
                self.bytes_read += n
        return size

"""Expert shards on disk: whole-file reads that bypass the page cache (O_DIRECT) where the file system
allows it, into page-aligned buffers.

The store pads every shard's safetensors header so data starts on a 4 KiB boundary
(``engine.store.header``, which also parses the header); then a whole-file O_DIRECT read lands every
tensor where a view can use it without a copy.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from engine.errors import MoeinfError
from engine.store.header import ALIGN
from engine.store.paths import missing_shard_error


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


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
            raise missing_shard_error(path) from e
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

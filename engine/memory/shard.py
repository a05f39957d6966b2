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
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


class LoadAborted(Exception):
    """A read stopped part way (``ShardReader.read_into``'s ``stop``); ``bytes`` were read by then."""

    def __init__(self, nbytes: int):
        super().__init__(f"read stopped after {nbytes} bytes")
        self.bytes = nbytes


class ShardReader:
    """Whole-file reads into page-aligned buffers: O_DIRECT when ``direct`` and the file system takes it,
    buffered otherwise (the first EINVAL switches this reader to buffered for good).

    ``pieces``: a direct read of a file is split into that many aligned pieces (each at least
    ``piece_bytes``), read at the same time by a small pool of this reader's threads, so one load keeps
    several requests in flight. A read given ``stop`` goes in pieces of ``piece_bytes``, ``pieces``
    of them in flight, and ends early (``LoadAborted``) once ``stop()`` turns true.

    ``bytes_read`` counts what the reads returned (O_DIRECT: what came from the disk).
    """

    def __init__(self, direct: bool = True, pieces: int = 1, piece_bytes: int = 1 << 20):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.bytes_read = 0
        self.pieces = max(1, int(pieces))
        self.piece_bytes = max(ALIGN, round_up(int(piece_bytes)))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        """Stop the piece readers' threads (the reader still works afterwards, one piece at a time)."""
        with self._pool_lock:
            pool, self._pool, self.pieces = self._pool, None, 1
        if pool is not None:
            pool.shutdown(wait=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # enough for two loader workers' pieces at once
                self._pool = ThreadPoolExecutor(2 * max(2, self.pieces), thread_name_prefix="moeinf-piece")
            return self._pool

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.direct else "buffered"

    def read_into(
        self, path: Path | str, buf: memoryview, size: int | None = None, stop: Callable[[], bool] | None = None
    ) -> int:
        """Read the whole file into ``buf`` (page-aligned, at least the file size rounded up to 4 KiB).

        Returns the file size. Raises MoeinfError if the file is missing or larger than ``buf``, and
        ``LoadAborted`` when ``stop`` (asked between pieces of a direct read) turned true first.
        """
        if self.direct:
            try:
                return self._read(path, buf, direct=True, size=size, stop=stop)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # this file system does not do O_DIRECT (tmpfs, some FUSE)
        return self._read(path, buf, direct=False, size=size)

    def _read(
        self, path: Path | str, buf: memoryview, direct: bool, size: int | None,
        stop: Callable[[], bool] | None = None,
    ) -> int:
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
            got = None
            if direct and stop is not None and want > self.piece_bytes:
                got = self._read_pieces(fd, buf, size, want, self.piece_bytes, self.pieces, stop)
            elif direct and self.pieces > 1 and want >= 2 * self.piece_bytes:
                n = min(self.pieces, want // self.piece_bytes)
                got = self._read_pieces(fd, buf, size, want, round_up(-(-want // n)), n)
            if got is not None:
                self.bytes_read += got
                return size
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

    def _read_pieces(
        self, fd: int, buf: memoryview, size: int, want: int, piece: int, window: int,
        stop: Callable[[], bool] | None = None,
    ) -> int | None:
        """The direct read of ``want`` bytes as aligned pieces of ``piece`` bytes, ``window`` of them in
        flight (the calling thread waits, the pool reads). Returns the bytes read, or None when a piece
        came back short of the file (the caller then reads it again the plain way). ``stop`` is asked
        before each further piece: once true, the pieces in flight finish and ``LoadAborted`` is raised."""
        ranges = [(a, min(a + piece, want)) for a in range(0, want, piece)]

        def one(a: int, b: int) -> int:
            got = a
            while got < b and got < size:
                k = os.preadv(fd, [buf[got:b]], got)
                if k <= 0:
                    break
                got += k
            return got - a

        pool = self._executor()
        inflight: list[tuple[int, Future]] = []
        done = 0
        short = False
        error: BaseException | None = None
        stopped = False
        nxt = 0
        while nxt < len(ranges) or inflight:
            while nxt < len(ranges) and len(inflight) < window and error is None and not stopped:
                if stop is not None and nxt > 0 and stop():
                    stopped = True
                    break
                a, b = ranges[nxt]
                inflight.append((nxt, pool.submit(one, a, b)))
                nxt += 1
            if not inflight:
                break
            i, f = inflight.pop(0)
            try:
                c = f.result()
            except BaseException as e:  # noqa: BLE001 - raised once the pieces in flight finished
                error = error or e
                continue
            done += c
            a, b = ranges[i]
            short = short or c < max(0, min(b, size) - a)
        if error is not None:
            raise error
        if stopped:
            self.bytes_read += done
            raise LoadAborted(done)
        return None if short else done

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

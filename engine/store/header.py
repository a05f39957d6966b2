"""The one safetensors header reader: every tensor of a file as a ``TensorInfo`` record.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header, then the
tensor data; each header entry gives ``dtype`` (a code such as ``"BF16"``), ``shape`` and
``data_offsets`` relative to the start of the data. The store pads the header with spaces so the data
of expert shards starts on an ``ALIGN`` (4 KiB) boundary: a whole-file O_DIRECT read then lands every
tensor where a view can use it without a copy.

A tensor's *format* is its plain dtype (``"bf16"``, ``"f32"``, ...) unless the file's
``__metadata__`` lists it as block-quantised (``engine.formats.storage``: the blocks stored as ``U8``
bytes, the format and the logical shape in the metadata); ``shape`` is then the logical shape and
``stored_shape`` the one in the header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.formats import storage
from engine.store.dtypes import format_of_code, from_code

ALIGN = 4096  # data of expert shards (and dense parts) starts on a multiple of this
MAX_HEADER = 100_000_000  # a longer JSON header is damage, not a model
STORE_HINT = "remove the model and pull it again"


class HeaderError(MoeinfError, ValueError):
    """A file is not a readable safetensors file (its message names the file and the damage)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: what it is and where its bytes are.

    ``start``/``end`` are absolute byte offsets in ``file``; ``dtype`` is the safetensors code of the
    stored data, ``format`` the tensor format (``"bf16"``, or e.g. ``"q4_k"`` for a quantised tensor
    stored as bytes); ``shape`` is the logical shape (``stored_shape`` the one in the header)."""

    name: str
    dtype: str
    format: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: Path | None = None
    stored_shape: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def quantised(self) -> bool:
        """Stored in a block format the file's metadata names (not as its plain dtype)."""
        return self.format != format_of_code(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored data (HeaderError for a code torch has no dtype for)."""
        try:
            return from_code(self.dtype)
        except KeyError:
            raise HeaderError(
                f"{self.file}: tensor {self.name} has dtype {self.dtype}, which torch cannot hold"
            ) from None


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: ``data_start`` (absolute), ``tensors`` by name, ``metadata``."""

    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_end(self) -> int:
        return max((t.end for t in self.tensors.values()), default=self.data_start)

    def in_data_order(self) -> list[TensorInfo]:
        """The tensors in the order their bytes follow each other."""
        return sorted(self.tensors.values(), key=lambda t: t.start)


def _error(path, detail: str, hint: str | None) -> HeaderError:
    return HeaderError(f"{path} is not a valid safetensors file ({detail})" + (f"; {hint}" if hint else ""))


def parse_header(
    buf: bytes | memoryview, path: Path | str = "<buffer>", hint: str | None = STORE_HINT
) -> SafetensorsHeader:
    """Parse the header at the start of ``buf`` (which holds at least the header bytes).

    HeaderError (a MoeinfError and a ValueError) names ``path``, the damage and ``hint``."""
    try:
        (n,) = struct.unpack_from("<Q", buf, 0)
    except struct.error:
        raise _error(path, "too short", hint) from None
    if n < 2 or n > MAX_HEADER or 8 + n > len(buf):
        raise _error(path, f"header length {n} out of range", hint)
    try:
        meta = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise _error(path, f"header is not JSON: {e}", hint) from None
    if not isinstance(meta, dict):
        raise _error(path, "header is not a JSON object", hint)
    data_start = 8 + n
    file = None if path == "<buffer>" else Path(path)
    metadata = meta.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _error(path, "__metadata__ is not an object", hint)
    tensors: dict[str, TensorInfo] = {}
    try:
        listed = storage.read_formats(metadata)
        for name, info in meta.items():
            begin, end = (int(x) for x in info["data_offsets"])
            code = str(info["dtype"])
            stored = tuple(int(d) for d in info["shape"])
            if not 0 <= begin <= end:
                raise ValueError(f"tensor {name} has data offsets {begin}..{end}")
            fmt, shape = listed.get(name, (format_of_code(code), stored))
            tensors[name] = TensorInfo(
                name, code, fmt, shape, data_start + begin, data_start + end, file, stored
            )
    except (KeyError, TypeError, ValueError) as e:
        raise _error(path, f"bad tensor entry: {e}", hint) from None
    return SafetensorsHeader(data_start, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_header(path: Path | str, hint: str | None = STORE_HINT) -> SafetensorsHeader:
    """Read and parse the header of the safetensors file at ``path`` (buffered I/O).

    A missing file is a HeaderError too ("missing"), so a damaged store is one clean error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _error(path, "file too short", hint)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _error(path, f"header length {n} out of range", hint)
            rest = f.read(n)
    except FileNotFoundError:
        raise HeaderError(f"{path} is missing" + (f"; {hint}" if hint else "")) from None
    except OSError as e:
        raise _error(path, f"cannot be read: {e.strerror or e}", hint) from None
    if len(rest) < n:
        raise _error(path, "header truncated", hint)
    return parse_header(head + rest, path, hint)

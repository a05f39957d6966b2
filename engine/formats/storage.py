"""How a quantised tensor sits in a safetensors file (safetensors has no block-quantised dtypes).

The tensor's raw blocks are stored as a ``U8`` tensor of its stored shape
``[..., K // block * block_bytes]`` (the logical shape with the last dimension in bytes), under its own
name; the file's ``__metadata__`` key ``moeinf.formats`` holds a JSON object naming, for every
quantised tensor of the file, its format and logical shape:

    "__metadata__": {"moeinf.formats": "{\"gate_proj.weight\": {\"format\": \"q4_k\", \"shape\": [1536, 576]}}"}

Float tensors are stored as ordinary safetensors tensors and are not listed. Any safetensors reader
opens such a file; ``read_formats`` + ``as_stored`` give back ``QuantTensor`` objects. The store's
manifest lists the same per-tensor formats (``engine/store``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from engine import formats
from engine.formats.tensor import QuantTensor

METADATA_KEY = "moeinf.formats"


def metadata(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """``__metadata__`` for a file whose quantised tensors are ``{name: (format, logical shape)}``."""
    if not entries:
        return {}
    body = {name: {"format": fmt, "shape": list(shape)} for name, (fmt, shape) in entries.items()}
    return {METADATA_KEY: json.dumps(body, separators=(",", ":"), sort_keys=True)}


def read_formats(meta: Mapping[str, str] | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (format, logical shape)}`` from a file's ``__metadata__`` (empty when none)."""
    text = (meta or {}).get(METADATA_KEY)
    if not text:
        return {}
    try:
        body = json.loads(text)
        out = {name: (str(e["format"]), tuple(int(d) for d in e["shape"])) for name, e in body.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable {METADATA_KEY} metadata ({err})") from None
    for fmt, shape in out.values():
        formats.get(fmt).check_shape(shape)
    return out


def as_stored(
    name: str, raw: torch.Tensor, entries: Mapping[str, tuple[str, tuple[int, ...]]]
) -> torch.Tensor | QuantTensor:
    """The tensor ``name`` as loaded: a ``QuantTensor`` when the file lists it, else ``raw`` itself."""
    entry = entries.get(name)
    if entry is None:
        return raw
    fmt = formats.get(entry[0])
    if raw.dtype != torch.uint8 or tuple(raw.shape) != fmt.stored_shape(entry[1]):
        raise ValueError(
            f"{name}: stored {raw.dtype} {tuple(raw.shape)} does not hold {entry[0]} {list(entry[1])}"
        )
    return QuantTensor(raw, fmt, entry[1])


def stored_form(
    tensor: torch.Tensor | QuantTensor,
) -> tuple[torch.Tensor, tuple[str, tuple[int, ...]] | None]:
    """What to write for ``tensor``: (the bytes' tensor, its (format, logical shape) entry or None)."""
    if isinstance(tensor, QuantTensor):
        return tensor.raw, (tensor.format.name, tensor.shape)
    return tensor, None

"""``QuantTensor``: a block-quantised tensor in memory, its raw bytes kept as stored."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.formats.base import Format


@dataclass(frozen=True)
class QuantTensor:
    """``raw`` uint8 [..., K // block * block_bytes] holding a tensor of logical ``shape`` [..., K]."""

    raw: torch.Tensor
    format: Format
    shape: tuple[int, ...]

    @classmethod
    def quantise(cls, x: torch.Tensor, fmt: Format) -> QuantTensor:
        """``x`` packed into ``fmt`` (the quantiser runs on ``x``'s device)."""
        return cls(fmt.pack(x), fmt, tuple(x.shape))

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.unpack(self.raw, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ self.T + bias`` on the stored blocks (``engine.formats.linear``)."""
        from engine.formats.linear import linear

        return linear(x, self, bias)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantTensor:
        return QuantTensor(self.raw.to(device, non_blocking=non_blocking), self.format, self.shape)

    def __getitem__(self, index: int | slice) -> QuantTensor:
        """Indexing along the first dimension only (whole rows of blocks): one expert of a [E, N, K]
        tensor, or a range / stride of rows (``t[:n]``, ``t[1::2]``)."""
        if isinstance(index, tuple):
            raise TypeError("a QuantTensor is indexed along its first dimension only")
        raw = self.raw[index]
        if isinstance(index, slice):
            return QuantTensor(raw.contiguous(), self.format, (raw.shape[0], *self.shape[1:]))
        return QuantTensor(raw, self.format, self.shape[1:])

    def clone(self) -> QuantTensor:
        return QuantTensor(self.raw.clone(), self.format, self.shape)

"""What every layer of one forward step shares: positions, rotary rows and attention masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    """One forward call over positions ``start_pos .. start_pos+seqlen-1`` (batch size one).

    ``cos``/``sin`` are the model's rotary rows for these positions ([seqlen, rope_dim]) or None when
    the model has no shared rotary embedding. ``mask(window)`` gives the boolean attention mask
    [seqlen, start_pos+seqlen] (True = attend) or None when plain causal attention over the whole
    cache needs none; masks are built once per step and shared by the layers.
    """

    start_pos: int
    seqlen: int
    device: torch.device
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.seqlen

    def is_plain_causal_prefill(self, window: int | None = None) -> bool:
        """True when ``is_causal=True`` over the new keys alone is exact (fresh prefill, no window cut)."""
        return self.start_pos == 0 and self.seqlen > 1 and (window is None or window >= self.seqlen)

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """Boolean [seqlen, end_pos] mask: key j is visible to the query at position p when
        ``j <= p`` and (with a sliding window) ``p - j < window``. None when every key in the
        cache up to ``end_pos`` is visible (one new token, no window cut)."""
        if window is not None and window <= 0:
            window = None
        if window is not None and window >= self.end_pos:
            window = None
        if window in self._masks:
            return self._masks[window]
        m: torch.Tensor | None
        if self.seqlen == 1 and window is None:
            m = None
        else:
            q = torch.arange(self.start_pos, self.end_pos, device=self.device)[:, None]
            k = torch.arange(self.end_pos, device=self.device)[None, :]
            m = k <= q
            if window is not None:
                m = m & (q - k < window)
        self._masks[window] = m
        return m

"""What every layer of one forward step shares: positions, rotary rows and attention masks.

``StepContext`` is one sequence's run of positions; ``BatchContext`` is a batch of them (several
sequences, each its own KV-cache slot, start position and length, prefill and decode mixed) whose
tokens are laid end to end in one ``[N, hidden]`` tensor. Attention modules project every row at
once and then attend sequence by sequence: ``ctx.segments()`` gives ``(row_start, row_end,
StepContext)`` for each sequence (one segment covering every row for a ``StepContext``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    """One sequence's positions ``start_pos .. start_pos+seqlen-1`` in KV-cache slot ``slot``.

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
    slot: int = 0
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.seqlen

    def segments(self) -> list[tuple[int, int, StepContext]]:
        """This step as the one segment of a batch: ``[(0, seqlen, self)]``."""
        return [(0, self.seqlen, self)]

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


@dataclass
class BatchContext:
    """Several sequences in one forward: ``steps[i]`` covers rows ``bounds[i]..bounds[i+1]-1``.

    ``cos``/``sin`` are every row's rotary rows ([N, rope_dim], the steps' rows end to end), so
    position-wise work (rotary, projections) runs on all rows at once.
    """

    steps: list[StepContext]
    device: torch.device
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def bounds(self) -> list[int]:
        out = [0]
        for s in self.steps:
            out.append(out[-1] + s.seqlen)
        return out

    @property
    def seqlen(self) -> int:
        return sum(s.seqlen for s in self.steps)

    def segments(self) -> list[tuple[int, int, StepContext]]:
        b = self.bounds
        return [(b[i], b[i + 1], s) for i, s in enumerate(self.steps)]

    def last_rows(self) -> list[int]:
        """Row index of each sequence's last token (whose logits pick its next token)."""
        return [end - 1 for _, end, _ in self.segments()]

"""A small fake CausalLM for runtime tests: real KV-cache semantics, random but fixed weights.

Each position's logits depend on every token before it (a running mean over the cached states), and
unwritten cache slots hold NaN, so reading a stale or missing position poisons the logits.
"""

from __future__ import annotations

import torch


class FakeLM:
    def __init__(self, vocab_size: int, max_seq_len: int, dim: int = 16, seed: int = 0, banned=(),
                 interrupt_on_call: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.emb = torch.randn(vocab_size, dim, generator=g)
        self.out = torch.randn(dim, vocab_size, generator=g) * 3
        self.cache = torch.full((max_seq_len, dim), float("nan"))
        self.banned = list(banned)
        self.calls: list[tuple[list[int], int]] = []
        self.interrupt_on_call = interrupt_on_call

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        T = tokens.shape[0]
        assert 0 <= start_pos and start_pos + T <= self.max_seq_len
        self.calls.append((tokens.tolist(), start_pos))
        h = self.emb[tokens]
        self.cache[start_pos : start_pos + T] = h
        if self.interrupt_on_call is not None and len(self.calls) == self.interrupt_on_call:
            self.cache[start_pos : start_pos + T] = 123.0  # a half-done write, then Ctrl+C
            raise KeyboardInterrupt
        prefix = self.cache[: start_pos + T]
        mean = torch.cumsum(prefix, 0)[start_pos:] / torch.arange(start_pos + 1, start_pos + T + 1)[:, None]
        logits = torch.tanh(mean + h) @ self.out
        if self.banned:
            logits[:, self.banned] = -1e4
        return logits[-1:] if last_only else logits

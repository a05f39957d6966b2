"""Choosing the next token: Ollama's options and defaults, llama.cpp's repetition penalty.

Order for one step (as Ollama's sampler): ``logit_bias`` added (OpenAI's: token id -> bias); repetition
penalty over the last ``repeat_last_n`` tokens (prompt included, as llama.cpp); OpenAI's
``frequency_penalty``/``presence_penalty`` over the tokens this generation produced (logit minus
count x frequency minus presence once a token appeared); then ``temperature == 0`` picks the argmax
(greedy); otherwise top-k
-> temperature -> softmax -> top-p -> min-p -> a draw from a ``torch.Generator`` seeded with ``seed``
(a random seed when None). Disabled values: ``top_k <= 0``, ``top_p >= 1``, ``min_p <= 0``,
``repeat_penalty == 1`` or ``repeat_last_n == 0``; ``repeat_last_n == -1`` means the whole context.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from engine.errors import MoeinfError

NUCLEUS_PROBE = 1024  # tokens ranked first when top-p runs without top-k (a full sort only if they fall short)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options, named and defaulted as Ollama's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    num_predict: int = -1  # -1: until EOS, a stop string or a full context
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a mapping is accepted

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplingParams:
        """Build from keyword options (None values mean "default"); unknown names raise MoeinfError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise MoeinfError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        if isinstance(given.get("logit_bias"), Mapping):
            given["logit_bias"] = tuple(given["logit_bias"].items())
        if "logit_bias" in given:
            try:
                given["logit_bias"] = tuple((int(t), float(b)) for t, b in given["logit_bias"])
            except (TypeError, ValueError):
                raise MoeinfError("logit_bias maps token ids to numbers, e.g. {\"42\": -100}") from None
        params = cls(**given)
        params.validate()
        return params

    def validate(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MoeinfError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise MoeinfError(f"top_p must be between 0 and 1, got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise MoeinfError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise MoeinfError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise MoeinfError(f"repeat_last_n must be -1 (whole context), 0 (off) or more, got {self.repeat_last_n}")
        if self.num_predict < -2:
            raise MoeinfError(f"num_predict must be -1 (no limit) or >= 0, got {self.num_predict}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise MoeinfError(f"{name} must be a finite number, got {getattr(self, name)}")
        if any(t < 0 or not math.isfinite(b) for t, b in self.logit_bias):
            raise MoeinfError("logit_bias needs token ids >= 0 and finite biases")


def apply_repeat_penalty(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """llama.cpp's penalty: each distinct recent token's logit is divided by ``penalty`` if positive,
    multiplied by it if negative. Returns a new tensor."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    ids = ids[ids < logits.shape[-1]]
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k: the ``k`` largest logits and their token ids, largest first (all of them, sorted, when
    ``k <= 0`` or ``k >= V``)."""
    if 0 < k < logits.shape[-1]:
        return torch.topk(logits, k)
    return torch.sort(logits, descending=True)


def nucleus_size(sorted_probs: torch.Tensor, p: float) -> int:
    """Top-p: how many of the (descending) probabilities to keep so that their mass first reaches
    ``p``; at least one, all when ``p >= 1``."""
    if p >= 1.0:
        return sorted_probs.shape[-1]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return max(1, int((mass_before < p).sum()))


def min_p_size(sorted_probs: torch.Tensor, min_p: float) -> int:
    """Min-p: how many of the (descending) probabilities are at least ``min_p`` times the top one."""
    if min_p <= 0.0:
        return sorted_probs.shape[-1]
    return max(1, int((sorted_probs >= min_p * sorted_probs[0]).sum()))


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """OpenAI's ``logit_bias``: each (token id, bias) added to that token's logit (ids past the
    vocabulary are ignored). Returns a new tensor."""
    if not bias:
        return logits
    out = logits.clone()
    for token, value in bias:
        if token < out.shape[-1]:
            out[token] += value
    return out


def apply_openai_penalties(logits: torch.Tensor, counts: Mapping[int, int], frequency: float,
                           presence: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence``, where
    ``counts`` are the tokens generated so far. Returns a new tensor."""
    if not counts or (frequency == 0.0 and presence == 0.0):
        return logits
    ids = torch.tensor([t for t in counts if t < logits.shape[-1]], dtype=torch.long, device=logits.device)
    n = torch.tensor([counts[int(t)] for t in ids], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[ids] -= n * frequency + presence
    return out


class Sampler:
    """Stateful sampler for one generation: holds the seeded generator and counts the tokens it picked."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None and params.seed >= 0 else random.randrange(2**63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.counts: dict[int, int] = {}  # token id -> times this sampler picked it

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """The next token id given ``logits`` [V] and the ids so far (prompt and generated)."""
        token = self._pick(logits, history)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _pick(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        p = self.params
        logits = logits.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        logits = apply_logit_bias(logits, p.logit_bias)
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
        logits = apply_openai_penalties(logits, self.counts, p.frequency_penalty, p.presence_penalty)
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        if p.top_k <= 0 and p.top_p >= 1.0:  # no ranking needed: draw from the whole vocabulary
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.min_p > 0.0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            return int(torch.multinomial(probs, 1, generator=self.generator))
        if p.top_k <= 0:  # top-p over the whole vocabulary: rank only as many tokens as the nucleus needs
            full = torch.softmax(logits / p.temperature, dim=-1)
            probs, ids = torch.topk(full, min(NUCLEUS_PROBE, full.shape[-1]))
            if float(probs.sum()) < p.top_p:
                probs, ids = torch.sort(full, descending=True)
        else:
            values, ids = candidates(logits, p.top_k)
            probs = torch.softmax(values / p.temperature, dim=-1)
        n = min(nucleus_size(probs, p.top_p), min_p_size(probs, p.min_p))
        choice = torch.multinomial(probs[:n], 1, generator=self.generator)
        return int(ids[choice])

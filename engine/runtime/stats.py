"""Timing and counts of one generation, and Ollama's ``--verbose`` summary of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String()`` prints it (``1.234567s``, ``12.5ms``, ``2m3.5s``)."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)

    def frac(value: int, prec: int) -> tuple[str, int]:
        digits = ""
        printed = False
        for _ in range(prec):
            d = value % 10
            printed = printed or d != 0
            if printed:
                digits = str(d) + digits
            value //= 10
        return ("." + digits if printed else ""), value

    if ns < 1_000_000_000:
        if ns < 1_000:
            return f"{sign}{ns}ns"
        unit, prec = ("µs", 3) if ns < 1_000_000 else ("ms", 6)
        tail, whole = frac(ns, prec)
        return f"{sign}{whole}{tail}{unit}"
    tail, secs = frac(ns, 9)
    out = f"{secs % 60}{tail}s"
    minutes = secs // 60
    if minutes:
        out = f"{minutes % 60}m" + out
        hours = minutes // 60
        if hours:
            out = f"{hours}h" + out
    return sign + out


@dataclass
class GenerationStats:
    """What ``Session.generate`` yields last.

    ``prompt_tokens``: tokens of the rendered prompt; ``prompt_eval_count``: those actually run (the
    rest was reused from the KV cache); ``generated_tokens``: tokens sampled (EOS not counted);
    durations in seconds; ``load_s`` is the session's load time on its first generation, 0 after;
    ``done_reason``: "stop" (EOS or stop string) or "length" (num_predict or context full); a generation
    closed early yields no stats; ``cache``: the expert source's stats object (``summary_line()``, ``as_dict()``)
    when it has one.
    """

    prompt_tokens: int = 0
    prompt_eval_count: int = 0
    prompt_eval_s: float = 0.0
    generated_tokens: int = 0
    eval_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0
    done_reason: str = "stop"
    cache: Any = field(default=None, repr=False)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_eval_count

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "prompt_tokens", "prompt_eval_count", "prompt_eval_s", "generated_tokens", "eval_s",
            "load_s", "total_s", "done_reason")}
        if self.cache is not None and hasattr(self.cache, "as_dict"):
            out["cache"] = self.cache.as_dict()
        return out

    def summary_lines(self) -> list[str]:
        """Ollama's ``--verbose`` lines (same labels, spacing and number formats), then one line of
        expert-cache stats when the expert source reports them. Zero durations are left out, as Ollama does."""
        lines = []
        if self.total_s > 0:
            lines.append(f"total duration:       {go_duration(self.total_s)}")
        if self.load_s > 0:
            lines.append(f"load duration:        {go_duration(self.load_s)}")
        if self.prompt_eval_count > 0:
            lines.append(f"prompt eval count:    {self.prompt_eval_count} token(s)")
        if self.prompt_eval_s > 0:
            lines.append(f"prompt eval duration: {go_duration(self.prompt_eval_s)}")
            lines.append(f"prompt eval rate:     {self.prompt_eval_count / self.prompt_eval_s:.2f} tokens/s")
        if self.generated_tokens > 0:
            lines.append(f"eval count:           {self.generated_tokens} token(s)")
        if self.eval_s > 0:
            lines.append(f"eval duration:        {go_duration(self.eval_s)}")
            lines.append(f"eval rate:            {self.generated_tokens / self.eval_s:.2f} tokens/s")
        if self.cache is not None and hasattr(self.cache, "summary_line"):
            line = str(self.cache.summary_line()).removeprefix("experts: ")
            lines.append(f"expert cache:         {line}")
        return lines

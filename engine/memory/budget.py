"""The expert budget: parse ``--expert-budget`` and fit ``auto`` to the free memory of the device.

A budget is a size (``12GiB``, ``500MB``, ``1.5G``, ``4096``), a share of all experts (``25%``), ``auto``
(the default: free memory after the dense weights, the KV cache and a safety margin) or ``None``/
``100%`` (everything resident). Sizes with ``i`` (KiB, MiB, GiB, TiB) and bare ``K/M/G/T`` are binary,
``KB/MB/GB/TB`` are decimal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.errors import MoeinfError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_SHARE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

# Memory kept free beyond dense weights and KV cache when the budget is "auto".
AUTO_MARGIN_MIN = 1 << 30
AUTO_MARGIN_SHARE = 0.10


def fmt_bytes(n: float) -> str:
    """``1536 MiB`` style, binary units, one decimal where it matters."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    else:  # pragma: no cover - loop always breaks
        unit = "GiB"
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: exactly one of ``size``/``share`` set, or ``auto``, or ``all`` (everything resident)."""

    kind: str  # "size" | "share" | "auto" | "all"
    size: int = 0
    share: float = 0.0
    text: str = ""


def parse_budget(text: str | None) -> BudgetSpec:
    """Parse a budget string; a bad one is a MoeinfError naming the accepted forms."""
    if text is None:
        return BudgetSpec("all", text="100%")
    raw = str(text).strip()
    low = raw.lower()
    if low in ("auto", ""):
        return BudgetSpec("auto", text="auto")
    if low in ("all", "100%", "max", "inf"):
        return BudgetSpec("all", text="100%")
    m = _SHARE_RE.match(low)
    if m:
        share = float(m.group(1)) / 100.0
        if not 0.0 < share <= 1.0:
            raise MoeinfError(f"expert budget '{raw}' must be a share between 0% and 100% (e.g. 25%)")
        if share >= 1.0:
            return BudgetSpec("all", text="100%")
        return BudgetSpec("share", share=share, text=raw)
    m = _SIZE_RE.match(low)
    if m and m.group(2) in _UNITS:
        size = int(float(m.group(1)) * _UNITS[m.group(2)])
        if size <= 0:
            raise MoeinfError(f"expert budget '{raw}' must be larger than zero (e.g. 12GiB or 25%)")
        return BudgetSpec("size", size=size, text=raw)
    raise MoeinfError(
        f"invalid expert budget '{raw}': use a size like 12GiB or 500MB, a share like 25%, or auto"
    )


def mem_available(device: torch.device) -> int:
    """Free memory of ``device`` now: MemAvailable of /proc/meminfo on the CPU, mem_get_info on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_context(ctx: int, need: int, device: torch.device, available: int | None = None) -> None:
    """MoeinfError naming the context when ``need`` bytes (its KV cache and rotary tables) exceed the free
    memory of ``device``, before anything is allocated."""
    free = mem_available(device) if available is None else int(available)
    if need <= free:
        return
    where = "GPU memory" if device.type == "cuda" else "RAM"
    most = max(16, int(ctx * (free / 2) / max(need, 1)) // 256 * 256)
    raise MoeinfError(
        f"--ctx {ctx} needs {fmt_bytes(need)} for its KV cache and rotary tables, more than the "
        f"{fmt_bytes(free)} of free {where}; use a smaller context, e.g. --ctx {most}"
    )


@dataclass(frozen=True)
class ResolvedBudget:
    """The budget in bytes (``None`` = everything resident) and a line saying how it was chosen."""

    bytes: int | None
    note: str


def resolve_budget(
    spec: BudgetSpec,
    total_expert_bytes: int,
    device: torch.device,
    dense_bytes: int = 0,
    kv_bytes: int = 0,
    available: int | None = None,
) -> ResolvedBudget:
    """Turn a parsed budget into bytes. ``total_expert_bytes`` is all experts in the compute dtype."""
    if spec.kind == "all":
        return ResolvedBudget(None, f"all experts resident ({fmt_bytes(total_expert_bytes)})")
    if spec.kind == "size":
        if spec.size >= total_expert_bytes:
            return ResolvedBudget(
                None, f"{spec.text} holds all experts ({fmt_bytes(total_expert_bytes)}): all resident"
            )
        return ResolvedBudget(spec.size, f"{fmt_bytes(spec.size)} ({spec.text})")
    if spec.kind == "share":
        size = int(total_expert_bytes * spec.share)
        return ResolvedBudget(size, f"{fmt_bytes(size)} ({spec.text} of {fmt_bytes(total_expert_bytes)})")
    free = mem_available(device) if available is None else int(available)
    margin = max(AUTO_MARGIN_MIN, int(AUTO_MARGIN_SHARE * free))
    size = free - dense_bytes - kv_bytes - margin
    where = "GPU" if device.type == "cuda" else "RAM"
    how = (
        f"{fmt_bytes(free)} free {where} - dense {fmt_bytes(dense_bytes)} - KV cache {fmt_bytes(kv_bytes)}"
        f" - margin {fmt_bytes(margin)}"
    )
    if size >= total_expert_bytes:
        return ResolvedBudget(None, f"auto: all experts resident ({fmt_bytes(total_expert_bytes)}; {how})")
    return ResolvedBudget(max(size, 0), f"auto: {fmt_bytes(max(size, 0))} ({how})")

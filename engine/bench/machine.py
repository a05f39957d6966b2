"""The machine profile of ``moeinf predict``: measured once (a few seconds) and cached under ``$MOEINF_HOME``.

* **disk**: O_DIRECT reads (buffered where the file system refuses it) of a scratch file in
  ``$MOEINF_HOME``, two reads in flight as the loader does, at request sizes 64 KiB .. 16 MiB: bytes/s
  per size, the latency of the smallest request, and the spread over passes (it widens the band).
* **memory**: bytes/s of a large copy (read + write) on the CPU.
* **compute**: per device and tensor format, through the engine's own product (``cuda_ext.cpu.linear``
  on the CPU) (bf16, f32 and the quantised formats of ``engine.formats``),
  a decode-shaped product (one token through a 1024 x 1024 weight: weight bytes/s, what bounds decode)
  and a prefill-shaped one (128 tokens: flop/s).
* **cuda** (when present): host-to-device copy bytes/s from pinned memory, its memory and compute.

The profile is keyed by host name, CPU count and torch version; ``--reprobe`` measures again.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.store.paths import moeinf_home

PROFILE_FILE = "machine-profile.json"
VERSION = 2
READ_SIZES = (64 << 10, 1 << 20, 4 << 20, 16 << 20)
SCRATCH_BYTES = 64 << 20
PASSES = 3
PROBE_FORMATS = ("bf16", "f32", "q8_0", "q4_k", "q4_0")
_N = 1024  # the probe's weight is _N x _N
_PREFILL_TOKENS = 128


@dataclass
class DeviceRates:
    """What one device computes: weight bytes/s at decode per format, flop/s at prefill per format."""

    mem_bps: float
    decode_bps: dict[str, float] = field(default_factory=dict)
    prefill_flops: dict[str, float] = field(default_factory=dict)
    total_bytes: int = 0
    h2d_bps: float = 0.0  # CUDA: pinned host-to-device copies


@dataclass
class MachineProfile:
    key: str
    io: str
    read_bps: dict[str, float]  # request size (bytes, as a string) -> bytes/s
    read_spread: float  # relative spread of the largest request's bandwidth over the passes
    read_latency_s: float  # time of the smallest request
    ram_bytes: int
    devices: dict[str, DeviceRates]
    measured_s: float = 0.0

    def disk_bps(self, request_bytes: int) -> float:
        """Bytes/s for requests of ``request_bytes`` (the nearest measured size at or below, else the smallest)."""
        sizes = sorted(int(s) for s in self.read_bps)
        below = [s for s in sizes if s <= request_bytes] or sizes[:1]
        return self.read_bps[str(below[-1])]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MachineProfile:
        devs = {k: DeviceRates(**v) for k, v in d["devices"].items()}
        return cls(**{**d, "devices": devs})


def machine_key() -> str:
    return f"v{VERSION}:{platform.node()}:{os.cpu_count()}:{torch.__version__}"


def ram_bytes() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _scratch(path: Path) -> None:
    if path.is_file() and path.stat().st_size == SCRATCH_BYTES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    chunk = os.urandom(1 << 20)
    with open(tmp, "wb") as f:
        for _ in range(SCRATCH_BYTES >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_direct(path: Path) -> tuple[int, str]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | flag)
            buf = mmap.mmap(-1, 4096)
            os.preadv(fd, [buf], 0)
            buf.close()
            return fd, "O_DIRECT"
        except OSError:
            try:
                os.close(fd)
            except (OSError, UnboundLocalError):
                pass
    return os.open(path, os.O_RDONLY), "buffered"


def probe_reads(path: Path, budget_bytes: int = 32 << 20) -> tuple[dict[str, float], float, float, str]:
    """(bytes/s per request size, relative spread at the largest size, latency of the smallest, io mode)."""
    from concurrent.futures import ThreadPoolExecutor

    _scratch(path)
    fd, io = _open_direct(path)
    rates: dict[str, float] = {}
    spread = latency = 0.0
    try:
        for size in READ_SIZES:
            count = max(8, min(256, budget_bytes // PASSES // size))
            offsets = [(i * 7919 * size) % (SCRATCH_BYTES - size) // 4096 * 4096 for i in range(count)]
            bufs = [mmap.mmap(-1, size) for _ in range(2)]

            def share(w: int, offs: list[int], bufs: list[mmap.mmap] = bufs) -> None:
                for off in offs[w::2]:
                    os.preadv(fd, [bufs[w]], off)

            passes = []
            for p in range(PASSES):
                offs = offsets[p::PASSES] or offsets
                t0 = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(share, (0, 1), (offs, offs)))
                passes.append(len(offs) * size / (time.perf_counter() - t0))
            for b in bufs:
                b.close()
            rates[str(size)] = statistics.median(passes)
            if size == READ_SIZES[0]:
                latency = size / rates[str(size)] * 2  # two in flight
            if size == READ_SIZES[-1]:
                spread = (max(passes) - min(passes)) / (2 * rates[str(size)])
    finally:
        os.close(fd)
    return rates, spread, latency, io


def _timed(fn, repeat: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def probe_device(device: torch.device) -> DeviceRates:
    from engine.formats import FORMATS
    from engine.formats.tensor import QuantTensor

    if device.type == "cpu":
        from cuda_ext.cpu import linear  # the engine's CPU path: the native bf16 kernel for one row
    else:
        from engine.formats.linear import linear

    sync = _sync(device)
    n = (64 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)

    def copy() -> None:
        b.copy_(a)
        sync()

    rates = DeviceRates(mem_bps=2 * a.nbytes / _timed(copy))
    g = torch.Generator(device="cpu").manual_seed(0)
    w32 = torch.randn(_N, _N, generator=g) * 0.02
    for name in PROBE_FORMATS:
        fmt = FORMATS.get(name)
        if fmt is None:
            continue
        if fmt.quantised:
            weight = QuantTensor.quantise(w32, fmt)
            weight = QuantTensor(raw=weight.raw.to(device), format=fmt, shape=weight.shape)
            act = torch.bfloat16 if device.type == "cuda" else torch.float32
            nbytes = weight.nbytes
            run = lambda x, w=weight: w.linear(x)  # noqa: E731
        else:
            weight = w32.to(device=device, dtype=fmt.torch_dtype)
            act = fmt.torch_dtype
            nbytes = weight.numel() * weight.element_size()
            run = lambda x, w=weight: linear(x, w)  # noqa: E731
        for tokens in (1, _PREFILL_TOKENS):
            x = torch.randn(tokens, _N, generator=g).to(device=device, dtype=act)
            s = _timed(lambda x=x, run=run: (run(x), sync()))
            if tokens == 1:
                rates.decode_bps[name] = nbytes / s
            else:
                rates.prefill_flops[name] = 2 * tokens * _N * _N / s
    if device.type == "cuda":
        host = torch.empty(32 << 20, dtype=torch.uint8).pin_memory()
        dev = torch.empty_like(host, device=device)
        rates.h2d_bps = host.nbytes / _timed(lambda: (dev.copy_(host, non_blocking=True), sync()))
        rates.total_bytes = int(torch.cuda.get_device_properties(device).total_memory)
    else:
        rates.total_bytes = ram_bytes()
    return rates


def measure(home: Path | None = None) -> MachineProfile:
    home = home or moeinf_home()
    t0 = time.perf_counter()
    scratch = home / "probe" / "scratch.bin"
    rates, spread, latency, io = probe_reads(scratch)
    devices = {"cpu": probe_device(torch.device("cpu"))}
    if torch.cuda.is_available():
        devices["cuda"] = probe_device(torch.device("cuda"))
    scratch.unlink(missing_ok=True)
    return MachineProfile(
        key=machine_key(),
        io=io,
        read_bps=rates,
        read_spread=spread,
        read_latency_s=latency,
        ram_bytes=ram_bytes(),
        devices=devices,
        measured_s=time.perf_counter() - t0,
    )


def machine_profile(reprobe: bool = False, home: Path | None = None) -> tuple[MachineProfile, bool]:
    """(the profile, whether it was measured now): the cached one unless absent, stale or ``reprobe``."""
    home = home or moeinf_home()
    path = home / PROFILE_FILE
    if not reprobe and path.is_file():
        try:
            prof = MachineProfile.from_dict(json.loads(path.read_text()))
            if prof.key == machine_key():
                return prof, False
        except (OSError, ValueError, TypeError, KeyError):
            pass
    prof = measure(home)
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(prof.as_dict(), indent=1))
    os.replace(tmp, path)
    return prof, True

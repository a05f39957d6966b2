"""The machine profile of ``moeinf predict``: measured once (about a minute) and cached under ``$MOEINF_HOME``.

* **disk**: O_DIRECT reads (buffered where the file system refuses it) of a scratch file in
  ``$MOEINF_HOME`` at request sizes 64 KiB .. 16 MiB, two reads in flight as the loader's two workers do
  and one alone: bytes/s per size, the latency of the smallest request, and the spread over passes.
* **memory**: bytes/s of a large copy (read + write) on the CPU.
* **the engine's compute on the CPU** (``engine.bench.kernels``): its MoE block over experts of each
  format at 1..128 tokens per expert, its dense product at 1..256 rows, and the per-layer overhead of a
  forward of a tiny model of each family (resident and behind the budgeted cache), with the spread of
  those timings over their passes (it widens the forecast's band).
* **cuda** (when present): host-to-device copy bytes/s from pinned memory, its memory and compute rates.

The profile is keyed by host name, CPU count, torch version and a fingerprint of the engine's compute
code (``code_key``: the native kernels, the layers, the formats, the expert cache), so a change to any
of them measures again on the next use; ``--reprobe`` measures again at once.
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
VERSION = 3
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
    read_bps_single: dict[str, float] = field(default_factory=dict)  # one read in flight
    kernels: dict = field(default_factory=dict)  # "<format>/<act>" -> {"experts": {...}, "dense": Rates}
    overhead: dict = field(default_factory=dict)  # family -> {"resident": [a, b, c], "offload": [a, b, c]}
    compute_spread: float = 0.0  # relative spread of the compute probes over their passes
    compute_typical: float = 1.0  # the compute probes' median pass over their fastest (the machine's other work)
    memory: dict = field(default_factory=dict)  # {"llc_bytes", "dram_bps"} (engine.bench.kernels.probe_memory)
    loads: dict = field(default_factory=dict)  # the engine's own loads (engine.bench.kernels.probe_loads)
    # replica fits of store models (engine.bench.replica), by engine.bench.predict.replica_key
    replicas: dict = field(default_factory=dict)

    def disk_bps(self, request_bytes: int) -> float:
        """Bytes/s for requests of ``request_bytes``, two in flight (``read_bps`` between its sizes)."""
        return _between(self.read_bps, request_bytes)

    def disk_single_bps(self, request_bytes: int) -> float:
        """Bytes/s of one read alone (the two-in-flight figure halved where it was not measured)."""
        return _between(self.read_bps_single or {k: v / 2 for k, v in self.read_bps.items()}, request_bytes)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MachineProfile:
        from engine.bench.kernels import Rates

        devs = {k: DeviceRates(**v) for k, v in d["devices"].items()}
        kernels = {
            name: {
                "experts": {p: Rates(**r) for p, r in k["experts"].items()},
                "dense": Rates(**k["dense"]),
            }
            for name, k in d.get("kernels", {}).items()
        }
        return cls(**{**d, "devices": devs, "kernels": kernels})


def _between(table: dict[str, float], request_bytes: int) -> float:
    """Bytes/s at ``request_bytes`` from bytes/s measured at a few request sizes: a request's time is taken
    as affine in its size between two measured sizes (a latency plus bytes over a bandwidth), so a 900 KiB
    request is neither as slow per byte as a 64 KiB one nor as fast as a 1 MiB one; beyond the largest
    size, the largest's bandwidth; below the smallest, the smallest's."""
    sizes = sorted(int(s) for s in table)
    size = max(1, int(request_bytes))
    if str(size) in table:
        return table[str(size)]
    if size <= sizes[0]:
        return table[str(sizes[0])]
    if size >= sizes[-1]:
        return table[str(sizes[-1])]
    hi = next(s for s in sizes if s >= size)
    lo = sizes[sizes.index(hi) - 1]
    t_lo, t_hi = lo / table[str(lo)], hi / table[str(hi)]
    t = t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)
    return size / t


_CODE = ("cuda_ext", "engine/model/layers", "engine/formats", "engine/memory", "engine/bench/kernels.py")


def code_key() -> str:
    """A digest of the engine's compute code (sources under ``_CODE``): the profile measures it."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for part in _CODE:
        p = root / part
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".c", ".h", ".cu", ".cpp"):
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def machine_key() -> str:
    return f"v{VERSION}:{platform.node()}:{os.cpu_count()}:{torch.__version__}:{code_key()}"


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


def probe_reads(
    path: Path, budget_bytes: int = 32 << 20, inflight: int = 2
) -> tuple[dict[str, float], float, float, str]:
    """(bytes/s per request size, relative spread at the largest size, latency of the smallest, io mode),
    ``inflight`` reads at a time."""
    from concurrent.futures import ThreadPoolExecutor

    _scratch(path)
    fd, io = _open_direct(path)
    rates: dict[str, float] = {}
    spread = latency = 0.0
    try:
        for size in READ_SIZES:
            count = max(8, min(256, budget_bytes // PASSES // size))
            offsets = [(i * 7919 * size) % (SCRATCH_BYTES - size) // 4096 * 4096 for i in range(count)]
            bufs = [mmap.mmap(-1, size) for _ in range(inflight)]

            def share(w: int, offs: list[int], bufs: list[mmap.mmap] = bufs) -> None:
                for off in offs[w::inflight]:
                    os.preadv(fd, [bufs[w]], off)

            passes = []
            for p in range(PASSES):
                offs = offsets[p::PASSES] or offsets
                t0 = time.perf_counter()
                with ThreadPoolExecutor(inflight) as pool:
                    list(pool.map(share, range(inflight), [offs] * inflight))
                passes.append(len(offs) * size / (time.perf_counter() - t0))
            for b in bufs:
                b.close()
            rates[str(size)] = statistics.median(passes)
            if size == READ_SIZES[0]:
                latency = size / rates[str(size)] * inflight
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
    single, spread1, _, _ = probe_reads(scratch, inflight=1)
    scratch.unlink(missing_ok=True)
    from engine.bench.kernels import (
        probe_kernels,
        probe_loads,
        probe_memory,
        probe_overhead,
        typical_slowdown,
    )

    kernels, compute_spread = probe_kernels()
    compute_typical = typical_slowdown()
    overhead = probe_overhead(kernels)
    memory = probe_memory()
    home.mkdir(parents=True, exist_ok=True)
    loads = probe_loads(home)
    devices = {"cpu": cpu_rates(kernels)}
    if torch.cuda.is_available():
        devices["cuda"] = probe_device(torch.device("cuda"))
    return MachineProfile(
        key=machine_key(),
        io=io,
        read_bps=rates,
        read_spread=max(spread, spread1),
        read_latency_s=latency,
        ram_bytes=ram_bytes(),
        devices=devices,
        measured_s=time.perf_counter() - t0,
        read_bps_single=single,
        kernels=kernels,
        overhead=overhead,
        compute_spread=compute_spread,
        compute_typical=compute_typical,
        memory=memory,
        loads=loads,
    )


def cpu_rates(kernels: dict) -> DeviceRates:
    """The CPU's summary rates from the kernel probes: weight bytes/s of a one-token expert product and
    flop/s of a 256-row dense product, per format; memory bytes/s of a large copy."""
    n = (64 << 20) // 4
    a = torch.empty(n, dtype=torch.float32)
    b = torch.empty_like(a)
    rates = DeviceRates(mem_bps=2 * a.nbytes / _timed(lambda: b.copy_(a)), total_bytes=ram_bytes())
    from engine.formats import FORMATS

    for name, k in kernels.items():
        fmt = name.split("/")[0]
        if fmt in rates.decode_bps:
            continue
        rates.decode_bps[fmt] = 1.0 / k["experts"]["decode"].per_byte[0]
        dense = k["dense"]
        bits = FORMATS[fmt].bits_per_weight
        rates.prefill_flops[fmt] = 2 * (8 / bits) / dense.per_byte[-1] * dense.tokens[-1] if dense.per_byte[-1] else 0.0
    return rates


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

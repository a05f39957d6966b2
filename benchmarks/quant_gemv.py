"""One-token GEMV on weights in their stored formats (cuda_ext's native kernels) against the memory
bound: for bf16 and every block format, a pass multiplies one activation row with matrices holding
``--mib`` MiB of stored weights (more than the caches), as a decode step reads its weights once.

Printed per format: the median pass time, the stored bytes read per second, and that as a share of
the read bandwidth the kernels' pool reaches on a plain buffer in the same run with the same thread
count (``cuda_ext.cpu.read_bandwidth``). Formats are interleaved within each run.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/quant_gemv.py [--threads 2] [--mib 512]
    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/quant_gemv.py --threads 1 --mib 1 --rows 256 --repeat 200

(the second: one matrix per format, in cache, the kernels' compute rate; "per CPU s" counts the
process's CPU time, which a loaded machine does not inflate).

``--dtype float32`` multiplies float32 activations (the float32 kernels, ``csrc/cpu/quant_f32.c``;
the dense row is then a float32 matrix through ``F.linear``); ``--path torch`` measures the PyTorch
path instead (each block-format matrix dequantised to the activations' dtype, then ``F.linear``), the
path float32 took before the float32 kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quant_blocks import random_blocks  # noqa: E402

from cuda_ext import cpu, loader  # noqa: E402
from cuda_ext.blocks import BLOCKS, row_bytes  # noqa: E402
from cuda_ext.quant import qlinear  # noqa: E402
from engine import formats as tensor_formats  # noqa: E402


def _matrices(fmt: str, rows: int, k: int, total: int, dense: torch.dtype) -> list[torch.Tensor]:
    """Distinct matrices (no two share memory) of ``rows`` x ``k`` weights, ``total`` bytes in all."""
    if fmt == "bf16":
        one = torch.randn(rows, k).to(dense)
    else:
        block = BLOCKS[fmt]
        raw = random_blocks(block.ggml_type, rows * k // block.values, np.random.default_rng(0))
        one = torch.from_numpy(raw.reshape(rows, row_bytes(fmt, k)))
    count = max(1, total // (one.numel() * one.element_size()))
    return [one.clone() for _ in range(count)]


def _pass(
    fmt: str, x: torch.Tensor, mats: list[torch.Tensor], k: int, repeat: int, path: str
) -> tuple[float, float]:
    """(wall, process CPU) seconds of one pass over ``mats`` (each multiplied ``repeat`` times)."""
    t, c = time.perf_counter(), time.process_time()
    for w in mats:
        for _ in range(repeat):
            if fmt == "bf16":
                cpu.linear(x, w)
            elif path == "torch":
                F.linear(x, tensor_formats.get(fmt).unpack(w, x.dtype))
            else:
                qlinear(x, w, fmt, k)
    return time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mib", type=int, default=512, help="stored MiB per format")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--formats", default="bf16," + ",".join(BLOCKS))
    p.add_argument(
        "--repeat", type=int, default=1, help="products per matrix per pass (>1 with a small --mib: in cache)"
    )
    p.add_argument("--dtype", choices=("bf16", "float32"), default="bf16", help="activations")
    p.add_argument(
        "--path", choices=("native", "torch"), default="native", help="torch: dequantise, then F.linear"
    )
    args = p.parse_args(argv)
    lib = loader.cpu()
    if lib is None:
        print("Error: no native kernels (no C compiler, or MOEINF_NATIVE_KERNELS=0)")
        return 1
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    act = torch.float32 if args.dtype == "float32" else torch.bfloat16
    x = torch.randn(1, args.k).to(act)
    mats = {f: _matrices(f, args.rows, args.k, args.mib << 20, act) for f in formats}
    stored = {f: sum(w.numel() * w.element_size() for w in mats[f]) for f in formats}
    buffer = torch.ones(max(stored.values()), dtype=torch.uint8)
    times: dict[str, list[float]] = {f: [] for f in formats}
    cpu_times: dict[str, list[float]] = {f: [] for f in formats}
    bandwidth: list[float] = []
    with cpu.decode_threads(True):
        for f in formats:
            _pass(f, x, mats[f], args.k, args.repeat, args.path)  # warm-up
        for _ in range(args.runs):
            bandwidth.append(cpu.read_bandwidth(buffer, args.threads, repeats=1))
            for f in formats:
                wall, used = _pass(f, x, mats[f], args.k, args.repeat, args.path)
                times[f].append(wall)
                cpu_times[f].append(used)
    bw = statistics.median(bandwidth)
    print(
        f"kernels: {lib.build} ({' '.join(lib.isa)}), {args.threads} threads, matrices {args.rows}x{args.k}, "
        f"{args.dtype} activations, {args.path} path (dense row: {str(act)[6:]} weights)"
    )
    print(
        f"read bandwidth (pool, {args.threads} threads): median {bw / 1e9:.1f} GB/s "
        f"(min {min(bandwidth) / 1e9:.1f}, max {max(bandwidth) / 1e9:.1f})"
    )
    print(
        f"{'format':8} {'MiB':>6} {'ms/pass':>8} {'spread':>13} {'GB/s':>6} {'of bound':>8} {'Gweights/s':>10} "
        f"{'per CPU s':>9}"
    )
    for f in formats:
        t = statistics.median(times[f])
        reads = stored[f] * args.repeat
        weights = len(mats[f]) * args.rows * args.k * args.repeat
        label = "float32" if f == "bf16" and act == torch.float32 else f
        print(
            f"{label:8} {stored[f] / 2**20:6.0f} {t * 1e3:8.2f} {min(times[f]) * 1e3:6.2f}-{max(times[f]) * 1e3:6.2f} "
            f"{reads / t / 1e9:6.1f} {reads / t / bw:8.0%} {weights / t / 1e9:10.1f} "
            f"{weights / statistics.median(cpu_times[f]) / 1e9:9.1f}"
        )
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The int8-activation GEMM (``cuda_ext.quant.qgemm``) against the float32 kernels (``qlinear`` on float32 x)
by rows of x, per block format: G multiply-adds per second of the process's CPU time (which other
programs on the cores do not inflate), one thread by default, and the float32 kernel's time over the
int8 one's (above 1: int8 is the faster). Where the ratio passes 1 is ``cuda_ext.quant.AUTO_MIN_ROWS``.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/qgemm_rows.py [--threads 1] [--shape 3584x1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from quant_blocks import random_blocks  # noqa: E402

from cuda_ext.blocks import BLOCKS, row_bytes  # noqa: E402
from cuda_ext.quant import qgemm, qlinear  # noqa: E402


def cpu_time(fn, repeat: int, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - t) / repeat)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", default="3584x1024", help="N x K of the weight")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    p.add_argument("--formats", default=",".join(BLOCKS))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, k = (int(v) for v in args.shape.split("x"))
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{n} x {k}, {args.threads} thread(s); per rows of x: int8 G/s, float32 G/s, float32 time / int8 time")
    for fmt in args.formats.split(","):
        block = BLOCKS[fmt]
        raw = random_blocks(block.ggml_type, n * k // block.values, np.random.default_rng(0))
        blocks = torch.from_numpy(raw.reshape(n, row_bytes(fmt, k)))
        cells = []
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            t8 = cpu_time(lambda x=x, b=blocks, f=fmt: qgemm(x, b, f, k), args.repeat, args.runs)
            if m <= 256 and (fmt != "q6_k" or m <= 64):  # the float32 kernel's own limits (max_tokens)
                t32 = cpu_time(lambda x=x, b=blocks, f=fmt: qlinear(x, b, f, k), args.repeat, args.runs)
                cells.append(f"{m}: {n * k * m / t8 / 1e9:.0f} {n * k * m / t32 / 1e9:.0f} {t32 / t8:.2f}x")
            else:
                cells.append(f"{m}: {n * k * m / t8 / 1e9:.0f} - -")
        print(f"{fmt:6s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""float32 activations on block-format weights, by rows of x: the float32 kernel (``moeinf_fgemv``)
against the PyTorch path (dequantise the matrix, then ``F.linear``), the figures behind
``cuda_ext.quant.MAX_TOKENS_F32``. Medians of 7 (each the mean of 3 calls), milliseconds per product.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/quant_rows_f32.py [--threads 2]
    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/quant_rows_f32.py --formats q4_k,q5_k,q6_k \
        --shapes 1024x3584,3584x1024 --rows 16,64,128,256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quant_blocks import random_blocks  # noqa: E402

from cuda_ext import loader  # noqa: E402
from cuda_ext.blocks import BLOCKS, row_bytes  # noqa: E402
from engine import formats  # noqa: E402


def _ms(fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        fn(*args), fn(*args), fn(*args)
        times.append((time.perf_counter() - t) / 3)
    return statistics.median(times) * 1e3


def _dense(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    return F.linear(x, formats.get(fmt).unpack(w, torch.float32))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="q4_1,q8_0")
    p.add_argument("--rows", default="1,4,16,32,64,128")
    p.add_argument("--shapes", default="1536x576,576x1536", help="N x K of W (K a multiple of the block: "
                   "1024x3584,3584x1024 for the 256-value formats)")
    args = p.parse_args(argv)
    found = loader.cpu()
    if found is None:
        print("Error: no native kernels (no C compiler, or MOEINF_NATIVE_KERNELS=0)")
        return 1
    torch.set_num_threads(args.threads)
    lib = found.lib
    for fmt in args.formats.split(","):
        block = BLOCKS[fmt]
        for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
            raw = random_blocks(block.ggml_type, n * k // block.values, np.random.default_rng(0))
            w = torch.from_numpy(raw.reshape(n, row_bytes(fmt, k)))
            cells = []
            for m in (int(r) for r in args.rows.split(",")):
                x, out = torch.randn(m, k), torch.empty(m, n)
                native = _ms(
                    lib.moeinf_fgemv,
                    block.ggml_type,
                    w.data_ptr(),
                    n,
                    k,
                    x.data_ptr(),
                    m,
                    None,
                    out.data_ptr(),
                    args.threads,
                )
                dense = _ms(_dense, x, w, fmt)
                cells.append(f"{m}: {native:.2f} / {dense:.2f}")
            print(f"{fmt} {n}x{k} (rows: kernel / dequantise+F.linear ms)  " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

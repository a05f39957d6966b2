"""The bf16 GEMV kernel's read rate against a plain read of the same bytes, on the decode thread pool.

A decode step is bound by the bytes it reads; this shows how close the native bf16 product
(``cuda_ext.cpu.linear``: ``csrc/cpu/bf16.c`` ``moeinf_dot_rows`` in the pool) comes to the memory's
read rate (``cuda_ext.cpu.read_bandwidth``, the bound ``decode_bound.py`` divides by), for the matrix
shapes of the decode benchmarks: an LM head (151,936 x hidden), and a token's routed experts as the
native decode step calls them (``moeinf_experts_acc``, ``csrc/cpu/moe.c``: top-k SwiGLU experts of one
layer per call, called directly, as many layers as exceed the last-level cache). Interleaved, medians
of ``--runs`` passes with their range.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/gemv_bandwidth.py
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from cuda_ext import cpu, loader


def _report(name: str, total: int, fn, args) -> None:
    flat = torch.ones(total, dtype=torch.uint8)
    kernel, read = [], []
    with cpu.decode_threads(True):
        fn()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            kernel.append(total / (time.perf_counter() - t0) / 1e9)
            read.append(cpu.read_bandwidth(flat, args.threads, repeats=1) / 1e9)
    g, r = statistics.median(kernel), statistics.median(read)
    print(
        f"  {name:24s} {total / 1e6:5.0f} MB: kernel {g:5.1f} ({min(kernel):.1f}-{max(kernel):.1f}), "
        f"read {r:5.1f} ({min(read):.1f}-{max(read):.1f}), kernel/read {g / r:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--mb", type=int, default=96, help="bytes of weights per pass, MB (above the caches)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lib = loader.cpu().lib
    print(f"{args.threads} threads, {args.runs} interleaved passes each: GB/s, median (min-max)")
    for hidden in (256, 1024):
        w = torch.randn(151936, hidden).bfloat16()
        x = torch.randn(1, hidden).bfloat16()
        _report(f"lm head 151936 x {hidden}", w.numel() * 2, lambda w=w, x=x: cpu.linear(x, w, None), args)
    for hidden, inter, k in ((256, 128, 8), (512, 192, 8), (1024, 3584, 2)):
        per_layer = 3 * hidden * inter * 2 * k
        layers = max(2, args.mb * 2**20 // per_layer)
        mats = [
            [
                [torch.randn(*s).bfloat16() for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
                for _ in range(k)
            ]
            for _ in range(layers)
        ]
        tables = [
            (ctypes.c_void_p * (6 * k))(
                *[e[m].data_ptr() for m in range(3) for e in layer], *([None] * 3 * k)
            )
            for layer in mats
        ]
        step = ctypes.sizeof(ctypes.c_void_p) * k
        coef = (ctypes.c_float * k)(*([0.1] * k))
        x, acc = torch.randn(hidden).bfloat16(), torch.zeros(hidden)

        def experts(tables=tables, step=step, coef=coef, x=x, acc=acc, k=k, hidden=hidden, inter=inter):
            for t in tables:
                b = ctypes.addressof(t)
                lib.moeinf_experts_acc(
                    x.data_ptr(),
                    k,
                    *(b + m * step for m in range(6)),
                    coef,
                    0,
                    hidden,
                    inter,
                    0,
                    0.0,
                    0.0,
                    acc.data_ptr(),
                    args.threads,
                )

        _report(f"{k} experts {hidden}/{inter}", per_layer * layers, experts, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

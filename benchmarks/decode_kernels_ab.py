"""The float32 decode kernels of two trees, interleaved in one process: a git ref's
``cuda_ext/csrc/cpu`` (default ``dad60cd``, before the multi-row kernels) against the working tree's,
each compiled as the loader's native build (``-O3 -march=native``) into a library of its own.

Two products, one token (float32 x), on the threads given:
* ``fgemv``: one matrix N x K in a block format (``moeinf_fgemv``, M = 1);
* ``experts``: a token's k SwiGLU experts H -> I -> H (``moeinf_experts_acc_f32``), as a GGUF model's
  decode runs them (``fmt/down`` names the down matrices' format apart, as Q4_K_M's q6_k); with
  ``--bf16-x``, ``moeinf_experts_acc`` (bf16 x: a bf16 model's block-format experts, the native step's).

Weights are random blocks with fixed, normal scales, several copies of each case so that a pass
reads ``--mib`` of them (from memory, not cache, where that exceeds L3). Each round runs A then B
(or B then A, alternating), ``--calls`` calls each; reported: medians over the rounds (min-max) of
the weights' GB/s, and B's time over A's.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_kernels_ab.py
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# ggml type, values per block, bytes per block, (offset, fp16 scale fields) or an e8m0 byte
FORMATS = {
    "q4_0": (2, 32, 18, [0]),
    "q4_1": (3, 32, 20, [0, 2]),
    "q8_0": (8, 32, 34, [0]),
    "q4_k": (12, 256, 144, [0, 2]),
    "q5_k": (13, 256, 176, [0, 2]),
    "q6_k": (14, 256, 210, [208]),
    "mxfp4": (39, 32, 17, None),
    "bf16": (0, 1, 2, None),  # plain bf16 weights (experts: moeinf_experts_acc with bf16 x)
}
_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def build(src: Path, out: Path) -> ctypes.CDLL:
    files = sorted(str(f) for f in src.glob("*.c"))
    cmd = ["cc", "-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-I", str(src), *files, "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(out))
    lib.moeinf_fgemv.argtypes = [_int, _p, _i64, _i64, _p, _i64, _p, _p, _int]
    lib.moeinf_fgemv.restype = _int
    lib.moeinf_experts_acc_f32.argtypes = [_p, _int, _p, _p, _p, _p, _p, _p, _p, _int, _i64, _i64, _int, _f32, _f32, _p, _int]
    lib.moeinf_experts_acc_f32.restype = _int
    lib.moeinf_experts_acc.argtypes = lib.moeinf_experts_acc_f32.argtypes
    lib.moeinf_experts_acc.restype = _int
    return lib


def tree_at(ref: str, into: Path) -> Path:
    """``cuda_ext/csrc/cpu`` of git ref ``ref`` written under ``into``."""
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{ref}:cuda_ext/csrc/cpu"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    into.mkdir(parents=True, exist_ok=True)
    for n in names:
        data = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:cuda_ext/csrc/cpu/{n}"], check=True, capture_output=True).stdout
        (into / n).write_bytes(data)
    return into


def blocks(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    _, values, nbytes, scales = FORMATS[fmt]
    if fmt == "bf16":
        w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        return np.ascontiguousarray((w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    b = rng.integers(0, 256, size=(rows * cols // values, nbytes), dtype=np.uint8)
    if scales is None:
        b[:, 0] = 120  # e8m0: 2^-7
    else:
        for off in scales:
            b[:, off : off + 2] = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    return np.ascontiguousarray(b.reshape(rows, -1))


def median_range(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="dad60cd", help="the tree A: a git ref (B is the working tree)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--bf16-x", action="store_true",
                    help="the experts with bf16 x (moeinf_experts_acc: a bf16 model's block-format experts)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the calling thread's CPU time (with --threads 1: the kernels' own rate, "
                    "which other programs on the cores do not slow)")
    ap.add_argument("--mib", type=float, default=64.0, help="weights per case, in copies read in turn")
    ap.add_argument("--fgemv", default="q4_0:256x1024,q4_k:256x1024,q8_0:256x1024,q4_k:3584x1024,q6_k:1024x3584,q8_0:3584x1024",
                    help="fmt:NxK,... ('' for none)")
    ap.add_argument("--experts", default="q4_0:256x128x8,q8_0:256x128x8,q4_0:1024x3584x2,q4_k:1024x3584x2,q8_0:1024x3584x2",
                    help="fmt[/down]:HxIxk,... ('' for none)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        lib_a = build(tree_at(a.ref, t / "a"), t / "a.so")
        lib_b = build(ROOT / "cuda_ext/csrc/cpu", t / "b.so")
        cases = []
        for spec in filter(None, a.fgemv.split(",")):
            fmt, shape = spec.split(":")
            n, k = map(int, shape.split("x"))
            one = blocks(fmt, n, k, rng).nbytes
            copies = max(1, int(a.mib * 2**20 // one))
            ws = [blocks(fmt, n, k, rng) for _ in range(copies)]
            x = rng.standard_normal(k).astype(np.float32)
            y = np.zeros(n, np.float32)

            def run(lib, ws=ws, x=x, y=y, n=n, k=k, fmt=fmt):
                for w in ws:
                    lib.moeinf_fgemv(FORMATS[fmt][0], w.ctypes.data, n, k, x.ctypes.data, 1, None, y.ctypes.data, a.threads)

            cases.append((f"fgemv {fmt} {n}x{k}", run, one * copies))
        for spec in filter(None, a.experts.split(",")):
            fmts, shape = spec.split(":")
            fmt, _, down = fmts.partition("/")
            down = down or fmt
            h, i, k = map(int, shape.split("x"))
            one = k * (2 * blocks(fmt, i, h, rng).nbytes + blocks(down, h, i, rng).nbytes)
            copies = max(1, int(a.mib * 2**20 // one))
            sets = []
            for _ in range(copies):
                mats = [(blocks(fmt, i, h, rng), blocks(fmt, i, h, rng), blocks(down, h, i, rng)) for _ in range(k)]
                ptr = (ctypes.c_void_p * k)
                sets.append((mats, ptr(*[m[0].ctypes.data for m in mats]), ptr(*[m[1].ctypes.data for m in mats]),
                             ptr(*[m[2].ctypes.data for m in mats])))
            x = (rng.standard_normal(h) * 0.5).astype(np.float32)
            xb = (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 x (truncated) for --bf16-x
            coef = np.full(k, 1.0 / k, np.float32)
            acc = np.zeros(h, np.float32)
            typ = FORMATS[fmt][0] | (FORMATS[down][0] << 8 if down != fmt else 0)

            def run(lib, sets=sets, x=x, xb=xb, coef=coef, acc=acc, k=k, h=h, i=i, typ=typ):
                fn, xp = (lib.moeinf_experts_acc, xb.ctypes.data) if a.bf16_x or typ == 0 else (lib.moeinf_experts_acc_f32, x.ctypes.data)
                for _, g, u, d in sets:
                    r = fn(xp, k, g, u, d, None, None, None, coef.ctypes.data, typ,
                                                   h, i, 0, 0.0, 0.0, acc.ctypes.data, a.threads)
                    assert r == 0

            cases.append((f"experts{' bf16 x' if a.bf16_x else ''} {fmt}{'/' + down if down != fmt else ''} {h}x{i} top-{k}", run, one * copies))
        clock = time.thread_time if a.cpu_time else time.perf_counter
        print(f"A = {a.ref}, B = working tree; {'CPU time; ' if a.cpu_time else ''} {a.threads} threads, {a.rounds} rounds of {a.calls} calls each")
        print("| product | A GB/s | B GB/s | B time / A time |")
        print("|---|---:|---:|---:|")
        for name, run, nbytes in cases:
            ga, gb, ratio = [], [], []
            for lib in (lib_a, lib_b):
                run(lib)  # warm: pages touched, pools started
            for r in range(a.rounds):
                times = {}
                for lib in ((lib_a, lib_b) if r % 2 == 0 else (lib_b, lib_a)):
                    time.sleep(0.001)  # the other library's pool workers go to sleep
                    t0 = clock()
                    for _ in range(a.calls):
                        run(lib)
                    times[id(lib)] = (clock() - t0) / a.calls
                ta, tb = times[id(lib_a)], times[id(lib_b)]
                ga.append(nbytes / ta / 1e9)
                gb.append(nbytes / tb / 1e9)
                ratio.append(tb / ta)
            print(f"| {name} | {median_range(ga)} | {median_range(gb)} | {median_range(ratio)} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Offloaded decode in three expert formats: bytes per token and time against the reachable time.

The 32-layer Mixtral-shaped synthetic model of the README's offload table (``moeinf bench --synthetic
mixtral-8x7b --scale 0.25``: 32 layers x 8 experts, top-2, hidden 1024, expert intermediate 3584), in
bf16 and pulled again with ``--quantize q8_0`` and ``--quantize q4_k`` (its exported checkpoint), routing
replayed from the real Mixtral-8x7B-Instruct trace, all resident and at a 25% expert budget, policy eam,
compute in bf16 (the block formats through the int8-activation kernels), O_DIRECT reads, 2 threads.

Each round runs every format once (``moeinf bench``'s own code, ``--profile``: the disk probe, the
all-resident compute time, Belady's and the token oracle's loads), so the formats are interleaved; the
report gives medians over the rounds with their min-max.

    python benchmarks/offload_formats.py prepare          # build the three stores once (not timed)
    flock /tmp/moeinf-heavy.lock python benchmarks/offload_formats.py run --out /tmp/of/r1.json   # one round
    ...                                                   # (each round is ~3 min; release the lock between)
    python benchmarks/offload_formats.py report /tmp/of/r*.json

The q4_k quantiser searches each block's scale (seconds per expert matrix here): ``prepare`` quantises
the first few matrices of each shape and reuses their blocks (``predict_table._quantise_a_few``); the
weights are random, so which valid blocks an expert holds changes no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACE = Path(os.environ.get("MOEINF_TRACES", HERE.parents[0].parent / "shared" / "traces")) / (
    "mixtral-8x7b-instruct-humaneval0.npz"
)
BASE = "synthetic-mixtral-8x7b-x0.25"
FORMATS = ["bf16", "q8_0", "q4_k"]


def store_name(fmt: str) -> str:
    return BASE if fmt == "bf16" else f"{BASE}-{fmt}"


def prepare() -> None:
    from engine.bench.synthetic import make_synthetic_from_shape, synthetic_shape
    from engine.store.export import export_model
    from engine.store.manifest import store_names
    from engine.store.pull import pull_model

    sys.path.insert(0, str(HERE))
    from predict_table import _quantise_a_few

    make_synthetic_from_shape(BASE, synthetic_shape("mixtral-8x7b", 0.25))
    todo = [f for f in FORMATS[1:] if store_name(f) not in store_names()]
    if not todo:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        ckpt = export_model(BASE, Path(tmp) / "ckpt")
        for fmt in todo:
            with _quantise_a_few():
                pull_model(str(ckpt), name=store_name(fmt), quantize=fmt)
            print(f"{store_name(fmt)}: ready", file=sys.stderr)


def run_round(prompt: int, gen: int, budgets: list[str], formats: list[str] = FORMATS) -> dict:
    from engine.bench.run import bench_main

    out = {"prompt_tokens": prompt, "gen_tokens": gen, "budgets": budgets, "loadavg": os.getloadavg()[0],
           "rows": []}
    for fmt in formats:
        res = bench_main(model=store_name(fmt), synthetic=None, scale=1.0, prompt_tokens=prompt, gen_tokens=gen,
                         repetitions=1, budgets=budgets, policies=["eam"], replay=str(TRACE), profile=True,
                         dtype=None, device="cpu", progress=lambda m, f=fmt: print(f"{f}: {m}", file=sys.stderr))
        for row in res["rows"]:
            out["rows"].append({"format": fmt, "dtype": res["dtype"], "disk_gbps": res["probe"]["bandwidth_gbps"]
                                if res.get("probe") else None, **row})
    return out


def report(paths: list[str]) -> str:
    rows: dict[tuple[str, str], list[dict]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            rows.setdefault((r["format"], r["budget"]), []).append(r)

    def med(vals: list[float], fmt: str) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        m = statistics.median(vals)
        return f"{m:{fmt}}" if len(vals) == 1 else f"{m:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

    lines = ["| format | budget | expert MB | MB/token | hit % | ms/token | reachable ms/token | ms/reachable | "
             "stall % | disk busy % | runs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in FORMATS:
        for (f, budget), rs in rows.items():
            if f != fmt:
                continue
            ratio = [r["ms_per_token"] / r["reachable_ms_per_token"] for r in rs if r.get("reachable_ms_per_token")]
            lines.append("| " + " | ".join([
                fmt, budget, f"{rs[0]['bytes_loaded'] / rs[0]['loads'] / 1e6:.1f}" if rs[0].get("loads") else "-",
                med([r["bytes_per_token"] / 1e6 for r in rs], ".1f"), med([100 * r["hit_rate"] for r in rs], ".1f")
                if rs[0].get("hit_rate") is not None else "-",
                med([r["ms_per_token"] for r in rs], ".1f"), med([r.get("reachable_ms_per_token") for r in rs], ".1f"),
                med(ratio, ".2f") if ratio else "-", med([100 * r["stall_share"] for r in rs], ".0f"),
                med([100 * r["disk_busy_share"] for r in rs if "disk_busy_share" in r], ".0f"), str(len(rs)),
            ]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("-p", type=int, default=1)
    r.add_argument("-n", type=int, default=80)
    r.add_argument("--budgets", default="100%,25%")
    r.add_argument("--formats", default=",".join(FORMATS), help="a subset, e.g. q4_k,q8_0 (development runs)")
    rep = sub.add_parser("report")
    rep.add_argument("paths", nargs="+")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare()
    elif a.cmd == "run":
        doc = run_round(a.p, a.n, a.budgets.split(","), [f for f in a.formats.split(",") if f])
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)
    else:
        print(report(a.paths))


if __name__ == "__main__":
    main()

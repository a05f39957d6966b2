"""``moeinf predict`` against ``moeinf bench``: the README's predicted-vs-measured table.

Four models x budgets 100/50/25/10% x two expert formats x batch 1 and 16:

* ``mix``: a Mixtral-8x7B-shaped synthetic model (32 layers x 8 experts, top-2, widths x0.125) replaying
  the Mixtral-8x7B HumanEval trace of ../shared/traces;
* ``ds``: a DeepSeek-MoE/FLAME-shaped synthetic model (OLMoE family code: 8 MoE layers x 64 fine-grained
  experts, top-6) replaying the FLAME-MoE trace;
* ``qw``: a Qwen3-MoE-shaped synthetic model (qwen3_moe family code, q/k norms, GQA; 8 layers x 64 experts,
  top-6, so that it can replay the FLAME-MoE trace too);
* ``demo``: the demo model (smollm2-moe: SmolLM2 upcycled to 8 experts, its own routing; the forecast's
  routing model is the model's own recorded traces, from prompts the bench does not use).

Formats: bf16 and q4_k for the synthetic models (the q4_k copy is the bf16 one exported and pulled with
``--quantize q4_k``), the demo as ``make demo`` builds it (the GGUF's q4_1 blocks) and pulled again with
``--dtype bfloat16``.

The forecast of each row is ``engine.bench.predict.bench_row_forecast``: the model's headers, the replica
probe (``engine.bench.replica``: the model's first layer and first 8 (at most half its layers) run as the bench
runs them, all resident and at the rows' shares) that ``run`` makes in the same locked process right before
the rows of each model and format (so the forecast and the rows see the machine in the same state on a shared
VM), the cached machine profile (the disk, and the kernel probes: they time a row only where no replica fit
is given) and the routing model (the engine's own cache run dry over the replayed trace). Nothing in the
forecast is fitted to the measured rows. The report shows, per row, the measured decode rate with the spread of
its repetitions, and how much of the shared machine the row had (this process's CPU seconds per second, the
1-minute load average).

    python benchmarks/predict_table.py prepare                 # build the models (once, not timed)
    flock /tmp/moeinf-heavy.lock python -c "from engine.bench.machine import machine_profile as m; m(reprobe=True)"
    # one locked run per model x format: the replica probe at batch 1 and 16, then the 8 rows (-r 2), then the
    # forecasts (each run under ~10 min; the timeout inside the lock, not around it)
    flock /tmp/moeinf-heavy.lock timeout 590 bash -c "python benchmarks/predict_table.py run mix --formats bf16 \
        --batches 1,16 -r 2 --no-forecast --out /tmp/pt/m-mix-bf16.json && \
        python benchmarks/predict_table.py reforecast /tmp/pt/m-mix-bf16.json"
    ...                                                        # (--budgets 25%,10%: a subset of the rows)
    python benchmarks/predict_table.py report /tmp/pt/m-*.json          # the markdown table and the summary
    python benchmarks/predict_table.py report --parts /tmp/pt/m-*.json  # each decode step: compute and stalls
    # the same rows forecast by the kernel probes alone (as for a model not in the store): on a copy
    cp /tmp/pt/m-*.json /tmp/pt-k/ && python benchmarks/predict_table.py reforecast --kernels /tmp/pt-k/m-*.json

``reforecast`` runs under the lock too: it times the policy's own work on the dry runs of the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TRACES = Path(os.environ.get("MOEINF_TRACES", Path(__file__).resolve().parents[1].parent / "shared" / "traces"))
MIXTRAL_TRACE = "mixtral-8x7b-instruct-humaneval0.npz"
FLAME_TRACE = "flame-moe-290m.npz"
BUDGETS = ["100%", "50%", "25%", "10%"]
BATCHES = [1, 16]
DTYPE = "bfloat16"  # the compute dtype of every row, 4-bit ones included (float32 block kernels are changing)
DEMO_GGUF = Path(os.environ.get("MOEINF_DEMO_GGUF", Path(__file__).resolve().parents[1] / "demo-cache"
                                 / "SmolLM2-135M-Instruct.Q4_1.gguf"))  # what `make demo` fetches
DEMO_TRACE_PROMPTS = [  # the demo's routing model is recorded on these (the bench's prompts are random tokens)
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer briefly.",
    "List three uses of a paperclip.",
]

# name -> (family, layers, experts, top_k, hidden, intermediate, vocab, heads, kv_heads, head_dim, trace)
SYNTHETIC = {
    "mix": ("mixtral", 32, 8, 2, 512, 1792, 32000, 4, 1, 128, MIXTRAL_TRACE),
    "ds": ("olmoe", 8, 64, 6, 1024, 512, 50304, 8, 8, 128, FLAME_TRACE),
    "qw": ("qwen3_moe", 8, 64, 6, 1024, 384, 151936, 8, 2, 128, FLAME_TRACE),
}


def model_names(key: str) -> list[tuple[str, str]]:
    """(store name, format label) of the two formats of one table model."""
    if key == "demo":
        return [("smollm2-moe-bf16", "bf16"), ("smollm2-moe", "q4_1")]
    return [(f"pt-{key}-bf16", "bf16"), (f"pt-{key}-q4_k", "q4_k")]


def _prepare_synthetic(key: str) -> None:
    import torch

    from engine.bench.synthetic import make_synthetic_model
    from engine.store.export import export_model
    from engine.store.manifest import store_names
    from engine.store.pull import pull_model

    fam, layers, experts, k, h, i, vocab, heads, kv, hd, _trace = SYNTHETIC[key]
    (bf16, _), (q4, _) = model_names(key)
    make_synthetic_model(bf16, fam, layers, experts, k, h, i, vocab, torch.bfloat16, seed=0, heads=heads,
                         kv_heads=kv, head_dim=hd)
    if q4 not in store_names():
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp, _quantise_a_few():
            ckpt = export_model(bf16, Path(tmp) / "ckpt")
            pull_model(str(ckpt), name=q4, quantize="q4_k")


@contextlib.contextmanager
def _quantise_a_few(variants: int = 4):
    """The pull's quantiser, run on the first ``variants`` matrices of each shape only; later ones reuse
    those blocks in turn. The engine's quantisers search each block's scale (seconds per expert matrix
    on this VM: an hour per model), and the weights are random, so which valid blocks an expert holds
    changes no timing: its format, sizes and files are what the pull writes."""
    import engine.store.convert as convert

    real = convert._quantised
    made: dict = {}  # (shape, format) -> the quantised variants
    calls: dict = {}  # (shape, format) -> matrices asked for so far

    def fast(t, fmt):
        key = (tuple(t.shape), fmt.name)
        got = made.setdefault(key, [])
        n = calls[key] = calls.get(key, 0) + 1
        if len(got) < variants:
            got.append(real(t, fmt))
        return got[(n - 1) % variants]

    convert._quantised = fast
    try:
        yield
    finally:
        convert._quantised = real


def _prepare_demo() -> None:
    from engine.store.manifest import store_names
    from engine.store.pull import pull_model
    from engine.upcycle import Upcycle

    for name, dtype in (("smollm2-moe", None), ("smollm2-moe-bf16", "bfloat16")):
        if name not in store_names():
            pull_model(str(DEMO_GGUF), name=name, dtype=dtype, transform=Upcycle(8, 2))
    _record_demo_traces()


def _record_demo_traces() -> None:
    """The demo's own routing, recorded by ``moeinf run`` on prompts the bench never uses."""
    import engine
    from engine.trace.store import TraceStore

    for name, _ in model_names("demo"):
        if TraceStore(name).read() is not None:
            continue
        with engine.load(name, expert_budget="100%") as session:
            for p in DEMO_TRACE_PROMPTS:
                for _ in session.generate(p, num_predict=32, temperature=0):
                    pass


def prepare(keys: list[str]) -> None:
    for key in keys:
        t0 = time.perf_counter()
        if key == "demo":
            _prepare_demo()
        else:
            _prepare_synthetic(key)
        print(f"{key}: ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def _trace_for(key: str):
    from engine.trace.format import load_trace

    if key == "demo":
        return None
    return load_trace(TRACES / SYNTHETIC[key][-1])


def run(key: str, prompt: int, gen: int, reps: int, policy: str, budgets: list[str], batches: list[int],
        formats: list[str] | None = None, dtype: str = DTYPE, forecast: bool = True, calibrate: bool = True) -> dict:
    from engine.bench.predict import bench_row_forecast
    from engine.bench.replica import calibrate as calibrate_replica
    from engine.bench.run import bench_main

    trace_path = None if key == "demo" else str(TRACES / SYNTHETIC[key][-1])
    trace = _trace_for(key)
    out = {"key": key, "prompt_tokens": prompt, "gen_tokens": gen, "repetitions": reps, "policy": policy,
           "dtype": dtype, "rows": [], "replicas": {}}
    for name, fmt in model_names(key):
        if formats and fmt not in formats:
            continue
        if calibrate:  # the replica probe, right before the rows it forecasts (engine.bench.replica)
            t0 = time.time()
            fits = calibrate_replica(name, batches, prompt, gen, budgets, trace, dtype, save=False)
            for b, fit in fits.items():
                out["replicas"][f"{name}|b{b}"] = fit.as_dict()
            print(f"{name}: replica probe {time.time() - t0:.0f} s", file=sys.stderr)
        marks: list[tuple[float, float, float]] = []

        def say(m: str, n: str = name, marks: list = marks) -> None:
            if m.startswith("batch "):
                marks.append(_mark())
            print(f"{n}: {m}", file=sys.stderr)

        res = bench_main(model=name, synthetic=None, scale=1.0, prompt_tokens=prompt, gen_tokens=gen,
                         repetitions=reps, budgets=budgets, policies=[policy], replay=trace_path, profile=False,
                         dtype=dtype, device="cpu", batches=batches, progress=say)
        marks.append(_mark())
        for i, row in enumerate(res["rows"]):
            machine = _machine_share(marks[i], marks[i + 1]) if i + 1 < len(marks) else {}
            out["rows"].append({"model": key, "store": name, "format": fmt, "dtype": dtype, **row, **machine})
    if forecast:  # else ``reforecast`` adds them later (the dry cache runs need no lock on the machine)
        for row in out["rows"]:
            row["forecast"] = bench_row_forecast(row["store"], row, prompt, gen, trace, dtype=dtype,
                                                 replicas=_replicas(out, row["store"]))
    return out


def _replicas(doc: dict, store: str) -> dict:
    """{batch: ReplicaFit} the run's replica probe measured for ``store`` (empty: the kernel model times it)."""
    from engine.bench.replica import ReplicaFit

    out = {}
    for k, d in (doc.get("replicas") or {}).items():
        name, _, b = k.rpartition("|b")
        if name == store:
            out[int(b)] = ReplicaFit.from_dict(d)
    return out


def _mark() -> tuple[float, float, float]:
    """(wall clock, this process's CPU seconds, the 1-minute load average) now."""
    t = os.times()
    return time.perf_counter(), t.user + t.system, os.getloadavg()[0]


def _machine_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict:
    """How much of the machine a row had: this process's CPU seconds per second of the row and the 1-minute
    load average around it (the other agents' work on this shared machine shows in both)."""
    wall = max(1e-9, b[0] - a[0])
    return {"cpu_per_s": (b[1] - a[1]) / wall, "loadavg": (a[2] + b[2]) / 2}


def reforecast(path: str, kernels: bool = False) -> None:
    """The forecasts of a run's rows again, from the run's replica probe (``kernels``: from the machine
    profile's kernel probes only, as for a model that is not in the store)."""
    from engine.bench.predict import bench_row_forecast

    doc = json.loads(Path(path).read_text())
    trace = _trace_for(doc["key"])
    for row in doc["rows"]:
        reps = {} if kernels else _replicas(doc, row["store"])
        row["forecast"] = bench_row_forecast(row["store"], row, doc["prompt_tokens"], doc["gen_tokens"], trace,
                                             dtype=doc.get("dtype"), replicas=reps)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _within(pred: float, meas: float, tol: float) -> bool:
    return abs(pred - meas) <= tol * meas


def report(paths: list[str], tol: float = 0.15) -> str:
    rows = []
    for p in paths:
        rows += json.loads(Path(p).read_text())["rows"]
    lines = [
        "| model | format | batch | budget | measured tg t/s | predicted (band) | pred/meas | in band "
        "| measured pp t/s | predicted pp (band) | pred/meas | in band | CPU s/s | load |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    ok = inside = ok_pp = inside_pp = 0
    ratios = []
    for r in rows:
        fc = r["forecast"]
        tg, pp = r["decode_tps"], r["prefill_tps"]
        lo, hi = fc["decode_band"]
        plo, phi = fc["prefill_band"]
        w, b = _within(fc["decode_tps"], tg, tol), lo <= tg <= hi
        wp, bp = _within(fc["prefill_tps"], pp, tol), plo <= pp <= phi
        ok, inside, ok_pp, inside_pp = ok + w, inside + b, ok_pp + wp, inside_pp + bp
        ratios.append(fc["decode_tps"] / tg)
        # the measured figure's spread: tokens/s at the repetitions' step time +- their standard deviation
        ms, sd = r["ms_per_token"], r.get("ms_per_token_std", 0.0)
        spread = tg * sd / ms if ms else 0.0
        cpu = f"{r['cpu_per_s']:.2f}" if "cpu_per_s" in r else "-"
        load = f"{r['loadavg']:.1f}" if "loadavg" in r else "-"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['batch']} | {r['budget']} | {tg:.2f} ±{spread:.2f} | "
            f"{fc['decode_tps']:.2f} ({lo:.2f}..{hi:.2f}) | {fc['decode_tps'] / tg:.2f} | {'yes' if b else 'no'} | "
            f"{pp:.1f} | {fc['prefill_tps']:.1f} ({plo:.1f}..{phi:.1f}) | {fc['prefill_tps'] / pp:.2f} | "
            f"{'yes' if bp else 'no'} | {cpu} | {load} |"
        )
    n = len(rows)
    summary = (
        f"\n{n} rows. Decode: {ok}/{n} within +-{tol:.0%} of measured, {inside}/{n} inside the band "
        f"(pred/meas median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}). "
        f"Prefill: {ok_pp}/{n} within +-{tol:.0%}, {inside_pp}/{n} inside the band."
    )
    return "\n".join(lines) + summary


def parts(paths: list[str]) -> str:
    """Each row's decode step, measured against forecast, split in two: the time computing (the step less
    the stalls on loads) and the stalls (the expert cache's ``stall_s``), with loads per step and hit rates."""
    rows = []
    for p in paths:
        rows += json.loads(Path(p).read_text())["rows"]
    lines = [
        "| model | format | batch | budget | step ms meas | fc | compute ms meas | fc | stall ms meas | fc "
        "| loads/step | hit meas | fc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fc = r["forecast"]
        step = r["ms_per_token"]
        stall = step * r.get("stall_share", 0.0)
        sm = fc.get("step_ms") or {}
        c, io = sm.get("compute", float("nan")), sm.get("loads", float("nan"))
        lines.append(
            f"| {r['model']} | {r['format']} | {r['batch']} | {r['budget']} | {step:.1f} | {c + io:.1f} | "
            f"{step - stall:.1f} | {c:.1f} | {stall:.1f} | {io:.1f} | {r.get('loads_per_step', 0):.1f} | "
            f"{r.get('hit_rate', 1.0):.2f} | {fc.get('hit_rate', 1.0):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("keys", nargs="*", default=["mix", "ds", "qw", "demo"])
    r = sub.add_parser("run")
    r.add_argument("key", choices=["mix", "ds", "qw", "demo"])
    r.add_argument("-p", type=int, default=16)
    r.add_argument("-n", type=int, default=16)
    r.add_argument("-r", type=int, default=1)
    r.add_argument("--policy", default="eam")
    r.add_argument("--budgets", default=",".join(BUDGETS))
    r.add_argument("--batches", default=",".join(map(str, BATCHES)))
    r.add_argument("--formats", default="", help="comma-separated format labels to run (default: both)")
    r.add_argument("--dtype", default=DTYPE, help="compute dtype of every row (default: bfloat16)")
    r.add_argument("--no-calibrate", action="store_true",
                   help="no replica probe before the rows (their forecasts then come from the kernel probes)")
    r.add_argument("--no-forecast", action="store_true",
                   help="measure only; add the forecasts afterwards with `reforecast` (outside the lock)")
    r.add_argument("--out", required=True)
    q = sub.add_parser("report")
    q.add_argument("paths", nargs="+")
    q.add_argument("--parts", action="store_true", help="the decode step's compute and stalls, measured and forecast")
    f = sub.add_parser("reforecast", help="forecast the rows of a run's JSON again with the current profile")
    f.add_argument("paths", nargs="+")
    f.add_argument("--kernels", action="store_true", help="ignore the runs' replica probes (the kernel model)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.keys)
    elif args.cmd == "run":
        res = run(args.key, args.p, args.n, args.r, args.policy, args.budgets.split(","),
                  [int(b) for b in args.batches.split(",")], [f for f in args.formats.split(",") if f], args.dtype,
                  forecast=not args.no_forecast, calibrate=not args.no_calibrate)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.out)
        if not args.no_forecast:
            print(report([args.out]))
    elif args.cmd == "reforecast":
        for path in args.paths:
            reforecast(path, args.kernels)
        print(report(args.paths))
    else:
        print(parts(args.paths) if args.parts else report(args.paths))


if __name__ == "__main__":
    main()

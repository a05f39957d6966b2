"""Where a decode step's disk time goes: a timeline of one offloaded bench run, the disk's idle spans.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/offload_timeline.py [MODEL] [-n 30] [--budget 25%]

Runs ``moeinf bench --replay`` (the Mixtral trace) once on MODEL (default the q4_k store of
``benchmarks/offload_formats.py``) with the expert source's ``observe``, ``fetch`` (each expert handed
out) and loader reads timestamped, then over the last two thirds of the run: the share of time no load
was reading, in how many spans, what ran inside them (the event sequence), the median read, the time
from a read's end to its expert being handed out, and from the routing to the read starting.
"""

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine.bench.predict as bp  # noqa: E402
import engine.memory.offload as off  # noqa: E402
from engine.bench.run import bench_main  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("model", nargs="?", default="synthetic-mixtral-8x7b-x0.25-q4_k")
ap.add_argument("-n", type=int, default=30)
ap.add_argument("--budget", default="25%")
args = ap.parse_args()
TRACE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "traces",
    "mixtral-8x7b-instruct-humaneval0.npz",
)
bp.bench_forecasts = lambda *a, **k: None  # not needed here
T = []


def wrap(cls, name, tag):
    f = getattr(cls, name)

    def g(self, *a, **k):
        key = a[0].key if tag == "run" else (a[0] if a else None)
        T.append((time.perf_counter(), tag + "<", key))
        r = f(self, *a, **k)
        T.append((time.perf_counter(), tag + ">", key))
        return r

    setattr(cls, name, g)


wrap(off.OffloadedExperts, "observe", "obs")
wrap(off.OffloadedExperts, "_run", "run")
_f = off.OffloadedExperts.fetch


def fetch(self, layer, ids):
    T.append((time.perf_counter(), "fetch<", layer))
    for x in _f(self, layer, ids):
        T.append((time.perf_counter(), "got", layer))
        yield x
    T.append((time.perf_counter(), "fetch>", layer))


off.OffloadedExperts.fetch = fetch
res = bench_main(
    model=args.model,
    synthetic=None,
    scale=1.0,
    prompt_tokens=1,
    gen_tokens=args.n,
    repetitions=1,
    budgets=[args.budget],
    policies=["eam"],
    replay=TRACE,
    profile=False,
    dtype=None,
    device="cpu",
)
r = res["rows"][0]
print(
    f"{r['ms_per_token']:.1f} ms/token, stalled {100 * r['stall_share']:.0f}%, disk busy {100 * r['disk_busy_share']:.0f}%"
)
# analyse the last half of events
T.sort()
t0 = T[len(T) // 3][0]
ev = [e for e in T if e[0] >= t0]
# busy intervals from run< run>
inflight = 0
idle_spans = []
prev_end = None
for t, tag, _k in ev:
    if tag == "run<":
        if inflight == 0 and prev_end is not None:
            idle_spans.append((prev_end, t))
        inflight += 1
    elif tag == "run>":
        inflight = max(0, inflight - 1)  # the window may open while a read is under way
        if inflight == 0:
            prev_end = t
total = ev[-1][0] - ev[0][0]
idle = sum(b - a for a, b in idle_spans)
print(
    f"window {total * 1e3:.0f} ms, disk idle {idle / total * 100:.0f}% in {len(idle_spans)} spans, median span {statistics.median([b - a for a, b in idle_spans]) * 1e3:.2f} ms"
)
# what happens in idle spans: classify by the events inside
cnt = collections.Counter()
for a, b in idle_spans[:2000]:
    tags = tuple(tag for t, tag, k in ev if a < t < b)
    cnt[tags[:6]] += b - a
for tags, s in cnt.most_common(8):
    print(f"{s * 1e3:8.1f} ms  {tags}")
# durations
obs = [(b[0] - a[0]) for a, b in zip(ev, ev[1:], strict=False) if a[1] == "obs<" and b[1] == "obs>"]
runs = {}
rd = []
for t, tag, k in ev:
    if tag == "run<":
        runs[k] = t
    elif tag == "run>" and k in runs:
        rd.append(t - runs.pop(k))
print(
    f"observe median {statistics.median(obs) * 1e3:.2f} ms; read median {statistics.median(rd) * 1e3:.2f} ms (n {len(rd)})"
)
# fetch< to first got, got to fetch>
f2 = []
last_f = None
for t, tag, _k in ev:
    if tag == "fetch<":
        last_f = t
    elif tag == "fetch>" and last_f:
        f2.append(t - last_f)
print(f"fetch total median {statistics.median(f2) * 1e3:.2f}")
# time from fetch> (layer l) to next obs< (layer l+1): the rest of layer + attention
g = []
lf = None
for t, tag, _k in ev:
    if tag == "fetch>":
        lf = t
    elif tag == "obs<" and lf:
        g.append(t - lf)
        lf = None
print(
    f"fetch end -> next observe median {statistics.median(g) * 1e3:.2f} ms, mean {statistics.mean(g) * 1e3:.2f}"
)
# start latency: obs< -> first run< after it (only when a run starts before obs>+2ms); read end -> got
sl = []
rg = []
pending_obs = None
last_run_end = None
for t, tag, _k in ev:
    if tag == "obs<":
        pending_obs = t
    elif tag == "run<" and pending_obs is not None:
        sl.append(t - pending_obs)
        pending_obs = None
    elif tag == "fetch<":
        pending_obs = None
    if tag == "run>":
        last_run_end = t
    elif tag == "got" and last_run_end is not None:
        rg.append(t - last_run_end)
        last_run_end = None
print(
    f"observe -> read start median {statistics.median(sl) * 1e3:.2f} ms (n {len(sl)}); read end -> got median {statistics.median(rg) * 1e3:.2f} ms mean {statistics.mean(rg) * 1e3:.2f}"
)
# got -> next got/fetch> : expert compute
ec = []
for a, b in zip(ev, ev[1:], strict=False):
    if a[1] == "got" and b[1] in ("got", "fetch>"):
        ec.append(b[0] - a[0])
print(f"expert compute median {statistics.median(ec) * 1e3:.2f} ms")

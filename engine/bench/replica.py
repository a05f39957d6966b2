"""The replica probe: the engine's own bench run on a few layers of the model, right before it is needed.

The kernel probes (``engine.bench.kernels``) time the engine's pieces on stand-in weights; what a decode
step of a real model costs also depends on how those pieces run together (the native step over every
layer, the per-layer Python, the LM head, what a load costs the compute thread while it runs, how much of a
batch step's streamed loads overlap its products), and on a shared machine all of it moves from one hour to
the next. So for a store model the profile also holds a **replica** measurement:

1. **The replica** (``make_replica``): a store directory of the model's first ``layers`` decoder layers: its
   own config with ``num_hidden_layers`` cut, the dense tensors of those layers and of the embedding, final
   norm and LM head (written once), and links to those layers' expert shards. Same shapes, same formats,
   same files the loader and the cache read; only the depth differs.
2. **Its runs** (``probe_replica``), of a replica of one decoder layer and one of ``REPLICA_LAYERS`` (at most
   half the model's): the bench's protocol (``engine.bench.runner``: a fresh load, ``prompt``
   tokens of ``batch`` sequences prefilled, ``gen`` decode steps) all resident and (the deeper replica) behind
   the budgeted cache at the largest and smallest asked shares (each twice: in the first pass and the last),
   the routing forced from the run's trace (its
   first layers) or the model's own router. Between two decode steps the last-level cache is flushed when the real model's step reads more
   than it holds (a model of many layers comes back to a layer after reading all the others: its weights
   are never warm), so the replica's layers run as cold as the model's. Every step is timed with the
   loads it made (demand and prefetch) and its stalls.
3. **The fit** (``ReplicaFit``): two replicas, of one decoder layer and of ``layers``, separate what a step
   costs per decoder layer from what it costs once (embedding, LM head, and the step's own work: waking the
   kernels' threads, the forward's Python; 3-4 ms a step on the 2-core VM, which a fit through the head's
   time alone put into the layers: the Mixtral-shaped replica forecast its 32-layer model 2x slow). Where the
   layers run cold, the per-layer slope is at least a layer's bytes at the read rate measured in the probe
   (``layer_floor_s``: with a 311 MB LM head the two depths differ by less than their spread). Behind
   the cache, a step is ``fixed + per-layer * depth + c * (demand + prefetch loads)``
   (the deeper replica's runs at every share, ``_fit_loads``; each load's cost includes its stall, the compute
   thread's share of reading it, and whatever overlap the engine reached). The real model's step is then ``fixed + layers * per-layer + the
   dry run's loads * c`` (``engine.bench.forecast``), its prefill the line through the two replicas' resident
   prefills plus the dry run's prefill loads at the budgeted prefills' median cost per load. A budgeted run
   gives the replica at least twice the experts a layer routes to (``_replica_budget``: one layer of eight
   experts has no 10%). The spread of the replica's resident passes (``passes``, interleaved) and of the budgeted
   steps about their fit widens the band.

Nothing here reads the bench's rows: the replica has a different depth, runs before them, and its fit is
per layer and per load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPLICA_LAYERS = 8  # decoder layers of the deeper replica (at most half the model's); the other has one
REPLICA_MAX_EXPERT_BYTES = 2 << 30  # a replica whose experts exceed this is not made (the kernel model serves)
PASSES = 3  # resident passes of each replica (the budgeted runs: in the first and the last, of the deeper replica)
RESIDENT_SPREAD = 0.15  # more resident passes (up to three) while the deeper replica's spread over them exceeds it
_LAYER = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")


def replica_layers(num_layers: int, layer_expert_bytes: int, layers: int = REPLICA_LAYERS) -> int:
    """Decoder layers of the deeper replica: ``layers``, at most half the model's (a model of fewer than four:
    all of them), fewer (down to two) while they hold more than ``REPLICA_MAX_EXPERT_BYTES``, else 0."""
    n = num_layers if num_layers < 4 else min(num_layers // 2, layers)
    while n > 2 and n * layer_expert_bytes > REPLICA_MAX_EXPERT_BYTES:
        n -= 1
    return n if n * layer_expert_bytes <= REPLICA_MAX_EXPERT_BYTES else 0


def _trim_config(config: dict, layers: int) -> dict:
    """The config with ``num_hidden_layers`` cut to ``layers`` (and per-layer lists with it)."""
    n = int(config.get("num_hidden_layers") or config.get("n_layer") or layers)
    out = {}
    for k, v in config.items():
        if isinstance(v, list) and len(v) == n and k not in ("eos_token_id",):
            v = v[:layers]
        out[k] = v
    out["num_hidden_layers"] = layers
    if "n_layer" in config:
        out["n_layer"] = layers
    return out


def make_replica(store, layers: int, root: Path) -> Path:
    """A store directory at ``root`` holding the first ``layers`` decoder layers of ``store`` (see the module
    doc); kept when one of the same source and depth is there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(root)
    stamp = {"source": str(store.root), "layers": layers,
             "manifest_mtime": os.path.getmtime(store.root / "manifest.json")
             if (store.root / "manifest.json").exists() else 0.0}
    if (root / "replica.json").is_file():
        try:
            if json.loads((root / "replica.json").read_text()) == stamp:
                return root
        except ValueError:
            pass
    shutil.rmtree(root, ignore_errors=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "dense").mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(_trim_config(store.config, layers), indent=1))
    for f in store.root.iterdir():
        if f.is_file() and f.name not in ("config.json", "manifest.json"):
            os.symlink(f.resolve(), partial / f.name)
    for i, f in enumerate(store.dense_files):
        tensors, meta = {}, {}
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():
                m = _LAYER.search(key)
                if m is None or int(m.group(1)) < layers:
                    tensors[key] = fh.get_tensor(key)
        if "moeinf.formats" in meta:  # the stored formats of the tensors kept only
            kept = {k: v for k, v in json.loads(meta["moeinf.formats"]).items() if k in tensors}
            meta = {**meta, "moeinf.formats": json.dumps(kept)}
        save_file(tensors, str(partial / "dense" / f"part-{i + 1:05d}.safetensors"), metadata=meta)
    (partial / "experts").mkdir()
    for layer in range(layers):
        src = store.root / "experts" / f"L{layer}"
        if src.is_dir():
            os.symlink(src.resolve(), partial / "experts" / f"L{layer}")
    manifest = dict(store.manifest)
    manifest.update({"name": f"{store.name}-replica{layers}", "num_layers": layers,
                     "moe_layers": [m for m in manifest.get("moe_layers", []) if m < layers], "files": {}})
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (partial / "replica.json").write_text(json.dumps(stamp))
    os.replace(partial, root)
    return root


@dataclass
class ReplicaRun:
    """One run of the replica: ``budget`` ("100%" resident), its prefill seconds and every decode step's
    (seconds, demand loads, prefetch loads, stall seconds)."""

    budget: str
    prefill_s: float
    steps: list[tuple[float, int, int, float]]
    slots: int = 0
    depth: int = 1  # decoder layers of the replica that ran
    prefill_loads: int = 0  # loads (demand and prefetch) during the prefill


@dataclass
class ReplicaFit:
    """The replica's measurements, fitted (see the module doc). Seconds."""

    layers: int  # decoder layers of the deeper replica (the other has one)
    batch: int
    fixed_s: float  # a resident decode step beyond its decoder layers (embedding, head, the step's own work)
    resident_layer_s: float  # a decoder layer of a decode step, every expert resident
    offload_fixed_s: float  # the same two behind the budgeted cache, without loads
    offload_layer_s: float
    demand_s: float  # one demand load
    prefetch_s: float  # one prefetch load
    prefill_fixed_s: float = 0.0  # the prefill (every expert resident) beyond its decoder layers
    prefill_layer_s: float = 0.0  # a decoder layer of the prefill
    prefill_load_s: float = 0.0  # one load of a prefill behind the cache (a cold cache loads what it routes to)
    spread: float = 0.0  # relative spread of the resident step between the replica's passes
    offload_spread: float = 0.0  # the budgeted steps' typical deviation from the fit, relative
    head_s: float = 0.0  # embedding + final norm + LM head at the step's rows, timed alone (for the record)
    read_bps: float = 0.0  # the pool's read rate, measured with the probe (0: layers warm, no floor)
    layer_floor_s: float = 0.0  # the least a resident decoder layer was allowed (``layer_floor_s``)
    runs: list = field(default_factory=list)  # [depth, budget, prefill s, median step s, loads a step] of each run
    measured_at: float = 0.0  # time.time() when it was measured
    probe_s: float = 0.0

    def step_s(self, num_layers: int, offloaded: bool, demand: float = 0.0, prefetch: float = 0.0) -> float:
        """A decode step of a model of ``num_layers`` decoder layers making those loads."""
        if not offloaded:
            return self.fixed_s + num_layers * self.resident_layer_s
        return (self.offload_fixed_s + num_layers * self.offload_layer_s + demand * self.demand_s
                + prefetch * self.prefetch_s)

    def prefill_s(self, num_layers: int, loads: float = 0.0) -> float:
        """The prefill of a model of ``num_layers`` decoder layers making ``loads`` loads."""
        return self.prefill_fixed_s + num_layers * self.prefill_layer_s + loads * self.prefill_load_s

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ReplicaFit:
        return cls(**d)


def _line(depths: list[float], times: list[float], floor: float = 0.0) -> tuple[float, float]:
    """(fixed, per layer) of ``time = fixed + depth * per`` through the two depths' times, each the low median
    of its runs (a burst of other work slowed some of the demo's batch runs 15-fold: their median was one of
    them; other work only slows a run). ``per`` is at least ``floor`` (a layer's bytes at the read rate: see
    ``layer_floor_s``); the fixed part is then what the shallower replica leaves."""
    lo, hi = min(depths), max(depths)
    t_lo = statistics.median_low([t for d, t in zip(depths, times, strict=True) if d == lo])
    t_hi = statistics.median_low([t for d, t in zip(depths, times, strict=True) if d == hi])
    per = max(0.0, (t_hi - t_lo) / (hi - lo)) if hi > lo else 0.0
    per = max(per, floor)
    return max(0.0, t_lo - per * lo), per


def layer_floor_s(layer_bytes: float, read_bps: float) -> float:
    """The least a cold decoder layer's decode step can take: the bytes it reads (its dense weights and the
    experts the step routes to) at the machine's read rate. Where the LM head dominates a step the two
    replicas' difference is small against their spread, and the slope through them came out below it (the
    Qwen3-shaped model: 0.18 ms a layer that reads 19.5 MB, 0.65 ms at 30 GB/s; its 8 layers then forecast
    1.3x fast)."""
    return layer_bytes / read_bps if layer_bytes > 0 and read_bps > 0 else 0.0


def _flush_buffer(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32)


def _flush(buf: torch.Tensor | None) -> None:
    """Read ``buf`` through the kernels' own pool (a torch op here would leave torch's threads spinning on
    the cores the next step's kernels need: the replica's layers ran 2x slower after a ``torch.sum``)."""
    if buf is None:
        return
    from cuda_ext.cpu import read_bandwidth

    read_bandwidth(buf, torch.get_num_threads(), repeats=1)


def _fixed_time(model, rows: int, dtype: torch.dtype, flush: torch.Tensor | None, passes: int = 5) -> float:
    """Embedding + final norm + LM head at ``rows`` rows (what a step costs beyond its decoder layers)."""
    from cuda_ext.cpu import decode_threads

    x = torch.randn(rows, model.args.hidden_size).to(dtype)
    tok = torch.zeros(rows, dtype=torch.long)
    times = []
    with torch.inference_mode(), decode_threads(rows == 1):
        for _ in range(passes + 1):
            _flush(flush)
            t0 = time.perf_counter()
            model.embed_tokens(tok)
            model.lm_head(model.norm(x)).float()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _run(root: Path, budget: str, policy: str | None, batch: int, prompt: int, gen: int, trace, dtype,
         flush: torch.Tensor | None) -> tuple[ReplicaRun, float]:
    """One replica run as ``engine.bench.runner._repetition`` makes it, each decode step timed with its loads;
    also the embedding and LM head at the decode's rows, timed alone."""
    from engine.bench.forced import force_routing
    from engine.bench.runner import _prefill_groups, bench_forwards
    from engine.memory import open_experts
    from engine.model.loader import load_model
    from engine.store.opened import StoreModel

    store = StoreModel.from_dir(root)
    ctx = prompt + gen + 1
    vocab = int(store.config.get("vocab_size") or 1000)
    prompts = [torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    T = trace.num_tokens if trace is not None else 1
    starts = [(i * T) // batch for i in range(batch)] if trace is not None else [0] * batch
    experts = open_experts(store, dtype, "cpu", budget, policy if budget != "100%" else None, None, ctx=ctx)
    try:
        model = load_model(store, dtype=dtype, device="cpu", experts=experts, max_seq_len=ctx)
        if batch > 1:
            model.setup_caches(ctx, dtype, "cpu", slots=batch)
        st0 = experts.stats() if hasattr(experts, "stats") else None
        if st0 is not None and st0.as_dict().get("budget_bytes") is None:
            layout = store.layout
            for layer in layout.moe_layers:
                for _ in experts.fetch(layer, list(range(layout.num_experts))):
                    pass
        forced = force_routing(model, trace) if trace is not None else None
        experts.begin_sequence()
        plan = bench_forwards(batch, prompt, gen, T, starts)
        groups = _prefill_groups(batch, prompt)
        last = [0] * batch
        _flush(flush)
        p0 = experts.stats()
        t0 = time.perf_counter()
        for group, (_, rows, _) in zip(groups, plan, strict=False):
            if forced is not None:
                forced.rows = rows
            logits = model.forward_batch(torch.cat([prompts[i] for i in group]), [(i, 0, prompt) for i in group])
            for r, i in enumerate(group):
                last[i] = int(logits[r].argmax())
        prefill_s = time.perf_counter() - t0
        p1 = experts.stats()
        prefill_loads = int(p1.demand_loads + p1.prefetch_loads - p0.demand_loads - p0.prefetch_loads)
        tok = torch.tensor(last)
        steps = []
        for step, (_, rows, _) in enumerate(plan[len(groups):]):
            if forced is not None:
                forced.rows = rows
            _flush(flush)
            a = experts.stats()
            t = time.perf_counter()
            logits = model.forward_batch(tok, [(i, prompt + step, 1) for i in range(batch)])
            tok = logits.argmax(dim=-1)
            dt = time.perf_counter() - t
            b = experts.stats()
            steps.append((dt, int(b.demand_loads - a.demand_loads), int(b.prefetch_loads - a.prefetch_loads),
                          float(b.stall_s - a.stall_s)))
        experts.end_sequence()
        slots = int(experts.stats().as_dict().get("slots") or 0)
        fixed = _fixed_time(model, batch, dtype, flush)
    finally:
        experts.close()
    return ReplicaRun(budget, prefill_s, steps, slots, prefill_loads=prefill_loads), fixed


def _fit_loads(runs: list[ReplicaRun], skip: int) -> tuple[float, float, float]:
    """(a, c, relative spread) of ``step = a + c * loads`` (demand and prefetch loads together) over the
    budgeted runs' steps (of one depth, several shares: their loads differ), the first ``skip`` of each left
    out (the cache's first steps after the prefill). ``c`` is Theil-Sen's slope (the median of the pairwise
    slopes: a step that other work on a shared machine slowed moves it little; least squares gave a load a
    negative cost); ``a`` the mean residual (the bench's figure is a mean over its steps, slowed ones
    included)."""
    xs, ys = [], []
    for r in runs:
        for dt, d, p, _ in r.steps[skip:]:
            xs.append(float(d + p))
            ys.append(dt)
    if not xs:
        return 0.0, 0.0, 0.0
    x, y = np.asarray(xs), np.asarray(ys)
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    ok = dx != 0
    c = max(0.0, float(np.median((y[j] - y[i])[ok] / dx[ok]))) if ok.any() else 0.0
    resid = y - c * x
    rel = float(np.median(np.abs(resid - np.median(resid))) / max(1e-9, float(np.median(y))))
    return max(0.0, float(np.mean(resid))), c, rel


def probe_replica(store, batch: int, prompt: int, gen: int, budgets: list[str], policy: str | None = "lru",
                  trace=None, dtype: torch.dtype = torch.bfloat16, work: Path | None = None,
                  passes: int = PASSES, flush_bytes: int = 0, layers: int = REPLICA_LAYERS,
                  layer_bytes: float = 0.0) -> ReplicaFit | None:
    """The replica's runs and their fit (see the module doc); None when no replica can be made.
    ``budgets``: the budgeted shares to run besides "100%"; ``trace``: the run's routing (the replica replays
    its first layers); ``flush_bytes``: bytes read between steps (0: none; see ``flush_needed``);
    ``layer_bytes``: what a decoder layer of a decode step reads (with a flush, the resident slope is at least
    those bytes at the read rate measured here: ``layer_floor_s``)."""
    from engine.store.paths import moeinf_home
    from engine.trace.format import RoutingTrace

    t_start = time.perf_counter()
    layout = store.layout
    n_layers = int(store.config.get("num_hidden_layers") or len(layout.moe_layers))
    per_layer = layout.num_experts * store.expert_file_bytes
    L = replica_layers(n_layers, per_layer, layers)
    if L == 0:
        return None
    work = Path(work) if work is not None else moeinf_home() / "probe" / "replicas"
    depths = sorted({1, L})
    roots = {d: make_replica(store, d, work / f"{store.name}-L{d}") for d in depths}
    subs: dict[int, object] = {}
    for d in depths:
        subs[d] = None
        if trace is not None:
            moe_idx = [i for i, m in enumerate(layout.moe_layers) if m < d]
            subs[d] = RoutingTrace(np.ascontiguousarray(trace.expert_ids[:, moe_idx]), trace.num_experts)
    flush = _flush_buffer(flush_bytes) if flush_bytes else None
    runs: list[ReplicaRun] = []
    heads = []
    # the budgeted runs: the deeper replica only (the load fit's), at the largest and the smallest share (their
    # loads differ most), in the first pass and again in the last (one run per share let a slow first run,
    # its files cold, set the fit: ds bf16 at batch 1 gave 63.7 ms a step at 8 loads and 44.8 at 21); the
    # resident runs ``passes`` times, every configuration interleaved
    shares = sorted(set(budgets), key=lambda b: float(b.rstrip("%")) if b.endswith("%") else 0.0)
    shares = list(dict.fromkeys([shares[-1], shares[0]])) if shares else []
    n_pass = max(1, passes)
    for i in range(n_pass):
        for d in depths:
            for budget in ["100%", *shares] if i in (0, n_pass - 1) and d == L else ["100%"]:
                run, head = _run(roots[d], _replica_budget(budget, d, layout, batch), policy, batch, prompt, gen,
                                 subs[d], dtype, flush)
                run.budget = budget
                run.depth = d
                runs.append(run)
                heads.append(head)
    skip = min(2, max(0, gen - 4))

    def deep_spread() -> float:
        deep = [statistics.median([s[0] for s in r.steps[skip:]]) for r in runs if r.budget == "100%" and r.depth == L]
        return (max(deep) - min(deep)) / (2 * statistics.median(deep)) if len(deep) > 1 else 0.0

    extra = 0
    while deep_spread() > RESIDENT_SPREAD and extra < 3:  # a burst of other work: more resident passes
        extra += 1
        for d in depths:
            run, head = _run(roots[d], "100%", policy, batch, prompt, gen, subs[d], dtype, flush)
            run.depth = d
            runs.append(run)
            heads.append(head)
    resident = [r for r in runs if r.budget == "100%"]
    offload = [r for r in runs if r.budget != "100%"]
    # each run's median step: the slope through the two depths is extrapolated to the model's depth, and a
    # few slowed steps of a short run moved its mean by 40% (the fit of the loads takes the mean: see there)
    means = [statistics.median([s[0] for s in r.steps[skip:]]) for r in resident]
    read_bps = 0.0
    if flush is not None:  # the layers run cold: none can beat its bytes at the rate the pool reads memory
        from cuda_ext.cpu import read_bandwidth

        read_bps = read_bandwidth(flush, torch.get_num_threads())
    floor = layer_floor_s(layer_bytes, read_bps)
    fixed, per = _line([float(r.depth) for r in resident], means, floor)
    spread = deep_spread()
    # behind the cache: the deeper replica's budgeted runs (at one layer a budget may leave every expert
    # resident), their load-free step split as the resident one's fixed part plus the rest per layer
    deep_off = [r for r in offload if r.depth == L]
    if deep_off:
        a, c, rel = _fit_loads(deep_off, skip)
        ofixed, oper = fixed, max(0.0, a - fixed) / L
    else:
        ofixed, oper, c, rel = fixed, per, 0.0, 0.0
    pf, pp = _line([float(r.depth) for r in resident], [r.prefill_s for r in resident])
    per_load = [(r.prefill_s - pf - pp * r.depth) / r.prefill_loads for r in offload if r.prefill_loads > 0]
    pc = max(0.0, statistics.median(per_load)) if per_load else 0.0
    return ReplicaFit(
        layers=L, batch=batch, fixed_s=fixed, resident_layer_s=per, offload_fixed_s=ofixed, offload_layer_s=oper,
        demand_s=c, prefetch_s=c, prefill_fixed_s=pf, prefill_layer_s=pp, prefill_load_s=pc, spread=spread,
        offload_spread=rel, read_bps=read_bps, layer_floor_s=floor,
        head_s=statistics.median(heads), measured_at=time.time(), probe_s=time.perf_counter() - t_start,
        runs=[[r.depth, r.budget, r.prefill_s, statistics.median([s[0] for s in r.steps[skip:]]),
               statistics.mean([s[1] + s[2] for s in r.steps[skip:]])] for r in runs],
    )


def _replica_budget(budget: str, depth: int, layout, batch: int) -> str:
    """The share of the replica's experts to run a budgeted share at: the same (so each layer has the slots it
    has in the model), or at least twice the experts a token routes to plus two (a replica of one layer holds
    too few experts for 10%). ``batch`` is not counted: a batch streams what its step cannot keep, as the model's
    does (counting it left both of qw's batch shares at 51%, and the loads did not differ between them)."""
    if budget == "100%" or not budget.endswith("%"):
        return budget
    need = (2 * layout.top_k + 2) / (depth * layout.num_experts)
    share = max(float(budget.rstrip("%")) / 100, need)
    return "100%" if share >= 0.95 else f"{100 * share:.1f}%"


def flush_needed(step_bytes: float, llc: int) -> int:
    """Bytes to read between the replica's steps: twice the last-level cache when the real model's step
    reads more than it holds (else 0: the model's weights stay warm from one step to the next)."""
    return 2 * llc if llc and step_bytes > llc else 0


def calibrate(model: str, batches: list[int], prompt: int, gen: int, budgets: list[str], trace=None,
              dtype: str = "bfloat16", save: bool = True, passes: int = PASSES) -> dict[int, ReplicaFit]:
    """Probe the replica of store model ``model`` at each batch size (the budgeted shares ``budgets``), and
    keep the fits in the machine profile (``MachineProfile.replicas``) unless ``save`` is False.
    {batch: ReplicaFit}; a model too large for a replica gets none."""
    from dataclasses import replace as dc_replace

    from engine.bench.kernels import llc_bytes
    from engine.bench.machine import PROFILE_FILE, machine_profile
    from engine.bench.predict import _act_name, replica_key
    from engine.bench.shape import read_shape
    from engine.store.opened import open_model
    from engine.store.paths import moeinf_home

    store = open_model(model)
    shape = read_shape(str(store.root))
    act = _act_name(dtype)
    shape = dc_replace(shape, compute_dtype=act)
    torch_dtype = torch.float32 if act == "f32" else torch.bfloat16
    llc = llc_bytes()
    shares = [b for b in budgets if b != "100%"]
    out: dict[int, ReplicaFit] = {}
    for batch in batches:
        distinct = min(shape.num_experts, shape.top_k * batch)
        step_bytes = shape.dense_bytes + shape.moe_layers * distinct * shape.expert_bytes
        routed = shape.num_experts * (1 - (1 - shape.top_k / shape.num_experts) ** batch)  # distinct, uniform
        layer_bytes = (shape.layer_dense_bytes + shape.moe_layers * routed * shape.expert_bytes) / shape.num_layers
        fit = probe_replica(store, batch, prompt, gen, shares, trace=trace, dtype=torch_dtype, passes=passes,
                            flush_bytes=flush_needed(step_bytes, llc), layer_bytes=layer_bytes)
        if fit is not None:
            out[batch] = fit
    if save and out:
        profile, _ = machine_profile()
        for batch, fit in out.items():
            profile.replicas[replica_key(store.name, act, batch, prompt, gen)] = fit.as_dict()
        path = moeinf_home() / PROFILE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.as_dict(), indent=1))
        os.replace(tmp, path)
    return out

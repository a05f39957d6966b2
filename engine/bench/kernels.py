"""Probes of the engine's own compute, for the machine profile of ``moeinf predict``.

Everything here runs the engine's code, not a stand-in, so the profile follows the kernels as they
change (the profile's key includes a fingerprint of that code, ``engine.bench.machine.code_key``):

* **experts** (``probe_experts``): the MoE block (``engine.model.layers.moe.MoEBlock``) over experts of
  one tensor format, with a fixed router, at ``t`` tokens per expert: one token through ``k`` experts
  (the decode path: one native call) and the expert-major path (each expert's tokens as one product).
  Two expert sizes give, per format and token count, a fixed cost per expert and seconds per weight byte.
  The experts rotate over a pool larger than the CPU's caches, as a model's do.
* **dense** (``probe_dense``): ``cuda_ext.cpu.linear`` (what the attention projections and the LM head
  call) on matrices of each format at ``T`` rows: seconds per weight byte.
* **overhead** (``probe_overhead``): a tiny model of each family (random weights, built with the store's
  synthetic writer, loaded by the engine's loader) decoding and prefilling the way ``moeinf bench`` does,
  with every expert resident and behind the budgeted cache: what a layer costs beyond its weights'
  products (norms, rotary, attention over a short context, routing, the expert source's bookkeeping,
  Python, waking the kernels' thread pool between products), fitted as ``a + b * sequences + c * tokens``
  per layer.
* **memory** (``probe_memory``): the last-level cache's size and the bandwidth beyond it.
* **loads** (``probe_loads``): what the engine's own cache achieves per expert load while it decodes.

Times are the fastest of a few passes (``_best``: other work on a shared machine only slows a pass down,
by up to 10x when a kernel's thread waits at a barrier for a core); their spread over the passes is kept
(it widens the forecast's band), and so is the median pass over the fastest (``typical_slowdown``: a bench
reports a mean over its steps, the typical pass, not the fastest).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)  # tokens per expert (or rows of a dense product)
DENSE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (weight format, activation dtype) pairs: bf16 models, block formats with bf16 or float32 activations
PAIRS = (("bf16", "bf16"), ("q4_k", "bf16"), ("q4_1", "bf16"), ("q4_1", "f32"), ("q8_0", "f32"), ("f32", "f32"),
         ("q4_0", "bf16"))
_SIZES = ((512, 512), (1024, 1536))  # (hidden, intermediate) of the two probe experts
_POOL_BYTES = 48 << 20  # experts rotate over at least this much memory (beyond the caches)
_PASSES = 5
OVERHEAD_FAMILIES = ("mixtral", "olmoe", "qwen3_moe")
_ACT = {"bf16": torch.bfloat16, "f32": torch.float32}


@dataclass
class Rates:
    """Seconds per weight byte (and a fixed cost per call) at each token count of a grid."""

    tokens: list[int]
    per_byte: list[float]
    fixed: list[float] = field(default_factory=list)

    def seconds(self, nbytes: float, tokens: float) -> float:
        """Time of one product of ``nbytes`` of weights over ``tokens`` rows (log-linear between grid points,
        proportional to tokens beyond the last)."""
        xs = np.log(np.asarray(self.tokens, dtype=float))
        t = max(1.0, float(tokens))
        top = self.tokens[-1]
        scale = t / top if t > top else 1.0
        lt = min(np.log(t), xs[-1])
        pb = float(np.interp(lt, xs, self.per_byte)) * scale
        fx = float(np.interp(lt, xs, self.fixed)) if self.fixed else 0.0
        return fx + nbytes * pb


def _best(xs: list[float]) -> float:
    """The fastest pass: on a shared machine the others are slowed by other work (a kernel's threads wait
    at each barrier for one the OS took away: a pass can take 10x as long), never sped up."""
    return min(xs)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


_TYPICAL: list[float] = []  # median pass / fastest pass of each timing since ``probe_kernels`` began


def _spread(xs: list[float]) -> float:
    m = _median(xs)
    if m > 0 and min(xs) > 0:
        _TYPICAL.append(m / min(xs))
    return (max(xs) - min(xs)) / (2 * m) if m > 0 else 0.0


def typical_slowdown() -> float:
    """The median, over the last ``probe_kernels``'s timings, of the median pass over the fastest: what
    the other work on this machine cost a typical pass while it was probed (1.0: nothing measured)."""
    return _median(_TYPICAL) if _TYPICAL else 1.0


def _weight(rows: int, cols: int, fmt: str, act: torch.dtype, gen: torch.Generator):
    from engine.formats import get
    from engine.formats.tensor import QuantTensor

    w = torch.randn(rows, cols, generator=gen) * 0.02
    f = get(fmt)
    if f.quantised:
        return QuantTensor.quantise(w, f)
    return w.to(f.torch_dtype if f.torch_dtype is not None else act)


def _nbytes(w) -> int:
    return int(w.nbytes) if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()


class _Pool:
    """A fixed set of experts handed out by id: an ExpertSource without a cache."""

    def __init__(self, experts: list):
        self.experts = experts

    def observe(self, layer, topk_ids, hidden) -> None:
        pass

    def fetch(self, layer, ids):
        for e in ids:
            yield int(e), self.experts[int(e)]


class _FixedGate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ids = torch.zeros(1, 1, dtype=torch.long)

    def forward(self, x):
        k = self.ids.shape[1]
        return torch.full((x.shape[0], k), 1.0 / k, dtype=x.dtype), self.ids


_BASES: dict = {}  # (h, i, fmt, act) -> one expert's three matrices, made (and quantised) once per process


def _experts_pool(h: int, i: int, fmt: str, act: torch.dtype, gen: torch.Generator) -> tuple[list, int]:
    from engine.model.experts import ExpertWeights

    key = (h, i, fmt, str(act))
    if key not in _BASES:
        _BASES[key] = [_weight(i, h, fmt, act, gen), _weight(i, h, fmt, act, gen), _weight(h, i, fmt, act, gen)]
    one = _BASES[key]
    size = sum(_nbytes(w) for w in one)
    count = max(8, -(-_POOL_BYTES // size))
    experts = [ExpertWeights(*one)]
    for _ in range(count - 1):  # distinct memory per expert (a clone, cheaper than quantising again)
        experts.append(ExpertWeights(*[_clone(w) for w in one]))
    return experts, size


def _clone(w):
    if isinstance(w, torch.Tensor):
        return w.clone()
    from engine.formats.tensor import QuantTensor

    return QuantTensor(raw=w.raw.clone(), format=w.format, shape=w.shape)


def _block_time(block, gate: _FixedGate, x: torch.Tensor, ids_list: list[torch.Tensor]) -> list[float]:
    """Seconds per forward over the pool's rotation, ``_PASSES`` passes (after one warm-up forward)."""
    from cuda_ext.cpu import decode_threads

    times = []
    with torch.inference_mode(), decode_threads(x.shape[0] == 1):
        gate.ids = ids_list[0]
        block(x)
        for _ in range(_PASSES):
            t0 = time.perf_counter()
            for ids in ids_list:
                gate.ids = ids
                block(x)
            times.append((time.perf_counter() - t0) / len(ids_list))
    return times


def _expert_times(fmt: str, act_name: str, tokens=TOKENS) -> tuple[list[int], list[dict[int, list[float]]]]:
    """One round of the expert probe: (bytes of each probe expert, per size {key: seconds per expert of each
    pass}); key ``t`` > 0: the expert-major path at ``t`` tokens per expert, 0: one token through ``k`` experts
    in one native call, -1: one token on the Python path."""
    from engine.model.layers.moe import MoEBlock, swiglu_expert

    act = _ACT[act_name]
    gen = torch.Generator().manual_seed(0)
    per_size: list[dict[int, list[float]]] = []
    sizes = []
    for h, i in _SIZES:
        experts, size = _experts_pool(h, i, fmt, act, gen)
        sizes.append(size)
        gate = _FixedGate()
        block = MoEBlock(0, gate, _Pool(experts), swiglu_expert("silu"))
        n = len(experts)
        res: dict[int, list[float]] = {}
        for t in tokens:
            per = 2 if t >= 16 else 4  # experts per forward, each with t tokens (k = 1 router)
            ids = [
                torch.tensor([[(j + m) % n] for m in range(per) for _ in range(t)]) for j in range(0, n, per)
            ][: max(2, 16 // max(1, t // 8))]
            x = (torch.randn(per * t, h, generator=gen) * 0.5).to(act)
            res[t] = [s / per for s in _block_time(block, gate, x, ids)]
        # decode: one token through k experts in one call (k = 4: the per-expert share of the call). Last:
        # torch's threads run slowly for a while after the kernels' pool was busy (the pool spins)
        k = 4
        ids = [torch.tensor([[(j + m) % n for m in range(k)]]) for j in range(0, n, k)]
        x = (torch.randn(1, h, generator=gen) * 0.5).to(act)
        res[0] = [s / k for s in _block_time(block, gate, x, ids)]
        # the same token through the Python path (where the native call declines: an expert whose matrices
        # are not all of one format): three products and the elementwise ops per expert
        fn = block.expert_fn
        block.expert_fn = lambda xx, w, fn=fn: fn(xx, w)  # no ``accumulate``
        res[-1] = [s / k for s in _block_time(block, gate, x, ids)]
        block.expert_fn = fn
        per_size.append(res)
        del experts, block
    return sizes, per_size


def _fit_experts(sizes: list[int], rounds: list[list[dict[int, list[float]]]], tokens=TOKENS) -> tuple[dict, float]:
    """The expert rates from one or more rounds of ``_expert_times``: each timing the fastest pass of any
    round (a burst of other work on a shared machine can slow every pass of one round: rounds apart in time
    rarely all meet one), fitted over the two sizes as a fixed cost per expert plus seconds per byte."""
    spreads = [_spread(ts) for r in rounds for res in r for ts in res.values()]

    def best(si: int, key: int) -> float:
        return min(_best(r[si][key]) for r in rounds)

    def fit(key: int) -> tuple[float, float]:
        (s1, s2), (t1, t2) = sizes, (best(0, key), best(1, key))
        pb = max(0.0, (t2 - t1) / (s2 - s1))
        return max(0.0, t1 - pb * s1), pb if pb > 0 else t2 / s2

    d = fit(0)
    py = fit(-1)
    major = [fit(t) for t in tokens]
    out = {
        "decode": Rates([1], [d[1]], [d[0]]),
        "python": Rates([1], [py[1]], [py[0]]),
        "major": Rates(list(tokens), [m[1] for m in major], [m[0] for m in major]),
    }
    return out, _median(spreads)


def probe_experts(fmt: str, act_name: str, tokens=TOKENS, rounds: int = 1) -> tuple[dict, float]:
    """({"decode": Rates (per expert, one token, k experts per call), "python": Rates (per expert, one token,
    the Python path), "major": Rates (per expert, t tokens each)}, spread) for experts in ``fmt`` with
    ``act_name`` activations (the fastest of ``rounds`` rounds, run back to back)."""
    got = [_expert_times(fmt, act_name, tokens) for _ in range(rounds)]
    return _fit_experts(got[0][0], [r for _, r in got], tokens)


def _dense_times(fmt: str, act_name: str, rows=DENSE_ROWS) -> tuple[int, list[list[float]]]:
    """One round of the dense probe: (the weight's bytes, seconds per product of each pass at each row count)."""
    from cuda_ext.cpu import decode_threads, linear

    act = _ACT[act_name]
    gen = torch.Generator().manual_seed(1)
    n, k = 2048, 2048
    key = ("dense", n, k, fmt, act_name)
    if key not in _BASES:
        _BASES[key] = _weight(n, k, fmt, act, gen)
    w0 = _BASES[key]
    size = _nbytes(w0)
    pool = [w0] + [_clone(w0) for _ in range(max(3, -(-_POOL_BYTES // size)) - 1)]
    out = []
    for r in rows:
        x = (torch.randn(r, k, generator=gen) * 0.5).to(act)
        reps = pool[: max(2, len(pool) // max(1, r // 16))]
        times = []
        with torch.inference_mode(), decode_threads(r == 1):
            linear(x, reps[0])
            for _ in range(_PASSES):
                t0 = time.perf_counter()
                for w in reps:
                    linear(x, w)
                times.append((time.perf_counter() - t0) / len(reps))
        out.append(times)
    return size, out


def _fit_dense(size: int, rounds: list[list[list[float]]], rows=DENSE_ROWS) -> tuple[Rates, float]:
    per_byte = [min(_best(r[j]) for r in rounds) / size for j in range(len(rows))]
    spreads = [_spread(ts) for r in rounds for ts in r]
    return Rates(list(rows), per_byte, [0.0] * len(rows)), _median(spreads)


def probe_dense(fmt: str, act_name: str, rows=DENSE_ROWS, rounds: int = 1) -> tuple[Rates, float]:
    """Seconds per weight byte of ``cuda_ext.cpu.linear`` on ``fmt`` matrices at each row count."""
    got = [_dense_times(fmt, act_name, rows) for _ in range(rounds)]
    return _fit_dense(got[0][0], [r for _, r in got], rows)


ROUNDS = 2  # rounds of the kernel probes, each over every pair in turn


def probe_kernels(pairs=PAIRS, rounds: int = ROUNDS) -> tuple[dict, float]:
    """{"<fmt>/<act>": {"experts": {...}, "dense": Rates}} for each pair, and the median spread. The pairs are
    probed ``rounds`` times over, in turn (so a pair's rounds are far apart in time), and each timing is the
    fastest of all its rounds' passes."""
    from engine.formats import FORMATS

    pairs = [(f, a) for f, a in pairs if f in FORMATS]
    raw: dict[tuple[str, str], list] = {p: [] for p in pairs}
    _TYPICAL.clear()
    for _ in range(max(1, rounds)):
        for fmt, act in pairs:
            raw[(fmt, act)].append((_expert_times(fmt, act), _dense_times(fmt, act)))
    out: dict[str, dict] = {}
    spreads = []
    for (fmt, act), got in raw.items():
        experts, s1 = _fit_experts(got[0][0][0], [e[1] for e, _ in got])
        dense, s2 = _fit_dense(got[0][1][0], [d[1] for _, d in got])
        out[f"{fmt}/{act}"] = {"experts": experts, "dense": dense}
        spreads += [s1, s2]
    _BASES.clear()
    return out, _median(spreads) if spreads else 0.0


# -- per-layer overhead: tiny models of each family, run the way the bench runs them --

# hidden 512: the attention's and the experts' products are large enough to run in the kernels' thread pool,
# so the overhead includes waking its workers after the gaps between a layer's products, as in a real model
_TINY = dict(num_layers=4, num_experts=8, top_k=2, hidden=512, intermediate=128, vocab=256, head_dim=128, heads=4,
             kv_heads=1)
_SHAPES = ((1, 1), (16, 16), (16, 1), (256, 16))  # (tokens, sequences) of a forward: decode 1 and 16, prefills


def _tiny_forward_times(root: Path, family: str, budget: str) -> dict[tuple[int, int], float]:
    from engine.bench.forced import force_routing
    from engine.memory import open_experts
    from engine.model.loader import load_model
    from engine.store.opened import open_model
    from engine.trace.format import RoutingTrace

    store = open_model(root)
    L, E = _TINY["num_layers"], _TINY["num_experts"]
    ids = np.zeros((64, L, 2), dtype=np.int64)  # experts 0..2 of each layer only: all hits once loaded
    for t in range(64):
        ids[t, :, 0], ids[t, :, 1] = t % 3, (t + 1) % 3
    trace = RoutingTrace(ids, E)
    experts = open_experts(store, torch.bfloat16, "cpu", budget, "lru", None, ctx=64)
    out: dict[tuple[int, int], float] = {}
    try:
        model = load_model(store, dtype=torch.bfloat16, device="cpu", experts=experts, max_seq_len=64)
        model.setup_caches(64, torch.bfloat16, "cpu", slots=16)
        forced = force_routing(model, trace)
        experts.begin_sequence()
        gen = torch.Generator().manual_seed(0)
        for tokens, seqs in _SHAPES:
            per = tokens // seqs
            times = []
            for rep in range(_PASSES + 2):
                pos = 0 if per > 1 else 16 + rep
                segs = [(s, pos, per) for s in range(seqs)]
                forced.rows = [(rep + j) % 64 for j in range(tokens)]
                x = torch.randint(0, _TINY["vocab"], (tokens,), generator=gen)
                t0 = time.perf_counter()
                model.forward_batch(x, segs)
                times.append(time.perf_counter() - t0)
            out[(tokens, seqs)] = _best(times[2:])
        experts.end_sequence()
    finally:
        experts.close()
    return out


def probe_overhead(kernels: dict, families=OVERHEAD_FAMILIES, rounds: int = ROUNDS) -> dict[str, dict]:
    """{family: {"resident": [a, b, c], "offload": [a, b, c]}}: seconds per layer of a forward beyond its
    weights' products, ``a + b * sequences + c * tokens``, with every expert resident and behind the cache
    (each forward's time the fastest of ``rounds`` rounds over every family in turn, as the kernel probes)."""
    from engine.bench.synthetic import make_synthetic_model
    from engine.store.families import get_family

    kinds = (("resident", "100%"), ("offload", "75%"))
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moeinf-probe-") as tmp:
        roots = {}
        for family in families:
            try:
                fam = get_family(family)
            except Exception:  # noqa: BLE001 - a family this build lacks is simply not probed
                continue
            if fam.synthetic is None:
                continue
            roots[family] = make_synthetic_model(f"tiny-{family}", family, root=tmp, **_TINY)
        best: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
        for _ in range(max(1, rounds)):
            for family, root in roots.items():
                for kind, budget in kinds:
                    times = _tiny_forward_times(root, family, budget)
                    got = best.setdefault((family, kind), times)
                    for shape, t in times.items():
                        got[shape] = min(got[shape], t)
        for family in roots:
            out[family] = {kind: _fit_overhead(best[(family, kind)], kernels) for kind, _ in kinds}
    return out


def _tiny_compute(tokens: int, seqs: int, kernels: dict) -> float:
    """The weights' products of the tiny model's forward by the kernel rates (taken out of the overhead)."""
    k = kernels.get("bf16/bf16")
    if k is None:
        return 0.0
    h, i, L, E, top = _TINY["hidden"], _TINY["intermediate"], _TINY["num_layers"], _TINY["num_experts"], 2
    d = _TINY["head_dim"]
    attn = 2 * (h * d * _TINY["heads"] * 2 + h * d * _TINY["kv_heads"] * 2)
    expert = 3 * h * i * 2
    dense: Rates = k["dense"]
    total = L * dense.seconds(attn + 2 * E * h, tokens) + dense.seconds(2 * _TINY["vocab"] * h, seqs)
    if tokens == 1:
        r = k["experts"]["decode"]
        total += L * top * r.seconds(expert, 1)
    else:
        n = min(E, 3)  # the probe's routing uses experts 0..2
        total += L * n * k["experts"]["major"].seconds(expert, tokens * top / n)
    return total


def _fit_overhead(times: dict[tuple[int, int], float], kernels: dict) -> list[float]:
    L = _TINY["num_layers"]
    rows, ys = [], []
    for (tokens, seqs), s in times.items():
        rows.append([1.0, seqs, tokens])
        ys.append(max(0.0, s - _tiny_compute(tokens, seqs, kernels)) / L)
    coef, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(ys), rcond=None)
    a, b, c = (float(v) for v in coef)
    # a per-layer cost is never negative: refit without a term that came out below zero
    if b < 0 or c < 0:
        b, c = max(b, 0.0), max(c, 0.0)
        a = float(np.median([y - b * r[1] - c * r[2] for r, y in zip(rows, ys, strict=True)]))
    return [max(a, 0.0), b, c]


# -- memory: the last-level cache and the bandwidth beyond it --


def llc_bytes() -> int:
    """The CPU's last-level cache (sysfs), 32 MiB where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def probe_memory() -> dict:
    """{"llc_bytes", "dram_bps"}: bytes/s the kernels' pool reads from a buffer twice the last-level cache
    (at most 1 GiB): what a product streaming weights from memory can reach."""
    from cuda_ext.cpu import read_bandwidth

    llc = llc_bytes()
    n = min(1 << 30, 2 * llc)
    buf = torch.ones(n, dtype=torch.uint8)
    bps = read_bandwidth(buf, torch.get_num_threads())
    del buf
    return {"llc_bytes": int(llc), "dram_bps": float(bps)}


# -- loads: what the engine's own cache achieves, reading shards while it decodes --

_LOADS = dict(num_layers=2, num_experts=8, top_k=2, hidden=512, intermediate=1536, vocab=256, head_dim=64,
              heads=8, kv_heads=2)


def _load_run(root: Path, budget: str, batch: int, steps: int = 32) -> tuple[float, float, int]:
    """(seconds per decode step, stall seconds per step, loads per step) of ``steps`` decode steps of
    ``batch`` sequences, each step routed to fresh experts (so a budgeted cache misses). 32 steps: the per-load
    extra compute is a difference of two runs' medians spread over a few loads a step, and over 12 steps it
    came out anywhere between 0.3 and 1.6 ms a load from one probe to the next on the 2-core VM."""
    from engine.bench.forced import force_routing
    from engine.memory import open_experts
    from engine.model.loader import load_model
    from engine.store.opened import open_model
    from engine.trace.format import RoutingTrace

    store = open_model(root)
    L, E = _LOADS["num_layers"], _LOADS["num_experts"]
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, 2, replace=False) for _ in range(64 * L)]).reshape(64, L, 2)
    experts = open_experts(store, torch.bfloat16, "cpu", budget, "lru", None, ctx=64)
    try:
        model = load_model(store, dtype=torch.bfloat16, device="cpu", experts=experts, max_seq_len=64)
        model.setup_caches(64, torch.bfloat16, "cpu", slots=batch)
        forced = force_routing(model, RoutingTrace(ids, E))
        experts.begin_sequence()
        x = torch.zeros(batch, dtype=torch.long)
        times, stalls, loads = [], [], []
        for step in range(steps + 2):
            forced.rows = [(step * batch + i) % 64 for i in range(batch)]
            st = experts.stats()
            t0 = time.perf_counter()
            model.forward_batch(x, [(i, step, 1) for i in range(batch)])
            dt = time.perf_counter() - t0
            st2 = experts.stats()
            if step >= 2:
                times.append(dt)
                stalls.append(st2.stall_s - st.stall_s)
                loads.append(st2.demand_loads + st2.prefetch_loads - st.demand_loads - st.prefetch_loads)
        experts.end_sequence()
    finally:
        experts.close()
    return _median(times), _median(stalls), int(round(float(np.mean(loads))))


def probe_loads(home: Path, rounds: int = ROUNDS) -> dict:
    """The engine's expert loads against the disk probe: a small model whose every decode step routes to
    experts the cache does not hold, run one sequence at a time and eight at once, resident and with a
    budget. Per load: the stall (``load_s``) and the extra compute (``load_compute_s``: the step's time
    beyond the resident run's, less the stall: loaded experts are cold in the CPU's caches, and the
    loader's threads share the cores), with the shard's size; ``engine.bench.cost`` scales them to other
    sizes by the disk probe's read times."""
    from engine.bench.synthetic import make_synthetic_model

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="moeinf-loads-", dir=home) as tmp:
        root = make_synthetic_model("loads", "mixtral", root=tmp, **_LOADS)
        shard = next((root / "experts").rglob("*.safetensors")).stat().st_size
        out["shard_bytes"] = int(shard)
        got: dict[str, list[tuple[float, float]]] = {"decode": [], "stream": []}
        # rounds: each figure their mean (not the fastest, as the kernel probes take: a stall is a wait whose
        # length a bench averages over its steps, and the kernel probes' typical-pass factor does not cover it)
        for _ in range(max(1, rounds)):
            for batch, key in ((1, "decode"), (8, "stream")):
                res, _, _ = _load_run(root, "100%", batch)
                off, stall, loads = _load_run(root, "45%", batch)  # 7 slots: 2 of them stream slots
                loads = max(1, loads)
                got[key].append((stall / loads, max(0.0, off - res - stall) / loads))
        for key, runs in got.items():
            out[key] = {"load_s": _mean([r[0] for r in runs]), "load_compute_s": _mean([r[1] for r in runs])}
    return out

"""``moeinf bench``'s measurements: one configuration (batch x budget x policy) over several repetitions.

Each repetition opens the expert source and loads the model afresh (so load time and a cold expert
cache are measured every time) and closes them before the next (so memory does not grow with the
repetitions); it runs ``batch`` prompts of ``prompt_tokens`` random tokens each (time to first token: all of them
prefilled), then ``gen_tokens`` decode steps, each one token of every sequence in one forward pass
(greedy; EOS ignored). A step's time is the latency every sequence sees per token; ``batch`` tokens a
step is the aggregate throughput. Counters of the expert source are read between the phases, so hit
rate, bytes per token and stall share are those of the decode phase. With a routing trace
(``--replay``) every forward follows the trace (``engine.bench.forced``): sequence ``i`` of a batch of
``B`` replays it from token ``i * T // B`` on (wrapping round its ``T`` tokens), so the sequences of a
batch route like different requests; the whole run (prompt and decode) is compared with Belady's
optimum for the same accesses (each step the union of the batch's experts) and cache capacity; for a
batch, the optimum of a cache that may stream an expert through without keeping it, as the expert
cache does in a step of many tokens (``belady_bypass_loads``).

The bench never records activation traces: repetitions do not teach each other.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from engine.bench.forced import force_routing
from engine.store.opened import StoreModel
from engine.trace.format import RoutingTrace


@dataclass
class BenchConfig:
    budget: str  # as --expert-budget takes it: "100%", "25%", "2GiB", "auto"
    policy: str | None  # None for the all-resident run


@dataclass
class Rep:
    load_s: float
    ttft_s: float
    decode_s: list[float]  # per decode step (one token of every sequence of the batch)
    prompt_stats: dict
    decode_stats: dict  # counter deltas of the decode phase
    total_stats: dict  # counters of the whole repetition


@dataclass
class BenchRow:
    budget: str
    policy: str
    prompt_tokens: int
    gen_tokens: int
    batch: int = 1
    reps: list[Rep] = field(default_factory=list)
    slots: int = 0
    budget_bytes: int | None = None
    belady_loads: int | None = None
    oracle_loads: int | None = None
    expert_bytes: int = 0

    # medians over repetitions
    def _med(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def _spread(self, values: list[float]) -> float:
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    @property
    def load_s(self) -> float:
        return self._med([r.load_s for r in self.reps])

    @property
    def ttft_s(self) -> float:
        return self._med([r.ttft_s for r in self.reps])

    @property
    def ms_per_token(self) -> float:
        """Per-sequence latency: ms per decode step (each sequence gets one token a step)."""
        return 1e3 * self._med([statistics.mean(r.decode_s) for r in self.reps if r.decode_s])

    @property
    def ms_per_token_spread(self) -> float:
        return 1e3 * self._spread([statistics.mean(r.decode_s) for r in self.reps if r.decode_s])

    @property
    def decode_tps(self) -> float:
        """Aggregate decode throughput: tokens of every sequence per second."""
        return self.batch * 1e3 / self.ms_per_token if self.ms_per_token else float("nan")

    @property
    def prefill_tps(self) -> float:
        return self.batch * self.prompt_tokens / self.ttft_s if self.ttft_s else float("nan")

    def decode_counter(self, name: str) -> float:
        """Median over reps of a decode-phase counter, per decode step."""
        return self._med([r.decode_stats.get(name, 0) / max(1, len(r.decode_s)) for r in self.reps])

    def total_counter(self, name: str) -> float:
        return self._med([r.total_stats.get(name, 0) for r in self.reps])

    @property
    def hit_rate(self) -> float:
        vals = []
        for r in self.reps:
            acc = r.decode_stats.get("accesses", 0)
            vals.append(r.decode_stats.get("hits", 0) / acc if acc else 1.0)
        return self._med(vals)

    @property
    def stall_share(self) -> float:
        return self._med([r.decode_stats.get("stall_s", 0.0) / max(1e-9, sum(r.decode_s)) for r in self.reps])

    @property
    def disk_busy_share(self) -> float:
        """Share of the decode time in which at least one expert load was reading."""
        return self._med([r.decode_stats.get("disk_busy_s", 0.0) / max(1e-9, sum(r.decode_s)) for r in self.reps])

    @property
    def observed_bps(self) -> float:
        """The best rate at which the loader brought bytes in over a whole repetition (0 if none loaded)."""
        rates = [r.total_stats.get("bytes_loaded", 0) / (r.ttft_s + sum(r.decode_s)) for r in self.reps]
        return max(rates, default=0.0)

    @property
    def compute_s(self) -> float:
        """Per step decode time with the stalls taken out."""
        return self._med(
            [(sum(r.decode_s) - r.decode_stats.get("stall_s", 0.0)) / max(1, len(r.decode_s)) for r in self.reps]
        )


_COUNTERS = ("accesses", "hits", "demand_loads", "prefetch_loads", "prefetch_useful", "prefetch_wasted",
             "bytes_loaded", "stall_s", "disk_busy_s")


def _counters(experts) -> dict:
    if experts is None or not hasattr(experts, "stats"):
        return {}
    d = experts.stats().as_dict()
    return {k: d.get(k, 0) for k in _COUNTERS} | {"os_read_bytes": os_read_bytes(), "slots": d.get("slots", 0), "stream_slots": d.get("stream_slots", 0),
                                                  "budget_bytes": d.get("budget_bytes"), "slot_bytes": d.get("slot_bytes", 0)}


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in (*_COUNTERS, "os_read_bytes")}


def os_read_bytes() -> int:
    """Bytes this process read from storage, as the OS counts them (``read_bytes`` of /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _warm_all(experts, moe_layers: list[int], num_experts: int) -> None:
    """Bring every expert of an all-resident source into memory (part of its load time)."""
    for layer in moe_layers:
        for _ in experts.fetch(layer, list(range(num_experts))):
            pass


def batch_trace(trace: RoutingTrace, batch: int, tokens: int) -> tuple[list[int], RoutingTrace]:
    """Where each of ``batch`` sequences starts in ``trace`` (``i * T // batch``), and the accesses of
    ``tokens`` steps of them together: step t holds every sequence's experts at its own trace token
    ``(start + t) % T``, side by side ([tokens, L, batch * k]; for one sequence, the trace's first tokens)."""
    T = trace.num_tokens
    starts = [(i * T) // batch for i in range(batch)]
    rows = [[(o + t) % T for o in starts] for t in range(tokens)]
    ids = trace.expert_ids[rows]  # [tokens, batch, L, k]
    ids = ids.transpose(0, 2, 1, 3).reshape(tokens, trace.num_layers, -1)
    return starts, RoutingTrace(ids, trace.num_experts)


def _prefill_groups(batch: int, prompt_tokens: int, chunk: int = 512) -> list[list[int]]:
    """Sequences prefilled together: as many whole prompts a forward as fit ``chunk`` tokens (at least one)."""
    per = max(1, chunk // max(1, prompt_tokens))
    return [list(range(i, min(batch, i + per))) for i in range(0, batch, per)]


def bench_forwards(batch: int, prompt_tokens: int, gen_tokens: int, T: int, starts: list[int]) -> list[tuple[str, list[int], int]]:
    """A repetition's forwards in order: ``("prefill", rows, sequences)`` for each prefill group, then
    ``("decode", rows, batch)`` for each step; ``rows`` holds the trace token each of the forward's tokens
    replays (token ``j`` of sequence ``i`` replays trace token ``(starts[i] + j) % T``)."""
    out = [("prefill", [(starts[i] + j) % T for i in group for j in range(prompt_tokens)], len(group))
           for group in _prefill_groups(batch, prompt_tokens)]
    for step in range(gen_tokens):
        out.append(("decode", [(o + prompt_tokens + step) % T for o in starts], batch))
    return out


def _repetition(
    store: StoreModel, cfg: BenchConfig, prompts: list[torch.Tensor], starts: list[int], T: int, gen_tokens: int,
    ctx: int, dtype: torch.dtype, device: torch.device, trace: RoutingTrace | None, activations: str = "auto",
) -> tuple[Rep, dict]:
    """One repetition from a fresh expert source and model, closed before it returns (so the next
    repetition starts from the memory the first one did); the Rep and the final counters."""
    from engine.memory import open_experts
    from engine.model.loader import load_model

    layout = store.layout
    batch, prompt_tokens = len(prompts), int(prompts[0].shape[0])
    t0 = time.perf_counter()
    experts = open_experts(store, dtype, device, cfg.budget, cfg.policy, None, ctx=ctx)
    try:
        model = load_model(store, dtype=dtype, device=device, experts=experts, max_seq_len=ctx,
                           activations=activations)
        if batch > 1:
            model.setup_caches(ctx, dtype, device, slots=batch)
        before = _counters(experts)
        if before.get("budget_bytes") is None:
            _warm_all(experts, layout.moe_layers, layout.num_experts)
        forced = force_routing(model, trace) if trace is not None else None
        base = _counters(experts)
        load_s = time.perf_counter() - t0
        experts.begin_sequence()
        t1 = time.perf_counter()
        last = [0] * batch
        plan = bench_forwards(batch, prompt_tokens, gen_tokens, T, starts)
        groups = _prefill_groups(batch, prompt_tokens)
        for group, (_, rows, _) in zip(groups, plan, strict=False):
            if forced is not None:
                forced.rows = rows
            tokens = torch.cat([prompts[i] for i in group]).to(device)
            logits = model.forward_batch(tokens, [(i, 0, prompt_tokens) for i in group])
            for r, i in enumerate(group):
                last[i] = int(logits[r].argmax())
        ttft = time.perf_counter() - t1
        after_prompt = _counters(experts)
        tok = torch.tensor(last, device=device)
        times = []
        for step, (_, rows, _) in enumerate(plan[len(groups):]):
            pos = prompt_tokens + step
            if forced is not None:
                forced.rows = rows
            t = time.perf_counter()
            logits = model.forward_batch(tok, [(i, pos, 1) for i in range(batch)])
            tok = logits.argmax(dim=-1)
            times.append(time.perf_counter() - t)
        experts.end_sequence()
        end = _counters(experts)
    finally:
        experts.close()
    rep = Rep(load_s, ttft, times, _delta(after_prompt, base), _delta(end, after_prompt), _delta(end, base))
    return rep, end


def run_config(
    store: StoreModel,
    cfg: BenchConfig,
    *,
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
    dtype: torch.dtype,
    device: torch.device,
    trace: RoutingTrace | None = None,
    seed: int = 0,
    batch: int = 1,
    activations: str = "auto",
) -> BenchRow:
    ctx = prompt_tokens + gen_tokens + 1
    row = BenchRow(cfg.budget, cfg.policy or "-", prompt_tokens, gen_tokens, batch=batch)
    vocab = int(store.config.get("vocab_size") or store.manifest.get("vocab_size") or 1000)
    prompts = [
        torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed + i))
        for i in range(batch)
    ]
    starts, used = batch_trace(trace, batch, prompt_tokens + gen_tokens) if trace is not None else ([0] * batch, None)
    T = trace.num_tokens if trace is not None else 1
    for _ in range(reps):
        rep, end = _repetition(store, cfg, prompts, starts, T, gen_tokens, ctx, dtype, device, trace, activations)
        row.reps.append(rep)
        row.slots = int(end.get("slots") or 0) - int(end.get("stream_slots") or 0)
        row.budget_bytes = end.get("budget_bytes")
        row.expert_bytes = int(end.get("slot_bytes") or 0)
    if used is not None and row.budget_bytes is not None and row.slots > 0:
        from engine.policy.oracle import token_oracle_loads
        from engine.policy.replay import belady_bypass_loads, belady_loads

        # a batch's steps stream the experts the cache cannot keep: its optimum may stream them too
        row.belady_loads = belady_loads(used, row.slots) if batch == 1 else belady_bypass_loads(used, row.slots)
        # the token oracle knows one sequence's routing and rates: it has no meaning for a batch's union
        row.oracle_loads = token_oracle_loads(used, row.slots) if batch == 1 else None
    return row

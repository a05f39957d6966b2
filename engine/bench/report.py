"""``moeinf bench`` output: a markdown table in llama-bench's style, and JSON.

JSON schema (``moeinf bench --json``), version ``moeinf-bench/1``::

    {
      "schema": "moeinf-bench/1",
      "model": str, "family": str, "dtype": str, "device": str, "threads": int,
      "prompt_tokens": int, "gen_tokens": int, "repetitions": int,
      "replay": str | null,                  # trace file when routing was forced
      "probe": {"disk_bytes", "disk_s", "io", "observed_bps", "probe_gbps", "bandwidth_gbps"} | null,
                                             # --profile: probe, rate seen in the runs, the larger (used)
      "compute_ms_per_token": float | null,  # the hardware model's compute time (--profile; first batch size)
      "batches": [int],                      # the batch sizes (-b), rows in this order, each budget x policy
      "rows": [{
        "batch": int,                           # sequences decoded together (-b)
        "budget": str, "policy": str, "slots": int, "budget_bytes": int | null,
        "load_s": float, "ttft_s": float, "prefill_tps": float,   # prefill of every sequence of the batch
        "ms_per_token": float, "ms_per_token_std": float,         # per sequence: ms per decode step
        "decode_tps": float,                    # aggregate: tokens of all sequences per second
        "hit_rate": float, "bytes_per_token": float, "stall_share": float,
        "disk_busy_share": float,               # share of decode time with an expert load reading
        "loads_per_step": float,                # expert loads per decode step (all sequences together)
        "loads": int,                           # expert loads of the whole run (prompt + decode)
        "bytes_loaded": int,                    # bytes the loader read in that run (its own count)
        "os_read_bytes": int,                   # bytes the OS says this process read meanwhile (/proc/self/io)
        "belady_loads": int | null,             # --replay: Belady's optimum for the same tokens (batch > 1:
                                                #   with streaming allowed, engine.policy.replay.belady_bypass_loads)
        "oracle_loads": int | null,             # --replay: the token oracle's loads (engine/policy/oracle.py)
        "predicted_ms_per_token": float | null, # --profile: the hardware model's figure (per step)
        "limit_ms_per_token": float | null,     # --profile --replay: max(compute, Belady bytes / bandwidth)
        "reachable_ms_per_token": float | null, # --profile --replay: max(compute, oracle bytes / bandwidth)
        "forecast_tps": float | null,           # --profile: moeinf predict's decode t/s at this batch (aggregate),
        "forecast_band": [float, float] | null, #   its band, its prefill t/s and band (engine/bench/predict.py,
        "forecast_prefill_tps": float | null,   #   from headers + machine profile + routing model only)
        "forecast_prefill_band": [float, float] | null
      }]
    }

Times are medians over the repetitions; ``ms_per_token_std`` is their spread. ``compute_ms_per_token``
and the --profile figures are per decode step, from the all-resident row of the same batch size.
"""

from __future__ import annotations

from engine.bench.probe import Probe, limit_s, predicted_s
from engine.bench.runner import BenchRow


def row_dict(row: BenchRow, probe: Probe | None, compute_s: float | None) -> dict:
    loads = int(row.total_counter("demand_loads") + row.total_counter("prefetch_loads"))
    per_load = row.total_counter("bytes_loaded") / loads if loads else float(row.expert_bytes)
    d = {
        "batch": row.batch,
        "budget": row.budget,
        "policy": row.policy,
        "slots": row.slots,
        "budget_bytes": row.budget_bytes,
        "load_s": row.load_s,
        "ttft_s": row.ttft_s,
        "prefill_tps": row.prefill_tps,
        "ms_per_token": row.ms_per_token,
        "ms_per_token_std": row.ms_per_token_spread,
        "decode_tps": row.decode_tps,
        "hit_rate": row.hit_rate,
        "bytes_per_token": row.decode_counter("bytes_loaded") / row.batch,
        "stall_share": row.stall_share,
        "disk_busy_share": row.disk_busy_share,
        "loads_per_step": row.decode_counter("demand_loads") + row.decode_counter("prefetch_loads"),
        "loads": loads,
        "bytes_loaded": int(row.total_counter("bytes_loaded")),
        "os_read_bytes": int(row.total_counter("os_read_bytes")),
        "belady_loads": row.belady_loads,
        "oracle_loads": row.oracle_loads,
        "predicted_ms_per_token": None,
        "limit_ms_per_token": None,
        "reachable_ms_per_token": None,
        "forecast_tps": None,
        "forecast_band": None,
        "forecast_prefill_tps": None,
        "forecast_prefill_band": None,
    }
    if probe is not None and compute_s is not None:
        demand = row.decode_counter("demand_loads") * per_load
        prefetch = row.decode_counter("prefetch_loads") * per_load
        d["predicted_ms_per_token"] = 1e3 * predicted_s(compute_s, demand, prefetch, probe.bandwidth)
        tokens = row.prompt_tokens + row.gen_tokens
        for key, ref_loads in (("limit_ms_per_token", row.belady_loads), ("reachable_ms_per_token", row.oracle_loads)):
            if ref_loads is not None:
                d[key] = 1e3 * limit_s(compute_s, ref_loads * per_load / tokens, probe.bandwidth)
    return d


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def markdown(meta: dict, rows: list[dict]) -> str:
    """A llama-bench style table, one row per configuration."""
    p, n = meta["prompt_tokens"], meta["gen_tokens"]
    batched = any(r.get("batch", 1) != 1 for r in rows)
    head = ["model", *(["batch"] if batched else []), "budget", "policy", "load s", f"pp{p} t/s", f"tg{n} t/s", "ms/tok", "hit %", "MB/tok",
            "stall %", "loads"]
    replay = any(r["belady_loads"] is not None for r in rows)
    profile = any(r["predicted_ms_per_token"] is not None for r in rows)
    if replay:
        head += ["Belady loads", "loads/Belady", "oracle/Belady"]
    if profile:
        head += ["pred ms/tok"]
        if replay:
            head += ["limit ms/tok", "ms/limit", "ms/reachable"]
    forecast = any(r.get("forecast_tps") is not None for r in rows)
    if forecast:
        head += ["fc pp t/s", "pp/fc", "pp in band", "fc tg t/s", "tg/fc", "tg in band"]
    if batched:
        head.insert(head.index("loads") + 1, "loads/step")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i > 2 else "---" for i in range(len(head))) + "|"]
    for r in rows:
        cells = [
            meta["model"], *([str(r["batch"])] if batched else []), r["budget"], r["policy"], _f(r["load_s"], ".2f"), _f(r["prefill_tps"], ".1f"),
            _f(r["decode_tps"], ".2f") + " ± " + _f(1e3 / r["ms_per_token"] ** 2 * r["ms_per_token_std"], ".2f"),
            _f(r["ms_per_token"], ".1f"), _f(100 * r["hit_rate"], ".1f"), _f(r["bytes_per_token"] / 1e6, ".1f"),
            _f(100 * r["stall_share"], ".1f"), str(r["loads"]),
        ]
        if batched:
            cells.append(_f(r["loads_per_step"], ".1f"))
        if replay:
            b = r["belady_loads"]
            o = r["oracle_loads"]
            cells += [str(b) if b is not None else "-", _f(r["loads"] / b if b else None, ".2f"),
                      _f(o / b if b and o is not None else None, ".2f")]
        if profile:
            cells += [_f(r["predicted_ms_per_token"], ".1f")]
            if replay:
                lim = r["limit_ms_per_token"]
                reach = r["reachable_ms_per_token"]
                cells += [_f(lim, ".1f"), _f(r["ms_per_token"] / lim if lim else None, ".2f"),
                          _f(r["ms_per_token"] / reach if reach else None, ".2f")]
        if forecast:
            fc, band = r.get("forecast_tps"), r.get("forecast_band")
            pfc, pband = r.get("forecast_prefill_tps"), r.get("forecast_prefill_band")
            inside = band is not None and band[0] <= r["decode_tps"] <= band[1]
            p_inside = pband is not None and pband[0] <= r["prefill_tps"] <= pband[1]
            cells += [_f(pfc, ".1f") + (f" ({pband[0]:.1f}..{pband[1]:.1f})" if pband else ""),
                      _f(r["prefill_tps"] / pfc if pfc else None, ".2f"), "yes" if p_inside else "no",
                      _f(fc, ".2f") + (f" ({band[0]:.2f}..{band[1]:.2f})" if band else ""),
                      _f(r["decode_tps"] / fc if fc else None, ".2f"), "yes" if inside else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

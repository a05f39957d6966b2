"""`moeinf predict`: whether a model fits with an expert budget, and how fast it will run, from headers alone."""

from __future__ import annotations

import json

import typer

from moeinf_cli.options import CTX, DEVICE, EXPERT_BUDGET, POLICY, with_options

HELP = """Forecast a model on this machine before downloading it: fit, decode and prefill speed, cold start.

MODEL is a store model, a checkpoint directory, a GGUF file, an alias or a hub repo (only config.json
and the safetensors headers are fetched, never the weights). The machine is probed once (disk,
memory, the kernels; one to two minutes on a quiet 2-core machine, longer on a busy one) and the
profile cached under $MOEINF_HOME; --reprobe measures again.

\b
Examples:
  moeinf predict mixtral --expert-budget 12GB
  moeinf predict Qwen/Qwen3-30B-A3B --expert-budget 25% --format q4_k --ctx 8192 --batch 8
  moeinf predict mixtral --expert-budget 12GB --json
"""


def _fmt_rate(x: float | None, band: list[float] | None = None) -> str:
    if x is None:
        return "-"
    text = f"{x:.2f} tok/s" if x < 100 else f"{x:.0f} tok/s"
    if band:
        text += f"  ({band[0]:.2f} .. {band[1]:.2f})"
    return text


def render(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from engine.memory.budget import fmt_bytes

    m, e, h = p["memory"], p["experts"], p["hit_rate"]
    t = Table(
        title=f"{p['model']} on {p['device']} ({p['format']} experts, {p['policy']})", show_header=False
    )
    t.add_column(style="bold")
    t.add_column()
    verdict = "[green]yes[/green]" if p["fits"] else "[red]no[/red]: " + "; ".join(p["reasons"])
    t.add_row("fits", verdict)
    t.add_row("dense weights", fmt_bytes(m["dense_bytes"]))
    t.add_row("expert budget", m["budget_note"])
    t.add_row(f"KV cache ({p['ctx']} tok x {p['batch']})", fmt_bytes(m["kv_bytes"]))
    t.add_row(
        f"headroom ({m['where']})",
        f"{fmt_bytes(m['headroom_bytes'])} of {fmt_bytes(m['available_bytes'])} "
        f"available (margin {fmt_bytes(m['margin_bytes'])})",
    )
    t.add_row(
        "expert slots",
        f"{e['slots']} of {e['total']} ({100 * e['resident_fraction']:.0f}% resident, "
        f"{fmt_bytes(e['bytes_each'])} each)",
    )
    t.add_row(
        "hit rate",
        f"{100 * h['expected']:.0f}%  ({100 * h['low']:.0f} .. {100 * h['high']:.0f}%; {h['source']})",
    )
    t.add_row("decode", _fmt_rate(p["decode_tps"], p["decode_tps_band"]))
    t.add_row(f"prefill ({p['prefill_tokens']} tok)", _fmt_rate(p["prefill_tps"], p.get("prefill_tps_band")))
    t.add_row(f"throughput at batch {p['batch']}", _fmt_rate(p["batch_tps"], p.get("batch_tps_band")))
    t.add_row("cold start", f"{p['cold_start_s']:.1f} s (load + first fill of the cache)")
    t.add_row("largest context", f"{p['max_ctx']} tokens")
    mc = p["machine"]
    t.caption = (
        f"machine: {mc['io']} reads {mc['disk_gbps']:.2f} GB/s, {mc['read_latency_ms']:.2f} ms latency; "
        f"decode {mc['decode_gbps']:.2f} GB/s of weights; prefill {mc['prefill_gflops']:.0f} GFLOP/s"
    )
    Console().print(t)


def _check_flags(expert_budget: str | None, policy: str | None, fmt: str | None, batch: int, ctx: int) -> None:
    """The flags' values, checked as the forecast checks them: a bad one is one line before any probing."""
    from engine.errors import MoeinfError
    from engine.formats import FORMATS
    from engine.memory.budget import parse_budget
    from engine.policy.registry import policy_class

    parse_budget(expert_budget or "auto")
    policy_class(policy)
    if fmt is not None and fmt.lower() not in FORMATS:
        raise MoeinfError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if batch < 1:
        raise MoeinfError(f"--batch must be at least 1 (got {batch})")
    if ctx < 1:
        raise MoeinfError(f"--ctx must be at least 1 token (got {ctx})")


def register(app: typer.Typer) -> None:
    @app.command("predict", help=HELP)
    @with_options(DEVICE, CTX, EXPERT_BUDGET, POLICY)
    def predict(
        model: str = typer.Argument(
            ..., metavar="MODEL", help="Store model, checkpoint, GGUF, alias or hub repo."
        ),
        batch: int = typer.Option(1, "--batch", "-b", help="Sequences decoded together (throughput line)."),
        fmt: str | None = typer.Option(
            None, "--format", metavar="FMT", help="Experts' tensor format, e.g. q4_k (default: as stored)."
        ),
        as_json: bool = typer.Option(
            False, "--json", help="Print the forecast as JSON (schema moeinf-predict/1)."
        ),
        reprobe: bool = typer.Option(False, "--reprobe", help="Measure the machine again."),
        *,
        device: str,
        ctx: int,
        expert_budget: str | None,
        policy: str | None,
    ) -> None:
        from engine.bench.machine import machine_profile
        from engine.bench.predict import Request
        from engine.bench.predict import predict as forecast
        from engine.bench.shape import read_shape

        shape = read_shape(model)
        _check_flags(expert_budget, policy, fmt, batch, ctx)  # before the profile, which can take minutes
        profile, measured = machine_profile(reprobe=reprobe)
        if measured and not as_json:
            typer.echo(
                f"machine profiled in {profile.measured_s:.0f} s (cached; --reprobe measures again)", err=True
            )
        req = Request(
            budget=expert_budget or "auto", device=device, batch=batch, ctx=ctx, fmt=fmt, policy=policy
        )
        result = forecast(shape, profile, req)
        if as_json:
            typer.echo(json.dumps(result, indent=1))
        else:
            render(result)

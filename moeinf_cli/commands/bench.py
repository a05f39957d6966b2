"""`moeinf bench`: latency over budgets and policies, trace replay, and the distance to the machine's limit."""

from __future__ import annotations

import json
import sys

import typer

from moeinf_cli.options import (
    ACTIVATIONS,
    BUDGET_FORMS,
    DEFAULT_POLICY,
    DEVICE,
    DTYPE,
    POLICY_NAMES,
    with_options,
)

HELP = """Benchmark a model: load time, time to first token, decode speed, expert-cache behaviour.

One row per configuration (each budget x each policy; a 100% budget is the all-resident run); by default
one configuration, the one `moeinf run` uses (budget auto, the default policy). Medians
over repetitions, printed as a llama-bench style markdown table (--json for the JSON schema of
engine/bench/report.py).

\b
Examples:
  moeinf bench mixtral -p 512 -n 128 --expert-budget 25%,50%,100% --policy lru,lfu,eam
  moeinf bench --synthetic mixtral-8x7b --scale 0.25 --expert-budget 100%,25% -p 16 -n 32
  moeinf bench --synthetic mixtral-8x7b --scale 0.25 --replay mixtral-trace.npz --expert-budget 100%,25% --profile
  moeinf bench --synthetic mixtral-8x7b --replay mixtral-trace.npz -p 1 -n 8 -b 1,8,32,64 --expert-budget 100%,25% --policy eam
"""


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in _split(text)]
    except ValueError:
        raise typer.BadParameter(f"-b takes comma-separated whole numbers, e.g. 1,8,32 (got {text!r})") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"-b takes batch sizes of at least 1, e.g. 1,8,32 (got {text!r})")
    return sizes


def register(app: typer.Typer) -> None:
    @app.command("bench", help=HELP)
    @with_options(DEVICE, DTYPE, ACTIVATIONS)
    def bench(
        model: str | None = typer.Argument(
            None, metavar="MODEL", help="Model name in the store (omit with --synthetic)."
        ),
        prompt_tokens: int = typer.Option(
            512, "-p", "--n-prompt", help="Prompt length in tokens (time to first token)."
        ),
        gen_tokens: int = typer.Option(128, "-n", "--n-gen", help="Tokens to decode (time per token)."),
        repetitions: int = typer.Option(
            3, "-r", "--repetitions", help="Runs per configuration; medians are reported."
        ),
        expert_budget: str = typer.Option(
            "auto",
            "--expert-budget",
            metavar="BUDGET,...",
            help=f"Comma-separated expert budgets, each {BUDGET_FORMS}.",
        ),
        policy: str = typer.Option(
            DEFAULT_POLICY,
            "--policy",
            metavar="POLICY,...",
            help=f"Comma-separated cache policies: {POLICY_NAMES}.",
        ),
        synthetic: str | None = typer.Option(
            None,
            "--synthetic",
            help="Benchmark a random-weight model of a real family's shape (created once in the store), e.g. mixtral-8x7b.",
        ),
        scale: float = typer.Option(
            0.25, "--scale", help="With --synthetic: width scale (hidden and intermediate sizes)."
        ),
        replay: str | None = typer.Option(
            None,
            "--replay",
            help="Force routing from a routing trace (.npz, docs/trace-format.md); adds Belady's optimum.",
        ),
        profile: bool = typer.Option(
            False,
            "--profile",
            help="Probe disk bandwidth and predict time per token from the counts (hardware model).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random prompt."),
        batch_sizes: str = typer.Option(
            "1",
            "-b",
            "--batch-size",
            metavar="N,...",
            help="Comma-separated batch sizes: sequences decoded together; tg t/s is then their aggregate, "
            "ms/tok each sequence's latency.",
        ),
        *,
        device: str,
        dtype: str | None,
        activations: str | None,
    ) -> None:
        from engine.bench.run import bench_main

        if (model is None) == (synthetic is None):
            raise typer.BadParameter("give a MODEL or --synthetic NAME (one of them)")
        result = bench_main(
            model=model,
            synthetic=synthetic,
            scale=scale,
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            repetitions=repetitions,
            budgets=_split(expert_budget),
            policies=_split(policy),
            replay=replay,
            profile=profile,
            dtype=dtype,
            device=device,
            seed=seed,
            batches=_batch_sizes(batch_sizes),
            activations=activations or "auto",
            progress=None if as_json else lambda msg: print(msg, file=sys.stderr),
        )
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            from engine.bench.report import markdown

            print(markdown(result, result["rows"]))
            if result.get("probe"):
                p = result["probe"]
                print(
                    f"\ndisk: {p['bandwidth_gbps']:.2f} GB/s ({p['io']}; probe {p['probe_gbps']:.2f}, seen in the runs "
                    f"{p['observed_bps'] / 1e9:.2f}); compute {result['compute_ms_per_token']:.1f} ms/step (batch {result['batches'][0]}); "
                    f"{result['threads']} threads"
                )

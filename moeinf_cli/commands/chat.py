"""`moeinf chat MODEL`: talk with a model in the terminal (the REPL of ``moeinf_cli.repl``)."""

from __future__ import annotations

from typing import Any

import typer

HELP = """Chat with a model in the terminal, as `ollama run MODEL` does.

Type a message and press Enter; the answer streams as it comes. \"\"\" begins and ends a message of
several lines. Commands: /? (help), /set parameter temperature 0, /set system "...", /set verbose,
/show info, /show stats, /load MODEL, /save chat.json, /clear, /bye. Ctrl+C stops an answer,
Ctrl+D leaves. Input history is kept in $MOEINF_HOME/history. With stdin not a terminal, each line
read is one message (or command).

\b
Examples:
  moeinf chat mixtral
  moeinf chat mixtral --system "Answer in one sentence." --expert-budget 25% --verbose
  printf 'Hi\\n/show info\\n' | moeinf chat mixtral --temperature 0
"""


def complete_model_name(incomplete: str) -> list[str]:
    """Shell completion of MODEL: the store's model names starting with what was typed."""
    from engine.store.manifest import store_names

    return [name for name in store_names() if name.startswith(incomplete)]


def chat(
    model: str = typer.Argument(..., help="A model in the store (see `moeinf list`) or a store directory.",
                                autocompletion=complete_model_name),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt for the conversation."),
    temperature: float | None = typer.Option(None, help="Sampling temperature; 0 always picks the likeliest token. (default 0.8)"),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k likeliest tokens (0: all). (default 40)"),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample from the smallest set of tokens whose probabilities sum to p. (default 0.9)"),
    min_p: float | None = typer.Option(None, "--min-p", help="Drop tokens less likely than min_p times the likeliest. (default 0.0)"),
    repeat_penalty: float | None = typer.Option(None, "--repeat-penalty", help="Penalty for repeating recent tokens (1: none). (default 1.1)"),
    repeat_last_n: int | None = typer.Option(None, "--repeat-last-n", help="How many recent tokens the penalty looks at (-1: whole context). (default 64)"),
    seed: int | None = typer.Option(None, help="Random seed, for answers that repeat. (default random)"),
    num_predict: int | None = typer.Option(None, "--num-predict", "-n", help="At most this many tokens per answer (-1: no limit). (default -1)"),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop the answer at this text (repeatable)."),
    ctx: int = typer.Option(4096, "--ctx", help="Context length in tokens (the whole conversation plus the answer)."),
    expert_budget: str | None = typer.Option(None, "--expert-budget", help="Fast memory for routed experts: a share (25%) or a size (2GB). (default auto: all of them when they fit)"),
    policy: str | None = typer.Option(None, "--policy", help="Expert cache policy: lru, lfu or eam (trace-driven). (default eam)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto (cuda when available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16 or float16. (default the stored dtype)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="After each answer, print timings and expert-cache figures."),
) -> None:
    from moeinf_cli.repl import run_repl

    sampling: dict[str, Any] = {
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n, "seed": seed,
        "num_predict": num_predict, "stop": list(stop) if stop else None,
    }
    load_kwargs = {"device": device, "dtype": dtype, "ctx": ctx, "expert_budget": expert_budget, "policy": policy}
    run_repl(model, load_kwargs, {k: v for k, v in sampling.items() if v is not None}, system=system,
             verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command("chat", help=HELP, no_args_is_help=True)(chat)

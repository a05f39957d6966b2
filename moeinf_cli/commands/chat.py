"""`moeinf chat MODEL`: talk with a model in the terminal (the REPL of ``moeinf_cli.repl``)."""

from __future__ import annotations

import typer

from moeinf_cli.options import LOAD, SAMPLING, SYSTEM, VERBOSE, Model, with_options

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


@with_options(SYSTEM, VERBOSE, load=LOAD, sampling=SAMPLING)
def chat(model: Model, *, system: str | None, verbose: bool, load: dict, sampling: dict) -> None:
    from moeinf_cli.repl import run_repl

    run_repl(model, load, sampling, system=system, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command("chat", help=HELP, no_args_is_help=True)(chat)

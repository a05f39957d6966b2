"""`moeinf run MODEL [PROMPT]`: stream one answer to stdout, or chat when no prompt is given.

The prompt comes from the argument, else from stdin when stdin is not a terminal; with neither, the
interactive chat of ``moeinf_cli.repl`` takes over. ``--verbose`` prints Ollama's timing lines (and
one expert-cache line) to stderr. Ctrl+C stops generation and exits with status 130.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from moeinf_cli.options import LOAD, SAMPLING, SYSTEM, VERBOSE, Model, with_options

HELP = """Run a model on a prompt and stream the answer (Ollama-style).

Without PROMPT, reads the prompt from stdin when it is piped, otherwise starts an interactive chat.

\b
Examples:
  moeinf run mixtral "Why is the sky blue?"
  moeinf run mixtral --temperature 0 -n 64 --verbose "Write a haiku about experts"
  echo "Summarise: ..." | moeinf run qwen3-30b-a3b --system "Answer in one sentence."
  moeinf run mixtral --expert-budget 25% --policy lru      # interactive chat
  moeinf run mixtral --batch prompts.jsonl --output out.jsonl --batch-size 16 --temperature 0
"""


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _read_stdin_prompt() -> str:
    """All of stdin as text, without the final newline(s) that `echo` and editors add."""
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", errors="replace").rstrip("\r\n")


def _load_with_spinner(engine: Any, model: str, verbose: bool, load_kwargs: dict) -> Any:
    """``engine.load`` with a spinner on stderr while it runs (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return engine.load(model, verbose=verbose, **load_kwargs)
    from rich.console import Console

    with Console(stderr=True).status(f"loading {model}", spinner="dots"):
        return engine.load(model, verbose=verbose, **load_kwargs)


def _stream(session: Any, prompt: str, raw: bool, system: str | None, sampling: dict, verbose: bool) -> int:
    """Print the answer as it comes; the exit status (130 on Ctrl+C)."""
    gen = session.generate(prompt, raw=raw, system=system, **sampling)
    out = sys.stdout
    last = "\n"
    stats = None
    try:
        for item in gen:
            if isinstance(item, str):
                out.write(item)
                out.flush()
                last = item[-1]
            else:
                stats = item
    except KeyboardInterrupt:
        gen.close()
        if last != "\n":
            out.write("\n")
        out.flush()
        return 130
    if last != "\n":
        out.write("\n")
    out.flush()
    if verbose and stats is not None:
        print(file=sys.stderr)
        for line in stats.summary_lines():
            print(line, file=sys.stderr)
    return 0


def _run(
    model: str,
    prompt: str | None,
    sampling: dict,
    load_kwargs: dict,
    system: str | None,
    raw: bool,
    verbose: bool,
) -> int:
    """The command's work; its exit status."""
    from engine.errors import MoeinfError

    if prompt is not None and not prompt.strip():
        raise MoeinfError("the prompt is empty; give some text, or leave PROMPT out to chat")
    if prompt is None and _stdin_is_terminal():
        from moeinf_cli.repl import run_repl

        run_repl(model, load_kwargs, sampling, system=system, verbose=verbose)
        return 0

    from engine.store.manifest import resolve_model

    resolve_model(model)  # an unknown model fails fast, before torch is imported
    from engine.runtime.sampling import SamplingParams

    SamplingParams.from_options(sampling)  # bad values: one error line before loading anything
    if prompt is None:
        prompt = _read_stdin_prompt()
        if not prompt.strip():
            raise MoeinfError("no prompt: stdin was empty; pass the prompt as an argument or pipe some text")

    import engine

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    with _load_with_spinner(engine, model, verbose, load_kwargs) as session:
        try:
            return _stream(session, prompt, raw, system, sampling, verbose)
        except BrokenPipeError:
            sys.stdout = None  # the reader went away (e.g. `| head`): not an error, nothing more to flush
            return 0


def register(app: typer.Typer) -> None:
    @app.command("run", help=HELP, no_args_is_help=True)
    @with_options(SYSTEM, VERBOSE, load=LOAD, sampling=SAMPLING)
    def run(
        model: Model,
        prompt: str | None = typer.Argument(
            None, metavar="PROMPT", help="The prompt. Omit it to read stdin or to chat."
        ),
        raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
        batch: Path | None = typer.Option(
            None,
            "--batch",
            metavar="PROMPTS",
            help="Run every prompt of this file, several at once (text: one a line; jsonl: prompt or messages, "
            "optional id, system, raw, options).",
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            metavar="OUT.jsonl",
            help="With --batch: the results, one JSON line per prompt in input order; a rerun resumes it. (default stdout)",
        ),
        batch_size: int = typer.Option(
            8,
            "--batch-size",
            metavar="N",
            help="With --batch: sequences decoded together (each a KV cache of --ctx tokens).",
        ),
        *,
        system: str | None,
        verbose: bool,
        load: dict,
        sampling: dict,
    ) -> None:
        if batch is None and output is not None:
            raise typer.BadParameter("--output goes with --batch PROMPTS")
        if batch is not None and prompt is not None:
            raise typer.BadParameter("give a PROMPT or --batch PROMPTS, not both")
        try:
            if batch is not None:
                from moeinf_cli.commands.run_batch import run_batch

                code = run_batch(model, batch, output, batch_size, sampling, load, system, raw, verbose)
            else:
                code = _run(model, prompt, sampling, load, system, raw, verbose)
        except (
            KeyboardInterrupt
        ):  # Ctrl+C outside generation (loading, tokenising): click would say "Aborted!"
            print(file=sys.stderr)
            code = 130
        if code:
            raise typer.Exit(code)

"""`moeinf trace ...`: record, show, remove, import and export a model's expert-routing traces.

Subcommands: ``record``, ``show``, ``rm``, ``import``, ``export``. ``moeinf trace MODEL --prompts FILE``
(no subcommand) is short for ``moeinf trace record MODEL --prompts FILE``; a model literally named
like a subcommand needs the long form.
"""

from __future__ import annotations

from pathlib import Path

import typer

from moeinf_cli.options import BUDGET_FORMS, DEVICE, Model, with_options
from moeinf_cli.plain_help import App, PlainGroup

SUBCOMMANDS = ("record", "show", "rm", "import", "export")


class _DefaultRecord(PlainGroup):
    """A group whose first argument, when it is not a subcommand, means ``record``."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["record", *args]
        return super().parse_args(ctx, args)


def read_prompts(path: Path) -> list:
    """Prompts of a file: text with one prompt per line, or JSON lines with "prompt" or "messages"
    (``engine.runtime.prompt_file``)."""
    from engine.runtime.prompt_file import read_prompt_file

    return [item.prompt for item in read_prompt_file(path)]


def register(app: typer.Typer) -> None:
    trace_app = App(
        cls=_DefaultRecord,
        help="Record and inspect expert-routing traces (they drive the default cache policy).\n\n\b\n"
        "Examples:\n  moeinf trace record mixtral --prompts prompts.txt\n  moeinf trace show mixtral --png heat.png\n"
        "  moeinf trace export mixtral mixtral.npz\n  moeinf trace import other.npz --model mixtral\n  moeinf trace rm mixtral",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.add_typer(trace_app, name="trace")

    @trace_app.command(
        "record",
        help="Run prompts through a model and record their routing (also: moeinf trace MODEL --prompts FILE).\n\n"
        "\b\nExample:\n  moeinf trace record mixtral --prompts prompts.txt --num-predict 32",
    )
    @with_options(DEVICE)
    def record(
        model: Model,
        prompts: Path = typer.Option(
            ..., "--prompts", "-p", help="Text (one prompt per line) or JSONL (prompt/messages)."
        ),
        num_predict: int = typer.Option(32, "--num-predict", "-n", help="Tokens to generate per prompt."),
        expert_budget: str = typer.Option(
            "100%",
            "--expert-budget",
            metavar="BUDGET",
            help=f"Expert cache budget while recording: {BUDGET_FORMS}.",
        ),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        *,
        device: str,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        import engine
        from engine.errors import MoeinfError
        from engine.trace.store import TraceStore

        items = read_prompts(prompts)
        import logging

        logging.getLogger("moeinf.trace").setLevel(logging.ERROR)  # a failed save is this command's error
        session = engine.load(model, device=device, expert_budget=expert_budget)
        recorder = getattr(session, "recorder", None)
        if recorder is None:
            session.close()
            raise MoeinfError(f"{model} has no routed experts (a dense model); there is nothing to trace")
        tokens = 0
        with session, Progress(
            TextColumn("[bold]tracing[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(model, total=len(items))
            for prompt in items:
                session.reset()
                for piece in session.generate(prompt, num_predict=num_predict, seed=seed, temperature=0.0):
                    if not isinstance(piece, str):
                        tokens += int(getattr(piece, "prompt_tokens", 0)) + int(
                            getattr(piece, "generated_tokens", 0)
                        )
                bar.advance(task)
                if recorder.save_error is not None:
                    from engine.errors import os_error
                    from engine.store.paths import traces_dir

                    where = traces_dir(getattr(recorder, "model_name", model))
                    raise os_error(recorder.save_error, f"saving the traces of {model} in {where}")
        stored = TraceStore(getattr(recorder, "model_name", model)).read()
        total = stored.collection.requests if stored else 0
        typer.echo(f"recorded {len(items)} prompts ({tokens} tokens); {total} requests stored for {model}")

    @trace_app.command(
        "show",
        help="Per-layer expert heat map and statistics of a model's traces.\n\n\b\nExamples:\n"
        "  moeinf trace show mixtral\n  moeinf trace show mixtral --phase decode --png heat.png",
    )
    def show(
        model: Model,
        png: Path | None = typer.Option(None, "--png", help="Also write the heat map as a PNG picture."),
        phase: str = typer.Option("all", "--phase", help="prefill, decode or all."),
    ) -> None:
        import numpy as np
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from engine.trace.heatmap import colours, digits, layer_stats, normalise, plot_png
        from engine.trace.interchange import heat, require

        stored = require(model)
        h = heat(stored, phase)
        coll = stored.collection
        console = Console(highlight=False)
        console.print(
            f"[bold]{model}[/bold]: {coll.requests} requests in {len(coll)} EAMs, "
            f"{int(coll.tokens[0])} prefill + {int(coll.tokens[1])} decode tokens, "
            f"{stored.num_layers} layers x {stored.num_experts} experts, top-{stored.top_k}; "
            f"{stored.raw_ids.shape[0]} tokens of routing kept"
        )
        width = max(8, console.width - 12)
        group = max(1, -(-stored.num_experts // width))
        cols = -(-stored.num_experts // group)
        padded = np.zeros((h.shape[0], cols * group), dtype=np.float64)
        padded[:, : h.shape[1]] = h
        binned = padded.reshape(h.shape[0], cols, group).sum(axis=2)
        label = f"experts 0..{stored.num_experts - 1}" + (f" ({group} per column)" if group > 1 else "")
        if console.is_terminal and console.color_system is not None:
            rgb = colours(normalise(binned))
            console.print(f"layer  {label}; brighter = more tokens (each layer scaled to its busiest expert)")
            for layer in range(h.shape[0]):
                line = Text(f"{layer:>5}  ")
                for c in range(cols):
                    r, g, b = (int(x) for x in rgb[layer, c])
                    line.append("█", style=f"rgb({r},{g},{b})")
                console.print(line)
        else:  # a pipe or a terminal without colour: digits carry the numbers
            console.print(f"layer  {label}; 0-9 = tenths of the layer's busiest expert's tokens, . = none")
            for layer, row in enumerate(digits(normalise(binned))):
                console.print(f"{layer:>5}  {row}", markup=False)
        table = Table("layer", "effective experts", "top expert share", "experts for 50%", "unused")
        for s in layer_stats(h):
            table.add_row(
                str(s.layer),
                f"{s.effective_experts:.1f}",
                f"{s.top_share:.1%}",
                str(s.half_cover),
                str(s.unused),
            )
        console.print(table)
        if png is not None:
            plot_png(png, h, f"{model}: expert routing per layer ({phase}, {coll.requests} requests)")
            console.print(f"wrote {png}")

    @trace_app.command(
        "rm", help="Delete a model's recorded traces.\n\n\b\nExample:\n  moeinf trace rm mixtral"
    )
    def rm(model: Model) -> None:
        from engine.errors import MoeinfError
        from engine.trace.store import TraceStore

        if not TraceStore(model).remove():
            raise MoeinfError(f"no traces for {model!r} to remove")
        typer.echo(f"removed traces of {model}")

    @trace_app.command(
        "import",
        help="Merge a routing trace in the interchange format (.npz, docs/trace-format.md) into a model's traces;"
        " a trace of another model shape is refused.\n\n\b\n"
        "Example:\n  moeinf trace import mixtral-humaneval.npz --model mixtral",
    )
    def import_(
        file: Path = typer.Argument(
            ..., help="Interchange .npz (docs/trace-format.md: expert_ids, num_experts, seq_starts, meta)."
        ),
        model: str = typer.Option(..., "--model", "-m", help="Store name the traces belong to."),
    ) -> None:
        from engine.trace.interchange import import_trace

        stored = import_trace(file, model, _stored_model_shape(model))
        typer.echo(
            f"imported {file} into {model}: {stored.collection.requests} requests in {len(stored.collection)} EAMs"
        )

    @trace_app.command(
        "export",
        help="Write a model's recorded routing in the interchange format (.npz, docs/trace-format.md).\n\n\b\n"
        "Example:\n  moeinf trace export mixtral mixtral.npz",
    )
    def export(
        model: Model,
        file: Path = typer.Argument(..., help="Output .npz path."),
    ) -> None:
        from engine.trace.interchange import export_traces

        trace = export_traces(model, file)
        typer.echo(f"wrote {file}: {trace.num_tokens} tokens in {len(trace.sequences())} sequences")


def _stored_model_shape(model: str) -> tuple[int, int, int] | None:
    """(MoE layers, experts, top-k) of ``model`` when it is in the store, else None."""
    import json

    from engine.store.families import moe_layout
    from engine.store.paths import model_dir

    config = model_dir(model) / "config.json"
    if not config.is_file():
        return None
    layout = moe_layout(json.loads(config.read_text()))
    return len(layout.moe_layers), layout.num_experts, layout.top_k

"""`moeinf pull SOURCE`: download (or read) a checkpoint and convert it into per-expert shards.

SOURCE is an alias (`moeinf pull --list-aliases`), a hub repo `org/name`, a local Hugging Face
checkpoint directory, or a `.gguf` file. Progress bars go to stderr; the last line (stdout) says where
the model is.
"""

from __future__ import annotations

import sys

import typer

from moeinf_cli.options import DTYPE_FORMS

HELP = """Download a model and convert it into the store (one shard per expert).

SOURCE is an alias (see --list-aliases), a Hugging Face repo org/name, a local checkpoint directory, or a .gguf file. An interrupted pull resumes where it stopped. Pulling a model again keeps it when every file is there with its size (`moeinf verify` re-hashes them) and pulls it again otherwise, or with --force. HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE are honoured.

\b
Examples:
  moeinf pull mixtral
  moeinf pull Qwen/Qwen1.5-MoE-A2.7B --revision main --dtype bf16 --name qwen-moe
  moeinf pull ./my-checkpoint --name mine
  moeinf pull SmolLM2-135M-Instruct.Q4_1.gguf --upcycle 8 --top-k 2
  moeinf pull ./my-checkpoint --quantize q4_k --quantize-dense q8_0
  moeinf pull --list-aliases
"""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _print_aliases() -> None:
    from engine.store.hub import ALIASES

    width = max(len(a) for a in ALIASES)
    typer.echo(f"{'ALIAS'.ljust(width)}  HUB REPO")
    for alias, repo in ALIASES.items():
        typer.echo(f"{alias.ljust(width)}  {repo}")


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _make_progress():
    """A PullProgress drawing one rich bar per step on stderr (only the messages when stderr is not a
    terminal). A step counts bytes (shown as sizes and a transfer rate) or items ("tokens", "layers")."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    from engine.store.pull import PullProgress

    console = Console(stderr=True)

    class Amount(ProgressColumn):
        """Bytes as DownloadColumn and TransferSpeedColumn show them; other units as counts."""

        def __init__(self) -> None:
            super().__init__()
            self.size, self.speed = DownloadColumn(), TransferSpeedColumn()

        def render(self, task):  # type: ignore[no-untyped-def]
            unit = task.fields.get("unit", "B")
            if unit == "B":
                return Text.assemble(self.size.render(task), " ", self.speed.render(task))
            total = f"/{_count(task.total)}" if task.total else ""
            return Text(f"{_count(task.completed)}{total} {unit}", style="progress.download")

    class RichPullProgress(PullProgress):
        def __init__(self) -> None:
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                Amount(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
                disable=not console.is_terminal,
            )
            self.downloads: dict[str, int] = {}

        def message(self, text: str) -> None:
            console.print(f"[dim]{text}[/dim]" if console.is_terminal else text, highlight=False, soft_wrap=True)

        def download(self, desc: str, n: int, total: int | None) -> None:
            key = (desc or "download").rsplit("/", 1)[-1]  # huggingface_hub passes "(…)<commit>/<file>"
            if key not in self.downloads:
                self.downloads[key] = self.bars.add_task(f"pulling {key}", total=total, unit="B")
            self.bars.advance(self.downloads[key], n)

        def task(self, description: str, total: int | None, *, done: int = 0, unit: str = "B"):  # type: ignore[no-untyped-def]
            task_id = self.bars.add_task(description, total=total, completed=done, unit=unit)
            return lambda n: self.bars.advance(task_id, n)

    return RichPullProgress()


def register(app: typer.Typer) -> None:
    @app.command("pull", help=HELP, no_args_is_help=True)
    def pull(
        source: str = typer.Argument(
            None, help="Alias, org/repo, checkpoint directory or .gguf file.", show_default=False
        ),
        revision: str = typer.Option(
            None, "--revision", "-r", help="Hub branch, tag or commit (default: main)."
        ),
        dtype: str = typer.Option(
            None, "--dtype", metavar="DTYPE", help=f"Store weights as {DTYPE_FORMS} (default: as the source)."
        ),
        name: str = typer.Option(None, "--name", "-n", help="Store name (default: the alias or repo name)."),
        upcycle: int = typer.Option(
            None, "--upcycle", help="Turn a dense llama model into a MoE of E copies of its FFN."
        ),
        top_k: int = typer.Option(None, "--top-k", help="Experts per token for --upcycle (default 2)."),
        quantize: str = typer.Option(
            None, "--quantize", metavar="FORMAT",
            help="Quantise the experts of a float source as they are stored (q8_0, q6_k, q5_k, q4_1, q4_0, q4_k, mxfp4).",
        ),
        quantize_dense: str = typer.Option(
            None, "--quantize-dense", metavar="FORMAT",
            help="Quantise the dense weight matrices too (routers stay float).",
        ),
        keep_download: bool = typer.Option(
            False,
            "--keep-download",
            help="Keep downloaded shards in the Hugging Face cache after converting.",
        ),
        list_aliases: bool = typer.Option(False, "--list-aliases", help="List the model aliases and exit."),
        force: bool = typer.Option(
            False, "--force", "-f", help="Pull again even when the store holds this model already."
        ),
    ) -> None:
        from engine.errors import MoeinfError

        if list_aliases:
            _print_aliases()
            return
        if not source:
            raise MoeinfError(
                "give a SOURCE to pull, e.g. `moeinf pull mixtral` (see `moeinf pull --list-aliases`)"
            )
        from engine.store.pull import pull_model

        if top_k is not None and upcycle is None:
            raise MoeinfError("--top-k only applies with --upcycle E")
        transform = None
        if upcycle is not None:
            from engine.upcycle import Upcycle

            transform = Upcycle(upcycle, top_k)
        progress = _make_progress()
        try:
            with progress.bars:
                result = pull_model(
                    source,
                    revision=revision,
                    dtype=dtype,
                    name=name,
                    keep_downloads=keep_download,
                    progress=progress,
                    transform=transform,
                    quantize=quantize,
                    quantize_dense=quantize_dense,
                    force=force,
                )
        except KeyboardInterrupt:
            print(
                "interrupted: run the same `moeinf pull` again to resume after the last finished step",
                file=sys.stderr,
            )
            raise typer.Exit(130) from None
        m = result.manifest
        experts = (
            f"{m['num_experts']} experts x {len(m['moe_layers'])} layers, top-{m['top_k']}"
            if m["num_experts"]
            else "dense"
        )
        verb = "up to date" if result.up_to_date else "pulled"
        print(
            f"{verb}: {result.name} ({m['family']}, {experts}, {m['dtype']}, {_human(m['total_bytes'])}) at {result.path}"
        )
        if result.up_to_date:
            print(
                f"(every file is there with its size; `moeinf verify {result.name}` re-hashes them, "
                "--force pulls again)",
                file=sys.stderr,
            )
        sys.stdout.flush()

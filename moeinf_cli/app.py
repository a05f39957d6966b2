"""Entry point of the ``moeinf`` command.

Each module in ``moeinf_cli/commands`` exposes ``register(app)`` and adds its command(s). Heavy
imports (torch, the engine) happen inside the commands, so ``moeinf --help`` stays fast.
Errors a user can cause arrive as ``engine.errors.MoeinfError`` and are printed as one line; so is an
``OSError`` from the environment (a read-only or full disk) that no command turned into one.
"""

from __future__ import annotations

import importlib
import sys

import typer

from engine import __version__
from engine.errors import MoeinfError
from moeinf_cli.plain_help import App

COMMAND_MODULES = ("pull", "models", "run", "chat", "serve", "export", "trace", "bench", "predict")

app = App(
    name="moeinf",
    help="Run Mixture-of-Experts language models larger than your GPU or RAM.\n\n"
    'Example: moeinf pull mixtral && moeinf run mixtral "Why is the sky blue?"',
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from cuda_ext import loader

        typer.echo(f"moeinf {__version__}")
        typer.echo(loader.describe())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Show the version and the kernels in use, and exit.",
    ),
) -> None:
    """Run Mixture-of-Experts language models larger than your GPU or RAM."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"moeinf_cli.commands.{_name}").register(app)


def _usage_line(err: Exception) -> str:
    """A usage error (bad flag value, unknown option, missing argument) as one line with the help hint."""
    ctx = getattr(err, "ctx", None)
    where = f"; see `{ctx.command_path} -h`" if ctx is not None else ""
    return f"Error: {err.format_message().rstrip('.')}{where}"  # type: ignore[attr-defined]


def main() -> None:
    try:
        from typer._click.exceptions import ClickException, UsageError  # typer >= 0.29 vendors click
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import ClickException, UsageError
    from typer import Abort

    try:
        code = app(prog_name="moeinf", standalone_mode=False)
    except MoeinfError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except UsageError as err:
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            print(_usage_line(err), file=sys.stderr)
        sys.exit(err.exit_code)
    except ClickException as err:
        print(f"Error: {err.format_message()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, Abort):
        print(file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # the environment (read-only or full disk, permissions) where no step named it
        from engine.errors import os_error

        print(f"Error: {os_error(err)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

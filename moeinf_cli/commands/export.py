"""`moeinf export MODEL DIR`: write a store model as a Hugging Face checkpoint (``engine.store.export``)."""

from __future__ import annotations

import typer

from moeinf_cli.options import Model

HELP = """Write a model of the store as a standard Hugging Face checkpoint directory.

The directory holds config.json, the tokenizer files and safetensors weights under the hub's tensor names, rebuilt from the store without downloading anything: transformers, vLLM and SGLang load it (see the README's "When one machine is not enough").

\b
Examples:
  moeinf export mixtral ./mixtral-hf
  vllm serve ./mixtral-hf --tensor-parallel-size 2 --enable-expert-parallel
"""


def export(
    model: Model,
    out_dir: str = typer.Argument(
        ..., metavar="DIR", help="A new (or empty) directory to write.", show_default=False
    ),
) -> None:
    from engine.store.export import export_model
    from engine.store.manifest import resolve_model

    resolve_model(model)  # an unknown model fails before anything is written
    count = 0

    def tick(_: str) -> None:
        nonlocal count
        count += 1

    out = export_model(model, out_dir, on_tensor=tick)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    typer.echo(f"exported {model} to {out} ({count} tensors, {size / 1e9:.2f} GB)")


def register(app: typer.Typer) -> None:
    app.command("export", help=HELP, no_args_is_help=True)(export)

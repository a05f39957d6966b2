"""`moeinf list`, `moeinf show NAME`, `moeinf rm NAME...`, `moeinf verify NAME`: the local model store."""

from __future__ import annotations

import time

import typer

from moeinf_cli.commands.pull import _human
from moeinf_cli.options import Model


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = s // n
            return f"{k} {unit}{'s' if k != 1 else ''} ago"
    return "just now"


def _experts(m: dict) -> str:
    return f"{m['num_experts']} top-{m['top_k']}" if m.get("num_experts") else "-"


def _source(m: dict) -> str:
    src = m.get("source", {})
    if src.get("kind") == "hub":
        return f"{src['repo']} @ {src.get('revision', 'main')} ({src.get('commit', '?')[:12]})"
    return f"{src.get('kind', '?')} {src.get('path', '?')}"


def register(app: typer.Typer) -> None:
    @app.command("list", help="List the models in the store.\n\n\b\nExample:\n  moeinf list")
    def list_models() -> None:
        from engine.store.manifest import MANIFEST, broken_models
        from engine.store.manifest import list_models as store_models
        from engine.store.paths import models_dir

        rows = [("NAME", "FAMILY", "SIZE", "EXPERTS", "MODIFIED")]
        now = time.time()
        for name, m in store_models():
            mtime = (models_dir() / name / MANIFEST).stat().st_mtime
            rows.append((name, m["family"], _human(m["total_bytes"]), _experts(m), _ago(now - mtime)))
        broken = broken_models()
        for name, _problem in broken:
            rows.append((name, "broken", "-", "-", "-"))
        rows[1:] = sorted(rows[1:])
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        for name, problem in broken:
            typer.echo(f"{name}: {problem}", err=True)

    @app.command(
        "show",
        help="Show a model's manifest summary.\n\n\b\nExamples:\n  moeinf show mixtral\n  moeinf show mixtral --json",
    )
    def show(
        name: Model,
        as_json: bool = typer.Option(False, "--json", help="Print the whole manifest.json."),
    ) -> None:
        import json

        from engine.store.manifest import read_manifest, resolve_model

        root = resolve_model(name)
        m = read_manifest(root)
        if as_json:
            typer.echo(json.dumps(m, indent=2))
            return
        lines = [
            ("name", m["name"]),
            ("path", str(root)),
            ("family", m["family"]),
            ("source", _source(m)),
            ("layers", str(m["num_layers"])),
        ]
        if m["num_experts"]:
            lines += [
                (
                    "experts",
                    f"{m['num_experts']} per MoE layer, top-{m['top_k']}, in layers "
                    f"{_ranges(m['moe_layers'])} ({m['num_experts'] * len(m['moe_layers'])} shards)",
                ),
                (
                    "expert size",
                    f"{_human(m['expert_bytes'])} each (intermediate {m['expert_intermediate_size']})",
                ),
            ]
        lines += _format_lines(m)
        lines += [
            ("hidden size", str(m["hidden_size"])),
            (
                "dtype",
                m["dtype"] + _dequantized_note(m.get("dequantized")),
            ),
            ("dense size", _human(m["dense_bytes"])),
            ("total size", f"{_human(m['total_bytes'])} in {len(m['files'])} files"),
            ("created", m["created"]),
        ]
        up = m["source"].get("upcycled")
        if up:
            lines.append(
                (
                    "note",
                    f"upcycled, not trained: {up['num_experts']} copies of the dense FFN, top-{up['top_k']}",
                )
            )
        width = max(len(k) for k, _ in lines)
        for k, v in lines:
            typer.echo(f"  {k.ljust(width)}  {v}")

    @app.command("rm", help="Delete models (and their recorded traces) from the store.\n\n\b\nExample:\n  moeinf rm mixtral")
    def rm(names: list[str] = typer.Argument(..., help="Store names.")) -> None:
        from engine.store.pull import remove_model

        for n in names:
            remove_model(n)
            typer.echo(f"deleted '{n}'")

    @app.command(
        "verify",
        help="Re-hash every file of a model and name the ones that changed.\n\n\b\nExample:\n  moeinf verify mixtral",
    )
    def verify(name: Model) -> None:
        from engine.errors import MoeinfError
        from engine.store.manifest import resolve_model
        from engine.store.verify import verify_model

        report = verify_model(resolve_model(name))
        for rel, what in report.bad:
            typer.echo(f"BAD  {rel}: {what}")
        if not report.ok:
            raise MoeinfError(
                f"{len(report.bad)} file(s) of {name} failed verification; `moeinf rm {name}` and pull it again"
            )
        typer.echo(f"{name}: all {report.checked} files verified")


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _dequantized_note(what: str | None) -> str:
    if not what:
        return ""
    source, _, stored = what.partition("->")
    return f" ({source} weights stored as {stored})" if stored else f" (dequantised from {source})"


def _format_lines(m: dict) -> list[tuple[str, str]]:
    """``moeinf show``'s tensor-format lines: the experts' formats, and the dense tensors by format."""
    from engine import formats

    def named(fmt: str) -> str:
        try:
            return f"{fmt} ({formats.get(fmt).bits_per_weight:g} bits/weight)"
        except ValueError:
            return fmt

    kinds = m.get("formats") or {}
    lines = []
    experts = kinds.get("experts") or {}
    weights = sorted({f for n, f in experts.items() if n.endswith(".weight")})
    if weights:
        lines.append(("expert format", ", ".join(named(f) for f in weights)))
    dense = kinds.get("dense") or {}
    if dense:
        counts: dict[str, int] = {}
        for f in dense.values():
            counts[f] = counts.get(f, 0) + 1
        lines.append(("dense formats", ", ".join(f"{named(f)} x {n}" for f, n in sorted(counts.items()))))
    return lines

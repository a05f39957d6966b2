"""`moeinf run MODEL --batch PROMPTS [--output OUT.jsonl] [--batch-size N]`: a throughput run.

Every prompt of PROMPTS (``engine.runtime.prompt_file``: text, or JSON lines with per-line options)
goes through one ``BatchSession``: up to N sequences decode together, a finished one's place goes to
the next prompt at once. One JSON line per prompt, in input order (``engine.runtime.batch_output``),
to OUT or to stdout; a rich progress bar on stderr shows prompts done and the aggregate tokens/s.
A rerun with the same OUT skips the prompts already in it; Ctrl+C leaves OUT valid (exit 130).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def _check_options(items: list, prompts: Path, sampling: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prompt's sampling options (the command line's, then its own line's); a bad one is an
    error naming its line, before anything is loaded."""
    from engine.errors import MoeinfError
    from engine.runtime.sampling import SamplingParams

    merged = []
    for item in items:
        opts = {**sampling, **item.options}
        try:
            SamplingParams.from_options(opts)
        except MoeinfError as e:
            raise MoeinfError(f"{prompts}:{item.line}: {e}") from None
        merged.append(opts)
    return merged


def run_batch(
    model: str,
    prompts: Path,
    output: Path | None,
    batch_size: int,
    sampling: dict[str, Any],
    load_kwargs: dict[str, Any],
    system: str | None,
    raw: bool,
    verbose: bool,
) -> int:
    """The command's work; its exit status."""
    from engine.errors import MoeinfError
    from engine.runtime.batch_output import ResultsFile, result_line
    from engine.runtime.prompt_file import read_prompt_file
    from engine.store.manifest import resolve_model

    if batch_size < 1:
        raise MoeinfError(f"--batch-size must be at least 1, got {batch_size}")
    items = read_prompt_file(prompts)
    options = _check_options(items, prompts, sampling)
    resolve_model(model)
    results = ResultsFile(output, items)
    todo = results.todo
    if not todo:
        print(f"all {len(items)} prompts are already in {output}; nothing to do", file=sys.stderr)
        results.close()
        return 0
    if len(todo) < len(items):
        print(
            f"resuming: {len(items) - len(todo)} of {len(items)} prompts already in {output}", file=sys.stderr
        )

    import engine
    from engine.runtime.batch import BatchSession

    session = engine.load(model, verbose=verbose, **load_kwargs)
    t0 = time.perf_counter()
    batch = BatchSession(session, max_batch=batch_size)
    finished = 0
    try:
        with results, _progress(len(items), len(items) - len(todo)) as bar:
            for item in todo:
                try:
                    batch.submit(
                        item.prompt,
                        raw=item.raw or raw,
                        system=item.system if item.system is not None else system,
                        id=item.index,
                        **options[item.index],
                    )
                except MoeinfError as e:  # this prompt cannot run (too long, empty): its line says why
                    results.add(result_line(item, error=str(e)))
                    finished += 1
                    bar.update(finished, batch.tokens_generated, time.perf_counter() - t0)
            while batch.busy:
                for ev in batch.step():
                    if ev.stats is not None:
                        results.add(result_line(items[ev.request.id], ev.request))
                        finished += 1
                bar.update(finished, batch.tokens_generated, time.perf_counter() - t0, len(batch.running))
    except KeyboardInterrupt:
        batch.close()
        where = (
            f"{len(results.done)} of {len(items)} prompts are in {output}; run the same command to resume"
            if output
            else "stopped"
        )
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    batch.close()
    elapsed = time.perf_counter() - t0
    tokens = batch.tokens_generated
    print(
        f"{len(todo)} prompts, {tokens} tokens generated in {elapsed:.1f} s: {tokens / max(elapsed, 1e-9):.2f} tokens/s "
        f"(batch size {batch_size}, {batch.steps} steps)" + (f"; results in {output}" if output else ""),
        file=sys.stderr,
    )
    if verbose and hasattr(session.experts, "stats"):
        print(f"expert cache: {session.experts.stats().summary_line()}", file=sys.stderr)
    return 0


class _progress:
    """A rich progress bar on stderr (prompts done, aggregate tokens/s, sequences running)."""

    def __init__(self, total: int, already: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.already = already
        self.bar = Progress(
            TextColumn("[bold]batch[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tps]} tokens/s"),
            TextColumn("{task.fields[running]} running"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("batch", total=total, completed=already, tps="-", running=0)

    def update(self, finished: int, tokens: int, elapsed: float, running: int = 0) -> None:
        tps = f"{tokens / elapsed:.2f}" if elapsed > 0 else "-"
        self.bar.update(self.task, completed=self.already + finished, tps=tps, running=running)

    def __enter__(self) -> _progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

"""The results file of ``moeinf run --batch``: JSON lines, one per prompt, in input order, resumable.

Each line is one finished prompt: ``index`` (its place among the file's prompts, from 0), ``id`` (when
the prompt line had one), ``prompt`` (text or messages, as given), ``response``, ``done_reason``
("stop", "length" or "error"), ``error`` (only on a prompt that could not run, e.g. longer than the
context), token counts (``prompt_tokens``, ``eval_count``) and timings in seconds (``queued_s``: waiting
for a place in the batch; ``prompt_eval_s``; ``eval_s``; ``total_s``: from its submission, at the
start of the run, to its last token).

Lines are written whole, each with one ``write`` on a file opened for appending, and only in input
order (a prompt that finishes before an earlier one waits in memory), so the file is always a valid
prefix of the results: Ctrl+C or a kill loses at most the prompts still running. Opening an existing
file resumes it: its valid lines are kept (a torn last line from a crash is cut off, the file rewritten
aside and renamed), their prompts are skipped, and a line whose prompt differs from the prompts file's
at that index is refused (the file belongs to other prompts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.errors import MoeinfError
from engine.runtime.prompt_file import PromptItem


class ResultsFile:
    """Append results of ``items`` to ``path`` in input order; ``done`` holds the indices already there.
    ``path`` None writes the lines to standard output (nothing to resume)."""

    def __init__(self, path: Path | str | None, items: list[PromptItem]):
        self.path = Path(path) if path is not None else None
        self.items = items
        self.done: set[int] = set()
        self._own_fd = self.path is not None
        if self.path is not None:
            self._read_existing()
        self._order = [it.index for it in items if it.index not in self.done]
        self._next = 0  # position in _order of the next line to write
        self._pending: dict[int, dict[str, Any]] = {}
        if self.path is None:
            self._fd = 1
            return
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise MoeinfError(f"cannot write {self.path} ({e.strerror}); choose another --output") from None

    @property
    def todo(self) -> list[PromptItem]:
        """The prompts still to run, in input order."""
        return [it for it in self.items if it.index not in self.done]

    def _read_existing(self) -> None:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise MoeinfError(f"cannot read {self.path} ({e.strerror}); choose another --output") from None
        keep: list[bytes] = []
        by_index = {it.index: it for it in self.items}
        torn = False
        for n, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                index = int(obj["index"])
            except (ValueError, KeyError, TypeError):
                torn = True  # a line cut short by a crash; everything after it is dropped too
                break
            item = by_index.get(index)
            if item is None or obj.get("prompt") != item.prompt:
                raise MoeinfError(
                    f"{self.path}:{n} holds the result of another prompt than prompt {index} of the prompts file; "
                    "use another --output (or delete this one to start over)"
                )
            self.done.add(index)
            keep.append(raw)
        if torn or (data and not data.endswith(b"\n")):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in keep))
            os.replace(tmp, self.path)

    def add(self, result: dict[str, Any]) -> int:
        """Hand in a finished prompt's result (with its ``index``); write every line now due. Returns
        how many lines were written."""
        self._pending[int(result["index"])] = result
        written = 0
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            line = json.dumps(self._pending.pop(self._order[self._next]), ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
            self.done.add(self._order[self._next])
            self._next += 1
            written += 1
        return written

    def close(self) -> None:
        """Close the file (results still waiting for an earlier prompt are not written). Idempotent."""
        if self._fd >= 0 and self._own_fd:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def result_line(item: PromptItem, request: Any = None, error: str | None = None) -> dict[str, Any]:
    """The output line of ``item`` from its finished ``BatchRequest`` (or the ``error`` that kept it from running)."""
    out: dict[str, Any] = {"index": item.index}
    if item.id is not None:
        out["id"] = item.id
    out["prompt"] = item.prompt
    if error is not None:
        out.update(response="", done_reason="error", error=error)
        return out
    st = request.stats
    out.update(
        response=request.response,
        done_reason=st.done_reason,
        prompt_tokens=st.prompt_tokens,
        eval_count=st.generated_tokens,
        queued_s=round(request.queued_s, 6),
        prompt_eval_s=round(st.prompt_eval_s, 6),
        eval_s=round(st.eval_s, 6),
        total_s=round(st.total_s, 6),
    )
    return out

"""The interactive chat of ``moeinf chat MODEL`` and ``moeinf run MODEL`` (no prompt, on a terminal).

Like Ollama's: ``>>> `` prompt, ``\"\"\"`` for multi-line input, slash commands (``/?``), answers
streamed as they come, a multi-turn conversation through the chat template. Ctrl+C stops an answer
(the text shown so far stays in the conversation as the assistant's turn; an answer stopped before
any text is dropped with its question); Ctrl+C at an empty prompt says how to leave; Ctrl+D or
``/bye`` leaves. When the conversation outgrows the context the oldest exchanges are dropped (the
system prompt stays) and the REPL says so.

Example::

    from moeinf_cli.repl import run_repl
    run_repl("mixtral", {"ctx": 4096, "expert_budget": "25%"}, {"temperature": 0.7}, system="Be brief.")
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from engine.errors import MoeinfError
from moeinf_cli.repl_commands import Command, CommandError, parse_command, strip_block
from moeinf_cli.repl_conversation import (
    Conversation,
    answer_reserve,
    fit_to_context,
    load_conversation,
    save_conversation,
)
from moeinf_cli.repl_info import (
    NO_LICENSE,
    NO_TEMPLATE,
    cache_delta,
    cache_snapshot,
    cache_stats,
    chat_template,
    info_lines,
    license_text,
    modelfile_lines,
    parameters_lines,
)
from moeinf_cli.repl_input import Interrupted, LineReader, Reader, TerminalReader
from moeinf_cli.repl_output import AnswerWriter

Loader = Callable[..., Any]


def history_path() -> Path:
    """The REPL's input history: ``$MOEINF_HOME/history``."""
    from engine.store.paths import moeinf_home

    return moeinf_home() / "history"


class StopRequest:
    """While active, the first Ctrl+C sets ``requested`` (the stream stops at the next piece); a second
    one raises KeyboardInterrupt at once. Only the main thread can own signal handlers."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def active(self) -> Iterator[StopRequest]:
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def typed_ahead_hidden(stream: TextIO) -> Iterator[None]:
    """While an answer streams, keys typed on the terminal are not echoed into it; they stay queued
    and appear at the next prompt. Ctrl+C still interrupts. No-op when ``stream`` is not a terminal."""
    try:
        import termios

        fd = stream.fileno()
        if not os.isatty(fd):
            raise OSError
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(saved)
    quiet[3] = quiet[3] & ~termios.ECHO  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class ChatRepl:
    """One interactive chat: the loaded session, the conversation, the settings the user changed."""

    def __init__(
        self,
        model_name: str,
        load_kwargs: Mapping[str, Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        system: str | None = None,
        verbose: bool = False,
        *,
        console: Console | None = None,
        err_console: Console | None = None,
        answer_stream: TextIO | None = None,
        loader: Loader | None = None,
        session: Any = None,
    ) -> None:
        self.model_name = model_name
        self.load_kwargs = dict(load_kwargs or {})
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.conversation = Conversation(system=system or None)
        self.verbose = verbose
        self.console = console or Console(highlight=False)
        self.err_console = err_console or Console(stderr=True, highlight=False)
        self.answer_stream = answer_stream or sys.stdout
        self.wordwrap = self.console.is_terminal
        # inputs saved to the history file (/set history, /set nohistory; MOEINF_NOHISTORY=1 starts with none)
        self.history = os.environ.get("MOEINF_NOHISTORY", "").strip().lower() in ("", "0", "false", "no")
        self._reader: Reader | None = None
        self._loader = loader
        self.session = session
        self.last_stats: Any = None
        self._stop = StopRequest()

    # ---- output --------------------------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.say(text, style="yellow")

    # ---- loading -------------------------------------------------------------------------

    def load(self, name: str | None = None, **overrides: Any) -> None:
        """Load ``name`` (default: the current model) with the load options plus ``overrides``; the
        current session is kept on failure. Raises MoeinfError on failure."""
        name = name or self.model_name
        kwargs = {**self.load_kwargs, **overrides}
        loader = self._loader
        if loader is None:
            import engine

            loader = engine.load
        if self.console.is_terminal:
            with self.console.status(f"Loading {name}...", spinner="dots"):
                session = loader(name, **kwargs)
        else:
            session = loader(name, **kwargs)
        previous, self.session = self.session, session
        self.model_name, self.load_kwargs = name, kwargs
        if previous is not None and hasattr(previous, "close"):
            previous.close()

    def close(self) -> None:
        """Release the loaded session (its expert cache, loader threads and files)."""
        session, self.session = self.session, None
        if session is not None and hasattr(session, "close"):
            session.close()

    # ---- the loop ------------------------------------------------------------------------

    def run(self, reader: Reader) -> None:
        """Read and handle inputs until /bye, Ctrl+D or the end of the input."""
        if self.session is None:
            self.load()
        self._reader = reader
        self._apply_history()
        while True:
            try:
                text = reader.read()
            except Interrupted as interrupted:
                if not interrupted.text.strip():
                    self.say("Use Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                return
            if not self.handle(text):
                return

    def handle(self, text: str) -> bool:
        """Handle one input (a message or a slash command); False when the user leaves."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith("/") and not stripped.startswith('"""'):
            try:
                command = parse_command(stripped)
            except CommandError as err:
                self.warn(str(err))
                return True
            return self.execute(command)
        message = strip_block(text)
        if message:
            self.ask(message)
        return True

    # ---- answering -----------------------------------------------------------------------

    def _count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.session.prompt_ids(messages))

    def ask(self, message: str) -> None:
        """Send ``message`` with the conversation so far and stream the answer."""
        ctx = int(self.session.ctx)
        trial = Conversation(self.conversation.system, list(self.conversation.turns))
        fit = fit_to_context(
            trial, message, self._count_tokens, ctx, answer_reserve(ctx, self.sampling.get("num_predict"))
        )
        if fit.prompt_tokens >= ctx:  # refused: the conversation stays as it was
            self.warn(
                f"This message needs {fit.prompt_tokens} tokens but the context holds {ctx}; "
                f"shorten it, /clear, or /set parameter num_ctx {_room_for(fit.prompt_tokens, ctx)}."
            )
            return
        self.conversation = trial
        if fit.dropped:
            self.warn(
                f"The conversation outgrew the context of {ctx} tokens: dropped the {fit.dropped} "
                f"oldest exchange(s). Use /clear to start afresh."
            )
        if not fit.fits:
            self.warn(
                f"Little room is left for the answer ({ctx - fit.prompt_tokens} tokens of {ctx}); "
                f"use /clear or /set parameter num_ctx {_room_for(fit.prompt_tokens, ctx)} for more."
            )
        messages = self.conversation.messages([{"role": "user", "content": message}])
        cache_before = cache_snapshot(self.session)
        try:
            stream = self.session.generate(messages, **self.sampling)
        except MoeinfError as err:
            self.warn(f"Error: {err}")
            return
        answer, stats, stopped = self._stream(stream)
        if stopped and not answer:
            return
        self.conversation.add_exchange(message, answer)
        if stats is not None:
            if getattr(stats, "cache", None) is not None:
                stats.cache = cache_delta(stats.cache, cache_before)  # this answer's figures, not the total
            self.last_stats = stats
            if stats.done_reason == "length" and stats.prompt_tokens + stats.generated_tokens >= ctx - 1:
                self.warn(
                    f"(the answer filled the context of {ctx} tokens; the oldest exchanges will be "
                    f"dropped next time, or use /clear)"
                )
            if self.verbose:
                for line in stats.summary_lines():
                    self.err_console.print(line, markup=False, highlight=False, soft_wrap=True)
                self.err_console.print()

    def _stream(self, stream: Iterator[Any]) -> tuple[str, Any, bool]:
        """Write the pieces as they come; (answer text, GenerationStats or None, stopped by Ctrl+C)."""
        width = self.console.width if (self.console.is_terminal and self.wordwrap) else None
        writer = AnswerWriter(self.answer_stream, width, sanitize=self.console.is_terminal)
        stats = None
        stopped = False
        status = self.console.status("", spinner="dots") if self.console.is_terminal else None
        with self._stop.active() as stop, typed_ahead_hidden(sys.stdin):
            try:
                if status is not None:
                    status.start()
                for item in stream:
                    if status is not None:
                        status.stop()
                        status = None
                    if stop.requested:  # Ctrl+C: what was not shown yet is dropped
                        stopped = True
                        break
                    if isinstance(item, str):
                        writer.write(item)
                    else:
                        stats = item
            except KeyboardInterrupt:
                stopped = True
            except MoeinfError as err:
                writer.finish()
                self.warn(f"Error: {err}")
                stopped = True
            finally:
                if status is not None:
                    status.stop()
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            stopped = stopped or stop.requested
        writer.finish()
        if stats is not None or stopped:
            self.answer_stream.write("\n")
            self.answer_stream.flush()
        return writer.text, stats, stopped and stats is None

    # ---- slash commands ------------------------------------------------------------------

    def execute(self, command: Command) -> bool:
        """Carry out one parsed slash command; False for /bye."""
        action, arg = command.action, command.arg
        if action == "bye":
            return False
        if action == "help":
            self.say(arg)
        elif action == "clear":
            self.conversation.clear()
            if hasattr(self.session, "reset"):
                self.session.reset()
            self.say("Cleared session context")
        elif action == "set_parameter":
            self._set_parameter(*arg)
        elif action == "set_system":
            self.conversation.system = arg
            self.say("Set system message.")
        elif action in ("set_verbose", "set_quiet"):
            self.verbose = action == "set_verbose"
            self.say(f"Set '{action.removeprefix('set_')}' mode.")
        elif action in ("set_wordwrap", "set_nowordwrap"):
            self.wordwrap = action == "set_wordwrap"
            self.say(f"Set '{action.removeprefix('set_')}' mode.")
        elif action in ("set_history", "set_nohistory"):
            self.history = action == "set_history"
            self._apply_history()
            self.say(f"Set '{action.removeprefix('set_')}' mode.")
        elif action == "show_info":
            self.say("\n".join(info_lines(self.session, self.load_kwargs)))
        elif action == "show_stats":
            self._show_stats()
        elif action == "show_parameters":
            self.say("\n".join(parameters_lines(self.sampling)))
        elif action == "show_system":
            self.say(self.conversation.system or "No system message was specified for this session.")
        elif action == "show_template":
            self.say(chat_template(self.session) or NO_TEMPLATE)
        elif action == "show_license":
            self.say(license_text(self.session) or NO_LICENSE)
        elif action == "show_modelfile":
            ctx = getattr(self.session, "ctx", None) or self.load_kwargs.get("ctx")
            self.say(
                "\n".join(
                    modelfile_lines(
                        self.model_name,
                        chat_template(self.session),
                        self.conversation.system,
                        self.sampling,
                        ctx,
                    )
                )
            )
        elif action == "load":
            self._load_command(arg)
        elif action == "save":
            self._save(arg)
        else:  # parse_command only makes the actions above
            raise AssertionError(f"unhandled command {action}")
        return True

    def _apply_history(self) -> None:
        """Tell the reader whether to save inputs to the history file (a plain line reader keeps none)."""
        set_history = getattr(self._reader, "set_history", None)
        if set_history is not None:
            set_history(self.history)

    def _set_parameter(self, name: str, value: Any) -> None:
        if name == "num_ctx":
            self.say(f"Loading {self.model_name} with a context of {value} tokens...")
            if not self._reload(self.model_name, ctx=value):
                return
        else:
            self.sampling[name] = value
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        self.say(f"Set parameter '{name}' to '{shown}'")

    def _show_stats(self) -> None:
        if self.last_stats is None:
            self.say("No answer yet: ask something first.")
            return
        lines = list(self.last_stats.summary_lines())
        total = cache_stats(self.session)
        if total is not None and hasattr(total, "summary_line"):
            lines.append(f"so far:               {str(total.summary_line()).removeprefix('experts: ')}")
        self.say("\n".join(lines))

    def _load_command(self, target: str) -> None:
        path = Path(target).expanduser()
        if target.endswith(".json") and not path.is_file():
            self.warn(f"Error: no conversation file {target} (/load NAME.json reads one written by /save)")
            return
        if target.endswith(".json"):
            try:
                model, conversation, params = load_conversation(path)
            except ValueError as err:
                self.warn(str(err))
                return
            if model and model != self.model_name:
                if not self._try_load(model):
                    return
            self.conversation = conversation
            self.sampling.update({k: v for k, v in params.items() if v is not None})
            if hasattr(self.session, "reset"):
                self.session.reset()
            self.say(f"Loaded conversation '{path}' ({conversation.exchanges} exchange(s))")
            return
        if self._try_load(target):
            self.conversation.clear()

    def _try_load(self, name: str) -> bool:
        self.say(f"Loading model '{name}'")
        return self._reload(name)

    def _reload(self, name: str, **overrides: Any) -> bool:
        """Load inside the REPL: an error or Ctrl+C leaves the current model in place."""
        try:
            self.load(name, **overrides)
        except MoeinfError as err:
            self.warn(f"Error: {err}")
            return False
        except KeyboardInterrupt:
            self.warn(f"Loading cancelled; still chatting with {self.model_name}.")
            return False
        return True

    def _save(self, target: str) -> None:
        try:
            path = save_conversation(Path(target), self.conversation, self.model_name, self.sampling)
        except OSError as err:
            self.warn(f"Error: cannot write {target}: {err.strerror or err}")
            return
        self.say(f"Saved conversation to {path}")


def _room_for(prompt_tokens: int, ctx: int) -> int:
    """The num_ctx to suggest: room for ``prompt_tokens`` and an answer as long (at least 256 tokens),
    rounded up to a multiple of 256, and more than ``ctx``."""
    need = prompt_tokens + max(256, prompt_tokens)
    return max(ctx + 256, -(-need // 256) * 256)


def run_repl(
    model_name: str,
    load_kwargs: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    system: str | None = None,
    verbose: bool = False,
    session: Any = None,
) -> None:
    """Chat with ``model_name`` until /bye or Ctrl+D.

    load_kwargs: ``engine.load`` options (device, dtype, ctx, expert_budget, policy); sampling: Ollama's
    sampling options the user set; ``session``: an already loaded Session (skips loading). A prompt
    with editing and history when stdin and stdout are terminals, plain lines from stdin otherwise.
    A model that fails to load raises MoeinfError.
    """
    if session is None:
        from engine.store.manifest import resolve_model

        resolve_model(model_name)  # an unknown model fails at once, before torch is imported
    from engine.runtime.sampling import SamplingParams

    SamplingParams.from_options(dict(sampling or {}))  # bad values: one error line before loading
    repl = ChatRepl(model_name, load_kwargs, sampling, system, verbose, session=session)
    if repl.session is None:
        repl.load()
    if sys.stdin.isatty() and sys.stdout.isatty():
        reader: Reader = TerminalReader(history_path())
    else:
        reader = LineReader(sys.stdin)
    try:
        repl.run(reader)
    finally:
        repl.close()

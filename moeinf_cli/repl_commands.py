"""Parsing of the REPL's input: slash commands, sampling parameters and ``\"\"\"`` multi-line blocks.

Pure functions, no I/O: ``parse_command("/set parameter temperature 0")`` returns a ``Command``;
a malformed command raises ``CommandError`` whose text is the one line the REPL prints.
The commands and their wording follow Ollama's interactive mode.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.runtime import MIN_CTX

TRIPLE_QUOTE = '"""'


class CommandError(ValueError):
    """A command the REPL cannot carry out; ``str(err)`` is the one-line message to print."""


@dataclass(frozen=True)
class Command:
    """One parsed slash command: ``action`` names what to do, ``arg`` carries its value (or None)."""

    action: str
    arg: Any = None


@dataclass(frozen=True)
class Parameter:
    """A sampling parameter settable with ``/set parameter NAME VALUE``."""

    name: str
    kind: str  # "int", "float" or "strings"
    help: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""

    def parse(self, words: list[str]) -> Any:
        """The value of ``words`` (the text after the name), or CommandError naming the expected form."""
        if not words:
            raise CommandError(
                f"Missing value for '{self.name}': use /set parameter {self.name} <{self.kind}>"
            )
        if self.kind == "strings":
            return list(words)
        if len(words) > 1:
            raise CommandError(
                f"Too many values for '{self.name}': use /set parameter {self.name} <{self.kind}>"
            )
        text = words[0]
        try:
            value: Any = int(text) if self.kind == "int" else float(text)
            if self.kind == "float" and not math.isfinite(value):
                raise ValueError(text)
        except ValueError:
            raise CommandError(
                f"Invalid value for '{self.name}': '{text}' is not a{'n' if self.kind == 'int' else ''} "
                f"{'integer' if self.kind == 'int' else 'number'}"
            ) from None
        if self.check is not None and not self.check(value):
            raise CommandError(f"Invalid value for '{self.name}': {text} ({self.requirement})")
        return value


PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in (
        Parameter("seed", "int", "Random number seed"),
        Parameter(
            "num_predict",
            "int",
            "Max number of tokens to predict (-1: until the model stops)",
            lambda v: v >= -1 and v != 0,
            "-1 or a positive number",
        ),
        Parameter("top_k", "int", "Pick from top k num of tokens (0: all)", lambda v: v >= 0, "0 or more"),
        Parameter(
            "top_p",
            "float",
            "Pick token based on sum of probabilities",
            lambda v: 0.0 <= v <= 1.0,
            "between 0 and 1",
        ),
        Parameter(
            "min_p",
            "float",
            "Pick token based on top token probability * min_p",
            lambda v: 0.0 <= v <= 1.0,
            "between 0 and 1",
        ),
        Parameter(
            "num_ctx",
            "int",
            "Set the context size (reloads the model)",
            lambda v: v >= MIN_CTX,
            f"{MIN_CTX} or more",
        ),
        Parameter(
            "temperature",
            "float",
            "Set creativity level (0: always the likeliest token)",
            lambda v: v >= 0.0,
            "0 or more",
        ),
        Parameter(
            "repeat_penalty",
            "float",
            "How strongly to penalize repetitions (1: not at all)",
            lambda v: v > 0.0,
            "more than 0",
        ),
        Parameter(
            "repeat_last_n",
            "int",
            "Set how far back to look for repetitions (-1: the whole context)",
            lambda v: v >= -1,
            "-1 or more",
        ),
        Parameter("stop", "strings", "Set the stop parameters"),
    )
}

SET_USAGE = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats"""

SHOW_USAGE = """Available Commands:
  /show info         Show details for this model and its expert cache
  /show license      Show model license
  /show modelfile    Show Modelfile for this session
  /show parameters   Show the parameters set in this session
  /show stats        Show the timings and cache figures of the last answer
  /show system       Show system message
  /show template     Show prompt template"""

SHOW_TOPICS = ("info", "license", "modelfile", "parameters", "stats", "system", "template")

SHORTCUTS_USAGE = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
   Alt + b            Move back (left) one word
   Alt + f            Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit moeinf (/bye)
  Up / Down           Previous / next input from the history"""

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a model (or a conversation saved with /save)
  /save <file>    Save your current conversation as JSON
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message."""


def parameters_usage() -> str:
    """The text ``/set parameter`` without arguments prints: every parameter with its type and meaning."""
    lines = ["Available Parameters:"]
    for p in PARAMETERS.values():
        form = f"/set parameter {p.name} <{'string> <string> ...' if p.kind == 'strings' else p.kind + '>'}"
        lines.append(f"  {form:<40} {p.help}")
    return "\n".join(lines)


def is_open_block(text: str) -> bool:
    """True while a ``\"\"\"`` block is still open: the text holds an odd number of triple quotes."""
    return text.count(TRIPLE_QUOTE) % 2 == 1


def strip_block(text: str) -> str:
    """A message typed as ``\"\"\"...\"\"\"``, without its quotes; other text unchanged (but stripped)."""
    stripped = text.strip()
    if stripped.startswith(TRIPLE_QUOTE):
        stripped = stripped[len(TRIPLE_QUOTE) :]
        if stripped.endswith(TRIPLE_QUOTE):
            stripped = stripped[: -len(TRIPLE_QUOTE)]
        return stripped.strip("\n")
    return stripped


def _unquote(text: str) -> str:
    """``text`` without one pair of surrounding triple or plain double quotes."""
    text = text.strip()
    for quote in (TRIPLE_QUOTE, '"'):
        if len(text) >= 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote) : -len(quote)].strip()
    return text


def _split_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def parse_command(line: str) -> Command:
    """Parse one line that starts with ``/``; raises CommandError for anything not understood."""
    text = line.strip()
    head, _, rest = text.partition(" ")
    if "\n" in head:
        head, _, more = head.partition("\n")
        rest = more + " " + rest
    rest = rest.strip()
    name = head.lower()
    if name in ("/?", "/help"):
        topic = rest.lower()
        if topic in ("", "help", "?"):
            return Command("help", HELP)
        if topic in ("shortcut", "shortcuts"):
            return Command("help", SHORTCUTS_USAGE)
        if topic in ("set", "/set"):
            return Command("help", SET_USAGE)
        if topic in ("show", "/show"):
            return Command("help", SHOW_USAGE)
        if topic in ("parameter", "parameters"):
            return Command("help", parameters_usage())
        raise CommandError(f"Unknown help topic '{rest}'. Type /? for help")
    if name in ("/bye", "/exit"):
        return Command("bye")
    if name == "/clear":
        return Command("clear")
    if name == "/set":
        return _parse_set(rest)
    if name == "/show":
        return _parse_show(rest)
    if name == "/load":
        words = _split_words(rest)
        if len(words) != 1:
            raise CommandError("Usage: /load <model> (a model name, or a .json file written by /save)")
        return Command("load", words[0])
    if name == "/save":
        words = _split_words(rest)
        if len(words) != 1:
            raise CommandError("Usage: /save <file> (writes the conversation as JSON)")
        return Command("save", words[0])
    raise CommandError(f"Unknown command '{head}'. Type /? for help")


def _parse_set(rest: str) -> Command:
    sub, _, value = rest.partition(" ")
    sub = sub.lower()
    if sub == "":
        return Command("help", SET_USAGE)
    if sub == "parameter":
        words = _split_words(value)
        if not words:
            return Command("help", parameters_usage())
        name = words[0].lower()
        param = PARAMETERS.get(name)
        if param is None:
            raise CommandError(f"Unknown parameter '{words[0]}'. Type /set parameter for the list")
        return Command("set_parameter", (name, param.parse(words[1:])))
    if sub == "system":
        system = _unquote(value)
        if not system:
            raise CommandError('Usage: /set system "<message>"  (or /set system """ for several lines)')
        return Command("set_system", system)
    simple = {
        "verbose": "set_verbose",
        "quiet": "set_quiet",
        "wordwrap": "set_wordwrap",
        "nowordwrap": "set_nowordwrap",
        "history": "set_history",
        "nohistory": "set_nohistory",
    }
    if sub in simple and not value.strip():
        return Command(simple[sub])
    raise CommandError(f"Unknown command '/set {sub}'. Type /? set for help")


def _parse_show(rest: str) -> Command:
    sub = rest.strip().lower()
    if sub == "":
        return Command("help", SHOW_USAGE)
    if sub in SHOW_TOPICS:
        return Command(f"show_{sub}")
    raise CommandError(f"Unknown command '/show {rest.strip()}'. Type /? show for help")

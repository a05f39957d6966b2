"""The options commands share are declared once, and help reads as plain placeholders."""

import re

import pytest
import typer
from typer.testing import CliRunner

from engine.store.hub import ALIASES
from moeinf_cli.app import app
from moeinf_cli.options import LOAD, SAMPLING, SYSTEM, VERBOSE

COMMANDS = ("pull", "list", "show", "rm", "verify", "run", "chat", "bench", "trace", "trace record", "trace show")


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_python_type_placeholders(command):
    text = help_text(command)
    for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<list[str]>", "<Path>", "{model}", "{name}"):
        assert placeholder not in text, f"{command} --help shows {placeholder}"
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert not re.search(r"[{}<>]", usage), usage


def test_usage_names_arguments_in_capitals():
    assert "Usage: moeinf run [OPTIONS] MODEL [PROMPT]" in help_text("run")
    assert "Usage: moeinf chat [OPTIONS] MODEL" in help_text("chat")
    assert re.search(r"--ctx\s+N\s", help_text("run"))


def _params(command: str) -> dict:
    click_app = typer.main.get_command(app)
    return {p.name: p for p in click_app.commands[command].params}


def test_run_and_chat_declare_the_same_options():
    run, chat = _params("run"), _params("chat")
    for opt in (*LOAD, *SAMPLING, SYSTEM, VERBOSE):
        a, b = run[opt.name], chat[opt.name]
        assert (a.opts, a.help, a.default) == (b.opts, b.help, b.default), opt.name


def test_bench_and_pull_list_dtypes_as_run_does():
    run, bench, pull = _params("run")["dtype"], _params("bench")["dtype"], _params("pull")["dtype"]
    assert run.help == bench.help
    spellings = re.search(r"bf16[^.(]*\([^)]*\)", run.help).group(0)
    assert spellings in pull.help


@pytest.mark.parametrize("command", ("run", "chat", "pull", "bench"))
def test_examples_name_real_aliases(command):
    examples = re.findall(rf"moeinf {command} (?:--synthetic )?([a-z][\w.:-]*)", help_text(command))
    assert examples
    synthetic = {"mixtral-8x7b"}
    for name in examples:
        assert name in ALIASES or name in synthetic or name.endswith(".gguf"), f"{command} example names {name}"


def test_groups_arrive_as_dicts_of_what_was_given(monkeypatch):
    import moeinf_cli.repl as repl

    calls = []
    monkeypatch.setattr(repl, "run_repl", lambda *a, **k: calls.append((a, k)))
    r = CliRunner().invoke(app, ["chat", "tiny", "--top-k", "5", "--stop", "x", "--stop", "y", "-s", "S", "-v"])
    assert r.exit_code == 0, r.output
    ((model, load, sampling), kwargs), = calls
    assert model == "tiny"
    assert load == {"device": "auto", "ctx": 4096}
    assert sampling == {"top_k": 5, "stop": ["x", "y"]}
    assert kwargs == {"system": "S", "verbose": True}

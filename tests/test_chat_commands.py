"""The REPL's slash-command parser, multi-line blocks and the streaming word-wrapper."""

import io

import pytest

from moeinf_cli.repl_commands import (
    HELP,
    PARAMETERS,
    SET_USAGE,
    SHORTCUTS_USAGE,
    SHOW_USAGE,
    Command,
    CommandError,
    is_open_block,
    parse_command,
    strip_block,
)
from moeinf_cli.repl_output import AnswerWriter


@pytest.mark.parametrize(
    "line, expected",
    [
        ("/bye", Command("bye")),
        ("/BYE", Command("bye")),
        ("/clear", Command("clear")),
        ("/?", Command("help", HELP)),
        ("/help", Command("help", HELP)),
        ("/? shortcuts", Command("help", SHORTCUTS_USAGE)),
        ("/set", Command("help", SET_USAGE)),
        ("/set parameter temperature 0", Command("set_parameter", ("temperature", 0.0))),
        ("/set parameter top_k 20", Command("set_parameter", ("top_k", 20))),
        ("/set parameter TOP_P 0.5", Command("set_parameter", ("top_p", 0.5))),
        ("/set parameter min_p 0.05", Command("set_parameter", ("min_p", 0.05))),
        ("/set parameter repeat_penalty 1.3", Command("set_parameter", ("repeat_penalty", 1.3))),
        ("/set parameter repeat_last_n -1", Command("set_parameter", ("repeat_last_n", -1))),
        ("/set parameter seed 42", Command("set_parameter", ("seed", 42))),
        ("/set parameter num_predict 16", Command("set_parameter", ("num_predict", 16))),
        ("/set parameter num_ctx 2048", Command("set_parameter", ("num_ctx", 2048))),
        (
            '/set parameter stop "<|im_end|>" "two words"',
            Command("set_parameter", ("stop", ["<|im_end|>", "two words"])),
        ),
        ('/set system "You are terse."', Command("set_system", "You are terse.")),
        ("/set system You are terse.", Command("set_system", "You are terse.")),
        ('/set system """Line one\nline two"""', Command("set_system", "Line one\nline two")),
        ("/set verbose", Command("set_verbose")),
        ("/set quiet", Command("set_quiet")),
        ("/set nowordwrap", Command("set_nowordwrap")),
        ("/set history", Command("set_history")),
        ("/set nohistory", Command("set_nohistory")),
        ("/set NOHISTORY", Command("set_nohistory")),
        ("/show info", Command("show_info")),
        ("/show stats", Command("show_stats")),
        ("/show parameters", Command("show_parameters")),
        ("/show system", Command("show_system")),
        ("/show template", Command("show_template")),
        ("/show license", Command("show_license")),
        ("/show modelfile", Command("show_modelfile")),
        ("/show Modelfile", Command("show_modelfile")),
        ("/show", Command("help", SHOW_USAGE)),
        ("/? show", Command("help", SHOW_USAGE)),
        ("/? set", Command("help", SET_USAGE)),
        ("/load qwen3:30b-a3b", Command("load", "qwen3:30b-a3b")),
        ("/save chat.json", Command("save", "chat.json")),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


def test_every_sampling_parameter_is_settable():
    assert set(PARAMETERS) == {
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repeat_penalty",
        "repeat_last_n",
        "seed",
        "num_predict",
        "stop",
        "num_ctx",
    }
    usage = parse_command("/set parameter").arg
    for name in PARAMETERS:
        assert f"/set parameter {name} " in usage


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("/foo", "Unknown command '/foo'. Type /? for help"),
        ("/set parameter warmth 3", "Unknown parameter 'warmth'"),
        ("/set parameter temperature hot", "'hot' is not a number"),
        ("/set parameter temperature -1", "0 or more"),
        ("/set parameter temperature nan", "not a number"),
        ("/set parameter top_k 2.5", "not an integer"),
        ("/set parameter top_p 1.5", "between 0 and 1"),
        ("/set parameter num_predict 0", "-1 or a positive number"),
        ("/set parameter seed", "Missing value for 'seed'"),
        ("/set parameter seed 1 2", "Too many values"),
        ("/set system", "Usage: /set system"),
        ("/set colour blue", "Unknown command '/set colour'"),
        ("/show licence", "Unknown command '/show licence'"),
        ("/set nohistory now", "Unknown command '/set nohistory'"),
        ("/load", "Usage: /load"),
        ("/save a b", "Usage: /save"),
        ("/? everything", "Unknown help topic"),
    ],
)
def test_bad_commands_give_one_line(line, fragment):
    with pytest.raises(CommandError) as err:
        parse_command(line)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_help_lists_every_set_and_show_command():
    for sub in ("parameter", "system", "history", "nohistory", "wordwrap", "nowordwrap", "verbose", "quiet"):
        assert f"/set {sub} " in SET_USAGE
        if sub not in ("parameter", "system"):  # these two take a value
            assert parse_command(f"/set {sub}").action.startswith("set_")
    for sub in ("info", "license", "modelfile", "parameters", "stats", "system", "template"):
        assert f"/show {sub} " in SHOW_USAGE
        assert parse_command(f"/show {sub}") == Command(f"show_{sub}")


def test_multiline_blocks():
    assert not is_open_block("hello")
    assert is_open_block('"""')
    assert is_open_block('"""first line\nsecond')
    assert not is_open_block('"""first line\nsecond\n"""')
    assert is_open_block('/set system """You are')
    assert strip_block('"""first line\nsecond\n"""') == "first line\nsecond"
    assert strip_block('"""one line"""') == "one line"
    assert strip_block("  plain  ") == "plain"


def test_answer_writer_wraps_whole_words_and_keeps_text():
    out = io.StringIO()
    w = AnswerWriter(out, width=12)
    for piece in ["The quick", " brown fox ju", "mps over the lazy", " dog.\nNew line", " here"]:
        w.write(piece)
    w.finish()
    text = out.getvalue()
    assert text == "The quick\nbrown fox\njumps over\nthe lazy\ndog.\nNew line\nhere\n"
    assert all(len(line) <= 12 for line in text.splitlines())
    assert w.text == "The quick brown fox jumps over the lazy dog.\nNew line here"


def test_answer_writer_keeps_indentation_and_cuts_long_words():
    out = io.StringIO()
    w = AnswerWriter(out, width=16)
    w.write("def f():\n    return 1\n")
    w.write("abcdefghijklmnopqrstu")
    w.finish()
    assert out.getvalue() == "def f():\n    return 1\nabcdefghijklmnop\nqrstu\n"


def test_answer_writer_without_width_is_plain():
    out = io.StringIO()
    w = AnswerWriter(out, width=None)
    w.write("a  b")
    w.write("\tc")
    w.finish()
    assert out.getvalue() == "a  b\tc\n"


def test_answer_writer_shows_control_characters_on_a_terminal():
    out = io.StringIO()
    w = AnswerWriter(out, width=None, sanitize=True)
    w.write("a\x1b[2Jb\rc\x07\x9bd\te\n")
    w.finish()
    assert out.getvalue() == "a\u241b[2Jb\u240dc\u2407\ufffdd\te\n"
    assert w.text == "a\x1b[2Jb\rc\x07\x9bd\te\n"  # the conversation keeps the model's text


def test_chat_help_shows_an_example():
    from typer.testing import CliRunner

    from moeinf_cli.app import app

    result = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "moeinf chat mixtral --system" in result.output
    for flag in ("--system", "--temperature", "--expert-budget", "--policy", "--ctx", "--verbose"):
        assert flag in result.output


def test_shell_completion_offers_store_names(tmp_path):
    import os
    import subprocess
    import sys

    for name in ("tiny-a", "tiny-b", "other"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "manifest.json").write_text("{}")
    env = dict(
        os.environ,
        MOEINF_HOME=str(tmp_path),
        _MOEINF_COMPLETE="complete_bash",
        COMP_WORDS="moeinf chat ti",
        COMP_CWORD="2",
    )
    out = subprocess.run(
        [sys.executable, "-c", "from moeinf_cli.app import app; app(prog_name='moeinf')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.split() == ["tiny-a", "tiny-b"], out.stderr

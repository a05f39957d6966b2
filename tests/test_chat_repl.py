"""The real REPL in a pseudo-terminal (pexpect) on a tiny Mixtral pulled into the store.

The tiny model's lm_head rows of its end-of-turn tokens are zeroed, so a greedy answer never ends
by itself (some other logit is always above 0): a "long answer" is guaranteed and Ctrl+C is what
ends it. Short answers are bounded with num_predict.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOAD_TIMEOUT = 180  # seconds: starting python, importing torch and loading, on a busy 2-core machine
ANSWER_TIMEOUT = 120
LICENSE = "Tiny test licence: use freely.\nSecond line of the licence.\n"
ANSWER_STARTED = re.compile(r"\x1b\[2K\s*[^\x1b\s]")  # the spinner line cleared, then answer text


@pytest.fixture(scope="module")
def chat_home(tmp_path_factory):
    """A MOEINF_HOME holding the tiny model "tiny" (with a LICENSE file), made once for this module."""
    from engine.store.pull import pull_model

    home = tmp_path_factory.mktemp("chat_home")
    ckpt = make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt"))
    weights = load_file(str(ckpt / "model.safetensors"))
    eos_ids = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    weights["lm_head.weight"][torch.tensor(eos_ids)] = 0.0
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "LICENSE").write_text(LICENSE)  # `moeinf pull` keeps it for /show license
    old = os.environ.get("MOEINF_HOME")
    os.environ["MOEINF_HOME"] = str(home)
    try:
        pull_model(str(ckpt), name="tiny")
    finally:
        if old is None:
            del os.environ["MOEINF_HOME"]
        else:
            os.environ["MOEINF_HOME"] = old
    return home


def spawn(home: Path, *args: str) -> pexpect.spawn:
    env = dict(os.environ, MOEINF_HOME=str(home), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "moeinf_cli", *args],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=ANSWER_TIMEOUT,
        dimensions=(40, 100),
    )
    child.expect_exact(">>> ", timeout=LOAD_TIMEOUT)
    return child


def enter(child: pexpect.spawn, text: str) -> None:
    child.send(text + "\r")  # a terminal sends CR for Enter


def test_chat_session_in_a_terminal(chat_home, tmp_path):
    child = spawn(
        chat_home,
        "chat",
        "tiny",
        "--num-predict",
        "24",
        "--ctx",
        "65536",
        "--system",
        "You are a tiny test model.",
    )
    try:
        enter(child, "Hello")
        child.expect_exact(">>> ")

        enter(child, "/set verbose")
        child.expect_exact("Set 'verbose' mode.")
        child.expect_exact(">>> ")
        enter(child, '"""What is')
        child.expect_exact("...")  # the continuation prompt of a """ block
        enter(child, '2+2?"""')
        child.expect_exact("eval count:           24 token(s)")
        child.expect_exact("expert cache:")
        child.expect_exact(">>> ")

        enter(child, "/set parameter temperature 0")
        child.expect_exact("Set parameter 'temperature' to '0.0'")
        child.expect_exact(">>> ")
        enter(child, "/set parameter num_predict 60000")  # minutes of tokens even on a fast machine
        child.expect_exact(">>> ")
        enter(child, "/set quiet")
        child.expect_exact(">>> ")

        enter(child, "Tell me a long story")
        child.expect(ANSWER_STARTED)
        assert child.expect_exact([">>> ", pexpect.TIMEOUT], timeout=1.5) == 1  # still answering
        interrupted_at = time.monotonic()
        child.sendintr()
        child.expect_exact(">>> ", timeout=30)
        assert time.monotonic() - interrupted_at < 30
        assert "Use Ctrl + d" not in child.before

        child.sendintr()  # Ctrl+C at an empty prompt
        child.expect_exact("Use Ctrl + d or /bye to exit.")
        child.expect_exact(">>> ")

        enter(child, "/set parameter num_predict 8")
        child.expect_exact(">>> ")
        enter(child, "And then?")
        child.expect_exact(">>> ")
        enter(child, "/frobnicate")
        child.expect_exact("Unknown command '/frobnicate'. Type /? for help")
        child.expect_exact(">>> ")
        saved = tmp_path / "chat.json"
        enter(child, f"/save {saved}")
        child.expect_exact("Saved conversation to")
        child.expect_exact(">>> ")
        enter(child, "/bye")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before

    data = json.loads(saved.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * 4
    contents = [m["content"] for m in data["messages"]]
    assert contents[0] == "You are a tiny test model."
    assert (
        contents[3] == "What is\n2+2?"
        and contents[5] == "Tell me a long story"
        and contents[7] == "And then?"
    )
    assert data["parameters"] == {"num_predict": 8, "temperature": 0.0}
    tok = Tokenizer.from_file(str(chat_home / "models" / "tiny" / "tokenizer.json"))
    partial = len(tok.encode(contents[6], add_special_tokens=False).ids)
    assert 0 < partial < 60000  # the long answer was cut by Ctrl+C and kept as the assistant's turn
    assert contents[8]  # the conversation went on after the interruption

    history = (chat_home / "history").read_text()
    for line in ("Hello", '+"""What is', '+2+2?"""', "Tell me a long story", "/bye"):
        assert line in history


def test_run_without_prompt_chats_and_ctrl_d_leaves(chat_home):
    child = spawn(chat_home, "run", "tiny", "-n", "4")  # `moeinf run` on a terminal hands over to the REPL
    try:
        enter(child, "/show info")
        child.expect_exact("family                mixtral")
        child.expect_exact("experts               8 per layer, top-2")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_show_template_license_modelfile_and_nohistory(chat_home):
    template = (chat_home / "models" / "tiny" / "chat_template.jinja").read_text().strip()
    assert (chat_home / "models" / "tiny" / "LICENSE").read_text() == LICENSE  # kept by the pull
    child = spawn(
        chat_home, "chat", "tiny", "--system", "You are tiny.", "--temperature", "0", "--ctx", "8192"
    )
    try:
        enter(child, "/show template")
        child.expect_exact(template.splitlines()[0])
        child.expect_exact(">>> ")
        enter(child, "/show license")
        child.expect_exact("Tiny test licence: use freely.")
        child.expect_exact("Second line of the licence.")
        child.expect_exact(">>> ")
        enter(child, "/show modelfile")
        child.expect_exact('# Modelfile generated by "/show modelfile"')
        child.expect_exact("FROM tiny")
        child.expect_exact('TEMPLATE """' + template.splitlines()[0])
        child.expect_exact('SYSTEM """You are tiny."""')
        child.expect_exact("PARAMETER num_ctx 8192")
        child.expect_exact("PARAMETER temperature 0.0")
        child.expect_exact(">>> ")
        enter(child, "/set nohistory")
        child.expect_exact("Set 'nohistory' mode.")
        child.expect_exact(">>> ")
        enter(child, "/show system")  # typed after /set nohistory: not saved
        child.expect_exact("You are tiny.")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    history = (chat_home / "history").read_text()
    assert "+/show modelfile\n" in history and "+/set nohistory\n" in history
    assert "+/show system\n" not in history

"""`moeinf run` end to end on a tiny pulled model: streaming, stdin, --verbose lines, errors, Ctrl+C."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import typer
from runtime_store import pull_tiny
from typer.testing import CliRunner

import engine
from engine.errors import MoeinfError

OPTS = ["--temperature", "0", "--repeat-penalty", "1", "-n", "12"]
OLLAMA_LINES = [
    r"total duration:       \d[\dhmsµn.]*s",
    r"load duration:        \d[\dhmsµn.]*s",
    r"prompt eval count:    \d+ token\(s\)",
    r"prompt eval duration: \d[\dhmsµn.]*s",
    r"prompt eval rate:     \d+\.\d\d tokens/s",
    r"eval count:           12 token\(s\)",
    r"eval duration:        \d[\dhmsµn.]*s",
    r"eval rate:            \d+\.\d\d tokens/s",
    r"expert cache:         .*hit rate.*",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home, root, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("run"), name="tiny")
    return home, root


def cli(home, *args, stdin=subprocess.DEVNULL, input=None):
    env = {**os.environ, "MOEINF_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "moeinf_cli", "run", *args], capture_output=True, text=True,
                          env=env, stdin=None if input is not None else stdin, input=input, timeout=300)


def expected(root, prompt, **kw):
    s = engine.load(root, ctx=4096)
    items = list(s.generate(prompt, temperature=0, repeat_penalty=1.0, num_predict=12, **kw))
    return "".join(items[:-1])


def test_run_streams_answer_and_verbose_lines(store):
    home, root = store
    r = cli(home, "tiny", "Why is the sky blue?", *OPTS, "--verbose")
    assert r.returncode == 0, r.stderr
    want = expected(root, "Why is the sky blue?")
    assert r.stdout == want + ("" if want.endswith("\n") else "\n")
    lines = [ln for ln in r.stderr.splitlines() if re.match(r"^[a-z ]+:\s", ln) and "budget" not in ln
             and not ln.startswith("loading")]
    assert len(lines) == len(OLLAMA_LINES), r.stderr
    for line, pattern in zip(lines, OLLAMA_LINES, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert "Traceback" not in r.stderr


def test_prompt_from_stdin(store):
    home, root = store
    r = cli(home, "tiny", *OPTS, "--system", "Be brief.", input="Tell me a story\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected(root, "Tell me a story", system="Be brief.").rstrip("\n")
    assert r.stderr == ""


def test_unknown_model_is_one_line_error(store):
    home, _ = store
    r = cli(home, "no-such-model", "hi")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("Error: ") and "moeinf pull" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_cleanly_with_130(tmp_path):
    # an answer that cannot end by itself (EOS rows zeroed, greedy): the signal always lands mid-generation
    home, _, _ = pull_tiny("mixtral", tmp_path, name="tiny", endless=True)
    env = {**os.environ, "MOEINF_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-m", "moeinf_cli", "run", "tiny", "Once upon a time", "--temperature",
                          "0", "--ctx", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env)
    try:
        first = p.stdout.read(1)  # generation has started
        assert first
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert b"Traceback" not in err


# In-process (CliRunner) for the remaining paths: fast, same command function.
def invoke(home, monkeypatch, *args, input=None):
    from moeinf_cli.app import app

    monkeypatch.setenv("MOEINF_HOME", str(home))
    return CliRunner().invoke(app, ["run", *args], input=input)


def test_raw_and_stop(store, monkeypatch):
    home, root = store
    r = invoke(home, monkeypatch, "tiny", "Hello there", "--raw", *OPTS)
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == expected(root, "Hello there", raw=True).rstrip("\n")
    full = expected(root, "Hello there", raw=True)
    stop = full[4:7]
    r = invoke(home, monkeypatch, "tiny", "Hello there", "--raw", *OPTS, "--stop", stop)
    assert r.exit_code == 0
    assert r.stdout.rstrip("\n") == full[: full.index(stop)].rstrip("\n")


def test_prompt_too_long_states_both_numbers(store, monkeypatch):
    home, _ = store
    r = invoke(home, monkeypatch, "tiny", "The quick brown fox jumps over the lazy dog", "--ctx", "8")
    assert isinstance(r.exception, MoeinfError)
    assert re.search(r"prompt is \d+ tokens but the context holds 8", str(r.exception))


def test_device_cuda_without_cuda(store, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    home, _ = store
    r = invoke(home, monkeypatch, "tiny", "hi", "--device", "cuda")
    assert isinstance(r.exception, MoeinfError) and "CUDA is not available" in str(r.exception)


def test_empty_stdin_and_bad_option(store, monkeypatch):
    home, _ = store
    r = invoke(home, monkeypatch, "tiny", input="  \n")
    assert isinstance(r.exception, MoeinfError) and "no prompt" in str(r.exception)
    r = invoke(home, monkeypatch, "tiny", "hi", "--top-p", "2")
    assert isinstance(r.exception, MoeinfError) and "top_p" in str(r.exception)


def test_no_prompt_on_terminal_hands_over_to_repl(store, monkeypatch):
    home, _ = store
    calls = []
    import moeinf_cli.repl as repl
    from moeinf_cli.commands import run as run_cmd

    monkeypatch.setattr(repl, "run_repl", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(run_cmd, "_stdin_is_terminal", lambda: True)
    app = typer.Typer()
    run_cmd.register(app)
    r = CliRunner().invoke(app, ["tiny", "--temperature", "0.5", "--system", "S", "--expert-budget", "50%"])
    assert r.exit_code == 0, r.output
    (args, kwargs), = calls
    assert args[0] == "tiny" and args[2] == {"temperature": 0.5}
    assert args[1]["expert_budget"] == "50%" and kwargs["system"] == "S"


def test_all_resident_cache_line_says_what_happened(store):
    home, _ = store
    r = cli(home, "tiny", "hi", *OPTS, "--verbose")  # the default budget (auto) holds every expert here
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("expert cache:"))
    assert re.search(r"all 16 resident, [\d.]+ [KMG]iB read at load \([\d.]+ s\)", line), line
    assert "demand" not in line and "prefetch" not in line

"""`moeinf run MODEL --batch PROMPTS`: results in input order equal to single runs, per-line options,
resume, a torn last line repaired, a mismatched output refused, errors on a line, Ctrl+C leaves OUT valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from runtime_store import pull_tiny
from typer.testing import CliRunner

import engine
from engine.errors import MoeinfError
from engine.runtime.batch_output import ResultsFile
from engine.runtime.prompt_file import read_prompt_file

PROMPTS = [
    "Hello there",
    "A much longer prompt about many things at once",
    "x",
    "Why is the sky blue?",
    "Bye",
]
OPTS = ["--temperature", "0", "--repeat-penalty", "1", "-n", "10"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home, root, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("runb"), name="tiny")
    return home, root


def expected(root, prompt, n=10, **kw):
    s = engine.load(root, ctx=4096)
    items = list(s.generate(prompt, temperature=0, repeat_penalty=1.0, num_predict=n, **kw))
    return "".join(items[:-1])


def invoke(home, monkeypatch, *args):
    from moeinf_cli.app import app

    monkeypatch.setenv("MOEINF_HOME", str(home))
    return CliRunner().invoke(app, ["run", *args])


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_batch_results_equal_single_runs_in_order(store, tmp_path, monkeypatch):
    home, root = store
    src = tmp_path / "p.jsonl"
    rows = [{"prompt": p} for p in PROMPTS]
    rows[1]["options"] = {"num_predict": 4}  # per-line option: ends early while the others go on
    rows[2] = {"messages": [{"role": "user", "content": "x"}], "id": "m"}
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    r = invoke(
        home, monkeypatch, "tiny", "--batch", str(src), "--output", str(out), "--batch-size", "3", *OPTS
    )
    assert r.exit_code == 0, r.output
    got = lines(out)
    assert [g["index"] for g in got] == [0, 1, 2, 3, 4]
    assert got[2]["id"] == "m" and got[2]["prompt"] == rows[2]["messages"]
    for g, p in zip(got, PROMPTS, strict=True):
        want = expected(root, p, n=4 if g["index"] == 1 else 10)
        assert g["response"] == want
        assert g["eval_count"] == (4 if g["index"] == 1 else 10) and g["done_reason"] == "length"
        assert g["total_s"] >= g["eval_s"] >= 0 and g["prompt_tokens"] > 0
    assert "tokens/s" in r.stderr
    # a rerun has nothing left to do
    r = invoke(home, monkeypatch, "tiny", "--batch", str(src), "--output", str(out), *OPTS)
    assert r.exit_code == 0 and "already in" in r.stderr
    assert len(lines(out)) == 5


def test_resume_repairs_torn_line_and_runs_the_rest(store, tmp_path, monkeypatch):
    home, root = store
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    items = read_prompt_file(src)
    first = {"index": 0, "prompt": PROMPTS[0], "response": "kept as it was", "done_reason": "stop"}
    out.write_text(json.dumps(first) + "\n" + '{"index": 1, "prompt": "Hello th')  # a crash mid-line
    r = invoke(
        home, monkeypatch, "tiny", "--batch", str(src), "--output", str(out), "--batch-size", "2", *OPTS
    )
    assert r.exit_code == 0, r.output
    got = lines(out)
    assert got[0] == first and [g["index"] for g in got] == [0, 1, 2, 3, 4]
    assert got[3]["response"] == expected(root, PROMPTS[3])
    assert len(ResultsFile(out, items).todo) == 0


def test_output_of_other_prompts_is_refused(store, tmp_path, monkeypatch):
    home, _ = store
    src = tmp_path / "p.txt"
    src.write_text("one\ntwo\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "prompt": "something else", "response": ""}) + "\n")
    r = invoke(home, monkeypatch, "tiny", "--batch", str(src), "--output", str(out), *OPTS)
    assert isinstance(r.exception, MoeinfError) and "another prompt" in str(r.exception)
    assert "something else" in out.read_text()  # left as it was


def test_errors_name_the_line(store, tmp_path, monkeypatch):
    home, _ = store
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": "bad", "options": {"temprature": 0}}\n')
    r = invoke(home, monkeypatch, "tiny", "--batch", str(src), *OPTS)
    assert isinstance(r.exception, MoeinfError) and f"{src}:2" in str(r.exception)
    assert "temprature" in str(r.exception)
    src.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(MoeinfError, match=r"p.jsonl:2 has neither"):
        read_prompt_file(src)
    r = invoke(home, monkeypatch, "tiny", "some prompt", "--batch", str(src))
    assert r.exit_code != 0 and "not both" in r.output


def test_prompt_too_long_gets_an_error_line(store, tmp_path, monkeypatch):
    home, root = store
    src = tmp_path / "p.txt"
    src.write_text("short one\n" + "word " * 300 + "\nanother\n")
    out = tmp_path / "o.jsonl"
    r = invoke(home, monkeypatch, "tiny", "--batch", str(src), "-o", str(out), "--ctx", "128", *OPTS)
    assert r.exit_code == 0, r.output
    got = lines(out)
    assert got[1]["done_reason"] == "error" and "context" in got[1]["error"]
    assert got[2]["response"] == expected(root, "another")


def test_ctrl_c_leaves_output_valid(tmp_path):
    home, _, _ = pull_tiny("mixtral", tmp_path, name="tiny", endless=True)
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"prompt number {i}" for i in range(40)) + "\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "MOEINF_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "moeinf_cli",
        "run",
        "tiny",
        "--batch",
        str(src),
        "-o",
        str(out),
        "--batch-size",
        "2",
        "--temperature",
        "0",
        "-n",
        "6",
    ]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert b"Traceback" not in err and b"resume" in err
    got = lines(out)  # every line whole
    n = len(got)
    assert 3 <= n < 40 and [g["index"] for g in got] == list(range(n))
    r = subprocess.run(cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [g["index"] for g in lines(out)] == list(range(40))

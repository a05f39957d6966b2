"""Every class of user error of issue 17 ends in one `Error:` line, a non-zero exit, no traceback, and a
store that still verifies (the cases are in ``fault_cases.py``; ``scripts/fault_injection.py`` runs the
same cases as separate processes)."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
from fault_cases import OTHER, build_base, can_wrap, cases, judge, prepare, run_subprocess

CASES = cases()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    build_base(root)
    return root


def run_main(argv: list[str], stdin: bytes, monkeypatch) -> tuple[int, str, str]:
    """`moeinf argv` through the CLI's own ``main`` in this process: (exit status, stdout, stderr)."""
    from moeinf_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "argv", ["moeinf", *argv])
    monkeypatch.setattr(sys, "stdin", fake_stdin)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # anything main lets through is what a user would see as a traceback
            import traceback

            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.klass}: {c.name}" for c in CASES])
def test_user_error_is_handled(case, base, tmp_path, monkeypatch):
    if case.wrap:
        if not can_wrap():
            pytest.skip("needs a mount namespace (unshare -rm) for a read-only or full home")
        outcome = run_subprocess(case, base, tmp_path)
        assert outcome.problem is None, (outcome.problem, outcome.stderr[-2000:])
        return
    home, argv, env, stdin = prepare(case, base, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, stdout, stderr = run_main(argv, stdin, monkeypatch)
    monkeypatch.setenv("MOEINF_HOME", str(home))
    verify_code, _, verify_err = run_main(["verify", OTHER], b"", monkeypatch)
    problem = judge(case, code, stdout, stderr, home, verify_code == 0)
    assert problem is None, (problem, stderr[-2000:], verify_err[-500:])

"""Run the user errors of issue 17 end to end against the `moeinf` CLI and count the handled ones.

Each case (``tests/fault_cases.py``) damages a fresh copy of a small store (a tiny random Mixtral pulled
twice) or its inputs, runs one `moeinf` command as a separate process, and is handled when the outcome
is what a user should see: a one-line ``Error: ...`` with a non-zero exit and no traceback (or, for
text that is not UTF-8 and a listing with one broken model, a normal answer), and the other model still
verifies. Cases that need a mount namespace (read-only home, full disk) run under ``unshare -rm`` and
are left out, and said so, where it is not available.

    .venv/bin/python scripts/fault_injection.py            # all cases; -k WORD runs those whose name has WORD
    .venv/bin/python scripts/fault_injection.py -v         # also print stderr's first line for each case
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_cases import build_base, can_wrap, cases, run_subprocess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the cases whose name contains this text")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the first stderr line of each case")
    args = parser.parse_args()
    wrap_ok = can_wrap()
    chosen = [c for c in cases() if args.k.lower() in c.name.lower()]
    tried = handled = skipped = 0
    with tempfile.TemporaryDirectory(prefix="moeinf-faults-") as tmp:
        base = Path(tmp)
        print(f"building the store in {base} ...", file=sys.stderr)
        build_base(base)
        for i, case in enumerate(chosen):
            if case.wrap and not wrap_ok:
                skipped += 1
                print(f"skip  {case.klass:15} {case.name} (no `unshare -rm` here)")
                continue
            work = base / f"case-{i}"
            work.mkdir()
            outcome = run_subprocess(case, base, work)
            tried += 1
            handled += outcome.problem is None
            mark = "ok  " if outcome.problem is None else "FAIL"
            print(f"{mark}  {case.klass:15} {case.name}" + (f": {outcome.problem}" if outcome.problem else ""))
            if args.verbose or outcome.problem:
                first = (outcome.stderr.strip().splitlines() or [""])[0]
                print(f"        exit {outcome.code}; stderr: {first[:160]}")
            sys.stdout.flush()
    print(f"\n{tried} tried, {handled} handled" + (f" ({skipped} skipped: no mount namespace)" if skipped else ""))
    return 0 if tried == handled else 1


if __name__ == "__main__":
    sys.exit(main())

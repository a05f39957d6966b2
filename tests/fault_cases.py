"""The user errors of issue 17 as data: each case damages a copy of a small store (or its inputs), runs
one `moeinf` command, and says what a handled outcome is.

Handled means: for an error case, a non-zero exit, a first stderr line that begins ``Error:``, no
traceback anywhere, and the store otherwise unchanged (``verify`` passes on the model the case did not
touch); for an "ok" case (text that is not UTF-8, a listing with one broken model), exit 0, no traceback,
and the case's own check. ``tests/test_user_errors.py`` runs every case in-process through the CLI's
``main``; ``scripts/fault_injection.py`` runs them end to end as separate processes.

A case whose ``wrap`` is "readonly", "tinyfs" or "fulltraces" needs a mount namespace (``unshare -rm``) to
make the home read-only, to put its models/ on a 64 KiB file system, or its traces/ on a full one; where
that is not available it is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NOT_UTF8 = os.fsdecode(b"caf\xe9 \xff\xfe")  # what Python makes of Latin-1 bytes in argv: lone surrogates
TOUCHED = "tiny"  # the model a case may damage
OTHER = "other"  # the model that must verify afterwards


@dataclass
class Case:
    name: str
    klass: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None = None  # (home, scratch dir)
    stdin: bytes = b""
    expect: str = "error"  # "error" or "ok"
    check: Callable[[str, str, Path], str | None] | None = None  # (stdout, stderr, home) -> problem or None
    wrap: str | None = None  # "readonly" (home read-only), "tinyfs" (models/ on a 64 KiB fs), "fulltraces" (traces/ full)
    home_is: str = "dir"  # "dir", or "file": MOEINF_HOME names a regular file
    args_from: Callable[[Path, Path], list[str]] | None = field(default=None, repr=False)  # argv built in setup
    stdin_from: Callable[[Path, Path], bytes] | None = field(default=None, repr=False)  # stdin built in setup


# ---- setups -------------------------------------------------------------------------------------------

def _model(home: Path, name: str = TOUCHED) -> Path:
    return home / "models" / name


def _manifest(home: Path) -> Path:
    return _model(home) / "manifest.json"


def _edit_manifest(change: Callable[[dict], dict]) -> Callable[[Path, Path], None]:
    def setup(home: Path, _work: Path) -> None:
        path = _manifest(home)
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return setup


def _write_manifest(text: str) -> Callable[[Path, Path], None]:
    def setup(home: Path, _work: Path) -> None:
        _manifest(home).write_text(text)

    return setup


def _first_expert(home: Path) -> Path:
    return sorted((_model(home) / "experts").rglob("*.safetensors"))[0]


def flip_header_byte(home: Path, _work: Path) -> None:
    path = _first_expert(home)
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))


def delete_expert(home: Path, _work: Path) -> None:
    _first_expert(home).unlink()


def truncate_expert(home: Path, _work: Path) -> None:
    path = _first_expert(home)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _checkout(work: Path) -> Path:
    """A private copy of the source checkout of the tiny model (``work/source`` links to the base's)."""
    dst = work / "checkout"
    if not dst.exists():
        shutil.copytree(work / "source", dst, symlinks=False)
    return dst


def _config(text: str | bytes) -> Callable[[Path, Path], None]:
    def setup(_home: Path, work: Path) -> None:
        path = _checkout(work) / "config.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def _config_field(key: str, value) -> Callable[[Path, Path], None]:
    def setup(_home: Path, work: Path) -> None:
        path = _checkout(work) / "config.json"
        cfg = json.loads(path.read_text())
        cfg[key] = value
        path.write_text(json.dumps(cfg))

    return setup


def truncated_source(_home: Path, work: Path) -> None:
    path = _checkout(work) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def checkout_arg(_home: Path, work: Path) -> list[str]:
    return [str(work / "checkout")]


def traces_path_is_a_file(home: Path, _work: Path) -> None:
    shutil.rmtree(home / "traces", ignore_errors=True)
    (home / "traces").write_text("not a directory")


def foreign_trace(home: Path, work: Path) -> None:
    import numpy as np

    ids = np.zeros((5, 30, 2), dtype=np.int16)  # 30 layers: not the tiny model's shape
    np.savez(work / "foreign.npz", expert_ids=ids, num_experts=np.int64(64), seq_starts=np.array([0]),
             meta=np.array(json.dumps({"model": "elsewhere"})))


def trace_file_arg(_home: Path, work: Path) -> list[str]:
    return [str(work / "foreign.npz")]


def fill_stdin_dir(home: Path, _work: Path) -> None:
    (home / "chat-dir").mkdir(exist_ok=True)


def flip_data_byte(home: Path, _work: Path) -> None:
    """One byte of weight data flipped in an expert shard: the size stays, the hash does not."""
    path = _first_expert(home)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def source_arg(_home: Path, work: Path) -> list[str]:
    return [str(work / "source"), "--name", TOUCHED]


def _store_file(rel: str, text: str | bytes) -> Callable[[Path, Path], None]:
    def setup(home: Path, _work: Path) -> None:
        path = _model(home) / rel
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def truncate_dense(home: Path, _work: Path) -> None:
    path = sorted((_model(home) / "dense").glob("*.safetensors"))[0]
    os.truncate(path, path.stat().st_size - 1000)


def corrupt_traces(home: Path, _work: Path) -> None:
    (home / "traces" / TOUCHED).mkdir(parents=True, exist_ok=True)
    (home / "traces" / TOUCHED / "traces.npz").write_bytes(b"PK\x03\x04 not a zip")


def own_then_foreign_trace(home: Path, work: Path) -> None:
    """The model's own trace imported first (its traces exist), then a trace of another shape to import."""
    subprocess.run([sys.executable, "-m", "moeinf_cli", "trace", "import", str(work / "own-trace.npz"), "--model",
                    TOUCHED], env={**os.environ, "MOEINF_HOME": str(home)}, check=True, capture_output=True)
    foreign_trace(home, work)
    (work / "traces-before").write_bytes((home / "traces" / TOUCHED / "traces.npz").read_bytes())


def chat_lines(*lines: str) -> Callable[[Path, Path], bytes]:
    """Chat input with ``{work}`` replaced by the case's own directory."""
    def stdin(_home: Path, work: Path) -> bytes:
        return "".join(line.replace("{work}", str(work)) + "\n" for line in lines).encode()

    return stdin


def make_dir(name: str) -> Callable[[Path, Path], None]:
    def setup(_home: Path, work: Path) -> None:
        (work / name).mkdir()

    return setup


# ---- checks -------------------------------------------------------------------------------------------

def lists_other_and_marks_broken(stdout: str, _stderr: str, _home: Path) -> str | None:
    lines = stdout.splitlines()
    if not any(line.startswith(OTHER + " ") for line in lines):
        return f"`list` does not list {OTHER}"
    broken = [line for line in lines if line.startswith(TOUCHED + " ")]
    if not broken or "broken" not in broken[0]:
        return f"`list` does not mark {TOUCHED} as broken"
    return None


def answered(stdout: str, _stderr: str, _home: Path) -> str | None:
    return None if stdout.strip() else "no answer printed"


def no_partial_left(_stdout: str, _stderr: str, home: Path) -> str | None:
    models = home / "models"
    left = [p.name for p in models.iterdir() if p.name.startswith(".partial-")] if models.is_dir() else []
    return f"left {left}" if left else None


def names_context(_stdout: str, stderr: str, _home: Path) -> str | None:
    return None if "--ctx" in stderr or "context" in stderr else "the error does not name the context"


def pulled_again(stdout: str, stderr: str, home: Path) -> str | None:
    if not stdout.startswith(f"pulled: {TOUCHED}"):
        return f"not pulled again: {stdout.strip()[:80]!r}"
    return verifies(TOUCHED)(stdout, stderr, home)


def verifies(name: str) -> Callable[[str, str, Path], str | None]:
    def check(_stdout: str, _stderr: str, home: Path) -> str | None:
        r = subprocess.run([sys.executable, "-m", "moeinf_cli", "verify", name], capture_output=True,
                           env={**os.environ, "MOEINF_HOME": str(home)})
        return None if r.returncode == 0 else f"{name} does not verify afterwards"

    return check


def says(*fragments: str) -> Callable[[str, str, Path], str | None]:
    def check(stdout: str, stderr: str, _home: Path) -> str | None:
        missing = [f for f in fragments if f not in stdout + stderr]
        return f"does not say {missing}" if missing else None

    return check


def all_of(*checks: Callable[[str, str, Path], str | None]) -> Callable[[str, str, Path], str | None]:
    def check(stdout: str, stderr: str, home: Path) -> str | None:
        return next((p for c in checks if (p := c(stdout, stderr, home)) is not None), None)

    return check


def own_traces_kept(_stdout: str, _stderr: str, home: Path) -> str | None:
    before = (home.parent / "traces-before").read_bytes()
    now = home / "traces" / TOUCHED / "traces.npz"
    return None if now.is_file() and now.read_bytes() == before else "the model's own traces were changed"


def no_file(rel: str) -> Callable[[str, str, Path], str | None]:
    def check(_stdout: str, _stderr: str, home: Path) -> str | None:
        return f"{rel} was written" if (home.parent / rel).exists() else None

    return check


def one_line_warning(_stdout: str, stderr: str, _home: Path) -> str | None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if len(lines) != 1 or not lines[0].startswith("Warning:"):
        return f"stderr is not one Warning: line: {stderr.strip()[:120]!r}"
    return None


def no_wrong_hint(*bad: str) -> Callable[[str, str, Path], str | None]:
    def check(_stdout: str, stderr: str, _home: Path) -> str | None:
        hit = [b for b in bad if b in stderr]
        return f"misleading hint {hit}" if hit else None

    return check


RUN = ["run", TOUCHED, "hi", "--temperature", "0", "-n", "3"]


def cases() -> list[Case]:
    out = [
        # 1. malformed config.json in a checkout
        Case("config.json: JSON syntax error", "malformed input", ["pull"], _config('{"model_type": "mixtral",'),
             args_from=checkout_arg),
        Case("config.json: random bytes", "malformed input", ["pull"], _config(bytes(range(256)) * 4),
             args_from=checkout_arg),
        Case("config.json: a JSON list", "malformed input", ["pull"], _config("[1, 2, 3]"), args_from=checkout_arg),
        Case('config.json: "hidden_size": "big"', "malformed input", ["pull"], _config_field("hidden_size", "big"),
             args_from=checkout_arg),
        Case("config.json: unknown model_type", "malformed input", ["pull"], _config_field("model_type", "nope"),
             args_from=checkout_arg),
        Case("checkout: truncated weights", "malformed input", ["pull"], truncated_source, args_from=checkout_arg,
             check=no_partial_left),
        # 3. damaged manifests
        Case("manifest missing fields: list", "damaged store", ["list"],
             _write_manifest('{"format_version": 1, "name": "tiny"}'), expect="ok",
             check=lists_other_and_marks_broken),
        Case("manifest missing fields: show", "damaged store", ["show", TOUCHED],
             _write_manifest('{"format_version": 1, "name": "tiny"}')),
        Case("manifest missing fields: verify", "damaged store", ["verify", TOUCHED],
             _write_manifest('{"format_version": 1, "name": "tiny"}')),
        Case("manifest total_bytes null: list", "damaged store", ["list"],
             _edit_manifest(lambda m: {**m, "total_bytes": None}), expect="ok", check=lists_other_and_marks_broken),
        Case("manifest total_bytes null: show", "damaged store", ["show", TOUCHED],
             _edit_manifest(lambda m: {**m, "total_bytes": None})),
        Case("manifest unreadable: list", "damaged store", ["list"], _write_manifest("\x00garbage"), expect="ok",
             check=lists_other_and_marks_broken),
        Case("manifest from a future version: list", "damaged store", ["list"],
             _edit_manifest(lambda m: {**m, "format_version": 99}), expect="ok", check=lists_other_and_marks_broken),
        Case("manifest from a future version: run", "damaged store", RUN,
             _edit_manifest(lambda m: {**m, "format_version": 99})),
    ]
    # 2. a damaged expert shard, in every budget mode
    for budget in ("default", "25%", "100%"):
        extra = [] if budget == "default" else ["--expert-budget", budget]
        out += [
            Case(f"expert shard header flipped, budget {budget}", "damaged store", RUN + extra, flip_header_byte),
            Case(f"expert shard deleted, budget {budget}", "damaged store", RUN + extra, delete_expert),
            Case(f"expert shard truncated, budget {budget}", "damaged store", RUN + extra, truncate_expert),
        ]
    out += [
        # 6. homes that cannot be written, are full, or are not directories
        Case("read-only home: pull", "home", ["pull"], args_from=lambda h, w: [str(w / "source"),
                                                                                "--name", "third"], wrap="readonly"),
        Case("read-only home: rm", "home", ["rm", TOUCHED], wrap="readonly"),
        Case("read-only home: trace import", "home", ["trace", "import", "--model", TOUCHED],
             args_from=lambda h, w: [str(w / "own-trace.npz")], wrap="readonly"),
        Case("read-only home: trace record", "home", ["trace", "record", TOUCHED, "--prompts"],
             args_from=lambda h, w: [str(w / "prompts.txt"), "-n", "2"], wrap="readonly"),
        Case("full disk: pull", "home", ["pull"], args_from=lambda h, w: [str(w / "source"), "--name", "third"],
             wrap="tinyfs", check=no_partial_left),
        Case("home is a file: pull", "home", ["pull"], args_from=lambda h, w: [str(w / "source")],
             home_is="file"),
        Case("home is a file: list", "home", ["list"], home_is="file"),
        Case("home is a file: run", "home", RUN, home_is="file"),
        # 8. traces
        Case("traces path is a file: trace rm", "traces", ["trace", "rm", TOUCHED], traces_path_is_a_file),
        Case("trace import of another model's shape", "traces", ["trace", "import", "--model", TOUCHED],
             foreign_trace, args_from=trace_file_arg),
        # 5. text that is not UTF-8, everywhere text enters
        Case("non-UTF-8 prompt argument", "text", ["run", TOUCHED, NOT_UTF8, "-n", "3", "--temperature", "0"],
             expect="ok", check=answered),
        Case("non-UTF-8 --system", "text", [*RUN, "--system", NOT_UTF8], expect="ok", check=answered),
        Case("non-UTF-8 chat line", "text", ["chat", TOUCHED, "-n", "3", "--temperature", "0"],
             stdin=b"caf\xe9 \xff\n/bye\n", expect="ok", check=answered),
        Case("non-UTF-8 stdin prompt", "text", ["run", TOUCHED, "-n", "3", "--temperature", "0"],
             stdin=b"caf\xe9 \xff\n", expect="ok", check=answered),
        # 7. impossible contexts
        Case("context too large, default budget", "context", [*RUN, "--ctx", "10000000000"], check=names_context),
        Case("context too large, budget 25%", "context", [*RUN, "--ctx", "10000000000", "--expert-budget", "25%"],
             check=names_context),
        Case("context too small", "context", [*RUN, "--ctx", "2"], check=names_context),
        # 9. smaller things
        Case("empty prompt argument", "input", ["run", TOUCHED, ""]),
        Case("pull of a name that is no model", "input", ["pull", "notamodel"], check=no_wrong_hint("olmoe")),
        Case("run of an unknown model", "input", ["run", "notamodel", "hi"],
             check=no_wrong_hint("moeinf pull notamodel")),
        Case("bad flag value", "input", [*RUN, "--expert-budget", "lots"]),
        Case("bad flag values: --seed abc", "input", [*RUN, "--seed", "abc"]),
        Case("bad flag values: bench -r 0", "input", ["bench", TOUCHED, "-p", "2", "-n", "2", "-r", "0"]),
        Case("bad flag values: predict, checked before profiling", "input",
             ["predict", TOUCHED, "--expert-budget", "5000%"], check=no_wrong_hint("machine profiled")),
        # more of a damaged store: the files next to the shards
        Case("store tokenizer.json damaged", "damaged store", RUN, _store_file("tokenizer.json", "garbage")),
        Case("store config.json damaged", "damaged store", RUN, _store_file("config.json", "{")),
        Case("store generation_config.json damaged", "damaged store", RUN,
             _store_file("generation_config.json", "{bad")),
        Case("store chat template does not parse", "damaged store", RUN,
             _store_file("chat_template.jinja", "{% if %}")),
        Case("dense shard truncated", "damaged store", RUN, truncate_dense),
        Case("corrupt traces file: run", "traces", RUN, corrupt_traces, expect="ok", check=answered),
        Case("trace import of another shape keeps the model's traces", "traces",
             ["trace", "import", "--model", TOUCHED], own_then_foreign_trace, args_from=trace_file_arg,
             check=own_traces_kept),
        # 9. pulling again over a damaged model
        Case("pull again over a deleted shard", "pull again", ["pull"], delete_expert, args_from=source_arg,
             expect="ok", check=pulled_again),
        Case("pull again over a flipped data byte", "pull again", ["pull"], flip_data_byte, args_from=source_arg,
             expect="ok", check=says("up to date", f"moeinf verify {TOUCHED}", "--force")),
        Case("pull --force over a flipped data byte", "pull again", ["pull", "--force"], flip_data_byte,
             args_from=source_arg, expect="ok", check=pulled_again),
        # the chat's own commands
        Case("chat /save to a directory", "chat", ["chat", TOUCHED, "-n", "2"], make_dir("chats"),
             stdin_from=chat_lines("hi", "/save {work}/chats", "/bye"), expect="ok",
             check=all_of(says("Error: cannot write", "a directory"), no_file("chats.json"))),
        Case("chat /load of a missing file", "chat", ["chat", TOUCHED, "-n", "2"],
             stdin_from=chat_lines("/load {work}/missing.json", "/bye"), expect="ok",
             check=says("Error: no conversation file")),
        Case("chat /load of a model that is not there", "chat", ["chat", TOUCHED, "-n", "2"],
             stdin_from=chat_lines("/load notamodel", "hi", "/bye"), expect="ok",
             check=all_of(says("Error: model 'notamodel' not found"), answered)),
        Case("non-UTF-8 /set system", "text", ["chat", TOUCHED, "-n", "3", "--temperature", "0"],
             stdin=b"/set system caf\xe9 \xff\nhi\n/bye\n", expect="ok", check=answered),
        # 6. a full disk where traces are saved
        Case("full disk: trace record", "home", ["trace", "record", TOUCHED, "--prompts"],
             args_from=lambda h, w: [str(w / "prompts.txt"), "-n", "2"], wrap="fulltraces"),
        Case("full disk: run (the answer, one warning)", "home", RUN, wrap="fulltraces", expect="ok",
             check=all_of(answered, one_line_warning)),
    ]
    return out


# ---- the store every case starts from ------------------------------------------------------------------

def build_base(base: Path) -> Path:
    """``base/home`` with the tiny Mixtral pulled twice (``tiny``, ``other``), its checkout in
    ``base/source``, a trace of its own shape in ``base/own-trace.npz`` and ``base/prompts.txt``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import make_tiny_checkpoint

    home = base / "home"
    source = make_tiny_checkpoint("mixtral", base / "source")
    env = {**os.environ, "MOEINF_HOME": str(home)}
    for name in (TOUCHED, OTHER):
        subprocess.run([sys.executable, "-m", "moeinf_cli", "pull", str(source), "--name", name], env=env,
                       check=True, capture_output=True)
    import numpy as np

    cfg = json.loads((source / "config.json").read_text())
    layers, experts = cfg["num_hidden_layers"], cfg["num_local_experts"]
    ids = np.zeros((4, layers, cfg["num_experts_per_tok"]), dtype=np.int16)
    ids[:, :, 1] = 1
    np.savez(base / "own-trace.npz", expert_ids=ids, num_experts=np.int64(experts), seq_starts=np.array([0]),
             meta=np.array(json.dumps({"model": "tiny"})))
    (base / "prompts.txt").write_text("Hello\n")
    return home


def fresh_copy(base: Path, work: Path) -> Path:
    """A private copy of the base home for one case (``work/home``)."""
    home = work / "home"
    shutil.copytree(base / "home", home, symlinks=True)
    return home


def can_wrap() -> bool:
    """Whether ``unshare -rm`` can make mounts here (read-only home, tiny file system)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return r.returncode == 0


def wrapped_command(case: Case, home: Path, argv: list[str]) -> list[str]:
    """The command line that runs ``moeinf argv`` in a mount namespace with the home read-only or tiny."""
    cli = " ".join(_quote(a) for a in [sys.executable, "-m", "moeinf_cli", *argv])
    h = _quote(str(home))
    if case.wrap == "readonly":
        script = f"mount --bind {h} {h} && mount -o remount,bind,ro {h} && exec {cli}"
    elif case.wrap == "fulltraces":  # traces/ on a 64 KiB file system, filled up
        t = _quote(str(home / "traces"))
        script = (f"mkdir -p {t} && mount -t tmpfs -o size=64k tmpfs {t} && "
                  f"(dd if=/dev/zero of={t}/fill bs=4k count=64 2>/dev/null; true) && exec {cli}")
    else:  # tinyfs: models/ on a 64 KiB file system (the models there are hidden while it runs)
        script = f"mount -t tmpfs -o size=64k tmpfs {h}/models && exec {cli}"
    return ["unshare", "-rm", "sh", "-c", script]


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@dataclass
class Outcome:
    case: Case
    code: int
    stdout: str
    stderr: str
    problem: str | None


def judge(case: Case, code: int, stdout: str, stderr: str, home: Path, other_ok: bool) -> str | None:
    """Why the outcome is not handled, or None when it is."""
    if "Traceback" in stderr or "Traceback" in stdout:
        return "traceback"
    if case.expect == "error":
        if code == 0:
            return "exit status 0"
        first = stderr.strip().splitlines()[0] if stderr.strip() else ""
        if not first.startswith("Error:"):
            return f"first stderr line is {first[:80]!r}"
    elif code != 0:
        return f"exit status {code}: {stderr.strip()[:120]!r}"
    if not other_ok:
        return f"{OTHER} no longer verifies"
    if case.check is not None:
        return case.check(stdout, stderr, home)
    return None


def prepare(case: Case, base: Path, work: Path) -> tuple[Path, list[str], dict, bytes]:
    """(home, argv, environment, stdin) for one case: a fresh copy of the store, damaged as the case says."""
    home = fresh_copy(base, work)
    for name in ("source", "own-trace.npz", "prompts.txt"):  # the inputs, under the case's own dir
        (work / name).symlink_to(base / name)
    if case.setup is not None:
        case.setup(home, work)
    argv = list(case.argv) + (case.args_from(home, work) if case.args_from else [])
    stdin = case.stdin_from(home, work) if case.stdin_from is not None else case.stdin
    env_home = home
    if case.home_is == "file":
        env_home = work / "home-file"
        env_home.write_text("not a directory")
    return home, argv, {"MOEINF_HOME": str(env_home)}, stdin


def run_subprocess(case: Case, base: Path, work: Path, timeout: float = 300) -> Outcome:
    """Run one case end to end: a separate `moeinf` process."""
    home, argv, env_extra, stdin = prepare(case, base, work)
    env = {**os.environ, **env_extra, "MOEINF_NATIVE_KERNELS": os.environ.get("MOEINF_NATIVE_KERNELS", "1")}
    cmd = wrapped_command(case, home, argv) if case.wrap else [sys.executable, "-m", "moeinf_cli", *argv]
    cmd = [os.fsencode(c) for c in cmd]  # lone surrogates go back to the bytes they came from
    r = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=timeout)
    stdout, stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    other = subprocess.run([sys.executable, "-m", "moeinf_cli", "verify", OTHER], capture_output=True,
                           env={**os.environ, "MOEINF_HOME": str(home)})
    return Outcome(case, r.returncode, stdout, stderr, judge(case, r.returncode, stdout, stderr, home,
                                                              other.returncode == 0))

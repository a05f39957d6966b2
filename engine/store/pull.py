"""``pull_model``: an alias, hub repo, checkpoint directory or GGUF file -> a complete store model.

The model is built in ``models/.partial-<name>/`` and renamed to ``models/<name>/`` only when its
manifest is written, so the store never shows a half-built model. After every source shard the pull
records what it wrote (with sha256) in ``.partial-<name>/pull-state.json`` plus the tensors still
waiting for a partner in ``pending-<k>.safetensors``; a later pull of the same source and options
re-hashes those files and, when they all verify, continues with the next shard.

Steps before the conversion (a GGUF file turned into a checkpoint, a ``SourceTransform`` such as
upcycling) build their output in ``$MOEINF_HOME/tmp/<name>/`` and rename it into place when done; an
interrupted pull keeps what they finished, so running it again resumes after the last finished step.
A pull that fails because of its source (a user error) removes its work.

``MOEINF_PULL_THROTTLE_S`` (seconds) makes the pull wait after each source shard: a way to watch or
interrupt a pull of a tiny model (the tests kill one midway with it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from engine.errors import MoeinfError
from engine.store.config import read_config
from engine.store.dtypes import canonical_dtype, config_dtype
from engine.store.families import moe_layout
from engine.store.files import sha256_file, write_json
from engine.store.hub import (
    META_FILES,
    HubSource,
    LocalSource,
    is_repo_id,
    resolve_alias,
    unknown_alias_error,
)
from engine.store.manifest import FORMAT_VERSION, MANIFEST, PARTIAL_PREFIX, check_name
from engine.store.paths import expert_shard_path, models_dir, moeinf_home, traces_dir

STATE = "pull-state.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _nothing(_n: int) -> None:
    pass


class PullProgress:
    """What a pull reports while it works; the CLI draws it with rich. Every method may be a no-op."""

    def message(self, text: str) -> None: ...

    def download(self, desc: str, n: int, total: int | None) -> None: ...

    def task(self, description: str, total: int | None, *, done: int = 0, unit: str = "B") -> Callable[[int], None]:
        """A step of the pull with a known amount of work (``unit``: "B" for bytes, or a word such as
        "tokens"); returns the function to call with each amount done."""
        return _nothing


class SourceTransform(Protocol):
    """A step between reading the source checkpoint and converting it, done by a layer above the store:
    upcycling (``engine.upcycle``) runs the dense model, which the store may not import. The pull
    records ``record`` in its key and in the manifest (``source.upcycled``)."""

    record: dict  # e.g. {"num_experts": 8, "top_k": 2}
    name_suffix: str  # added to the default store name, e.g. "-moe8"
    description: str  # what it does, for messages: "upcycling into 8 experts, top-2"

    def apply(self, checkpoint_dir: Path, out_dir: Path, dtype: str | None, progress: PullProgress) -> Path:
        """Build the transformed checkpoint in ``out_dir`` (aside, renamed into place when done)."""
        ...


@dataclass
class PullResult:
    name: str
    path: Path
    manifest: dict
    up_to_date: bool = False


def default_name(source: str, kind: str) -> str:
    if kind == "alias":
        base = source.lower()
    elif kind == "hub":
        base = source.split("/")[-1].lower()
    else:
        p = Path(source).expanduser()
        base = (p.stem if kind == "gguf" else p.resolve().name).lower()
    base = re.sub(r"[^A-Za-z0-9._:+-]+", "-", base).strip("-.") or "model"
    return base


def classify_source(source: str) -> tuple[str, str]:
    """("gguf" | "local" | "alias" | "hub", normalised value) for a SOURCE argument."""
    p = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        if p.is_file():
            return "gguf", str(p)
        raise MoeinfError(f"no such GGUF file: {source}")
    if p.is_dir():
        return "local", str(p)
    repo = resolve_alias(source)
    if repo:
        return "alias", repo
    if is_repo_id(source):
        return "hub", source
    if os.sep in source or source.startswith((".", "~")):
        raise MoeinfError(f"no such checkpoint directory: {source}")
    raise unknown_alias_error(source)


@contextlib.contextmanager
def _lock(name: str):
    """Hold ``models/.lock-<name>`` while a pull of ``name`` runs; a second pull fails at once. The file
    is removed when the pull ends (a lock won on a file that was removed meanwhile is taken again on
    the new one, so two pulls never both hold it)."""
    models_dir().mkdir(parents=True, exist_ok=True)
    path = models_dir() / f".lock-{name}"
    while True:
        f = open(path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise MoeinfError(f"another `moeinf pull` of {name} is running; wait for it to finish") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _estimate_bytes(config: dict, src_bytes: int, dtype: str | None) -> int:
    """About how many bytes the store model of ``src_bytes`` of source shards takes."""
    import torch

    quant = (config.get("quantization_config") or {}).get("quant_method")
    cfg_dtype = config_dtype(config) or torch.bfloat16
    out = (getattr(torch, dtype) if dtype else cfg_dtype).itemsize
    if quant in ("mxfp4", "fp8") and dtype is None:  # kept as mxfp4, or stored as q8_0 (8.5 bits)
        return src_bytes * 17 // 16
    if quant == "mxfp4":  # one byte holds two values
        return src_bytes * out * 2
    if quant == "fp8":
        return src_bytes * out
    return src_bytes * out // cfg_dtype.itemsize


def _verified(root: Path, files: dict[str, dict]) -> bool:
    for rel, info in files.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            return False
    return True


def pull_model(
    source: str,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    name: str | None = None,
    keep_downloads: bool = False,
    progress: PullProgress | None = None,
    transform: SourceTransform | None = None,
    quantize: str | None = None,
    quantize_dense: str | None = None,
    force: bool = False,
) -> PullResult:
    """Pull ``source`` into the store as ``name`` (see the module docstring); returns where it is.
    A model already pulled from the same source with the same options is kept ("up to date") when
    every file it lists is there with its size; a missing or resized file, or ``force``, pulls again.
    ``transform`` (e.g. ``engine.upcycle.Upcycle``) turns the source checkpoint into the one stored.

    Quantised sources stay quantised (a GGUF's block formats, gpt-oss's MXFP4; DeepSeek-V3's FP8 as
    q8_0) unless ``dtype`` asks for floats; ``quantize`` / ``quantize_dense`` (format names, e.g.
    "q4_k") quantise the experts / the dense matrices of a float source as they are written."""
    progress = progress or PullProgress()
    target_dtype = canonical_dtype(dtype)
    quant = {"experts": _format_option("--quantize", quantize), "dense": _format_option("--quantize-dense", quantize_dense)}
    kind, value = classify_source(source)
    suffix = transform.name_suffix if transform else ""
    name = check_name(name or default_name(source if kind == "alias" else value, kind) + suffix)
    with _lock(name):
        return _pull_locked(kind, value, source, name, revision, target_dtype, transform, keep_downloads, progress, quant,
                            force)


def _format_option(flag: str, name: str | None) -> str | None:
    """A ``--quantize``-style option as a quantised format name (None stays None); else a user error."""
    if name is None:
        return None
    from engine import formats

    try:
        fmt = formats.get(name)
    except ValueError:
        fmt = None
    if fmt is None or not fmt.quantised:
        raise MoeinfError(f"{flag} {name!r} is not a quantised format; use one of {', '.join(formats.QUANTISED)}")
    return fmt.name


def _pull_locked(kind, value, source, name, revision, target_dtype, transform, keep_downloads, progress, quant,
                 force=False) -> PullResult:
    if revision and kind not in ("alias", "hub"):
        raise MoeinfError("--revision only applies to hub repositories")
    upcycled = dict(transform.record) if transform else None
    src = None
    if kind in ("alias", "hub"):
        progress.message(f"resolving {value} on the hub")
        src = HubSource(value, revision, keep_downloads=keep_downloads, on_download=progress.download)
        described, fingerprint = src.describe(), None
    elif kind == "local":
        src = LocalSource(Path(value))
        described, fingerprint = src.describe(), src.fingerprint()
    else:
        st = Path(value).stat()
        described, fingerprint = {"kind": "gguf", "path": str(Path(value).resolve())}, [st.st_size, int(st.st_mtime)]
    key = {"format_version": FORMAT_VERSION, "source": described, "fingerprint": fingerprint, "dtype": target_dtype,
           "upcycled": upcycled, "quantize": quant}
    final = models_dir() / name
    if (final / MANIFEST).is_file() and not force:
        existing = None
        with contextlib.suppress(OSError, ValueError):
            existing = json.loads((final / MANIFEST).read_text())
        if isinstance(existing, dict) and existing.get("pull_key") == key:
            damage = _size_damage(final, existing)
            if damage is None:
                return PullResult(name, final, existing, up_to_date=True)
            progress.message(f"{name} in the store is damaged ({damage}); pulling it again")

    tmp_root = _work_dir(name, key)
    try:
        if kind == "gguf":
            src = _step(tmp_root / "gguf", "the GGUF conversion", described, progress,
                        lambda out: _from_gguf(value, out, target_dtype, progress))
        if transform:
            upcycled = {"from": described, **upcycled}
            for shard in src.shards:  # the transform reads the whole source checkpoint
                src.fetch(shard)
            meta_dir = src.meta_dir
            src = _step(tmp_root / "transform", transform.description, described, progress,
                        lambda out: transform.apply(meta_dir, out, target_dtype, progress))
        result = _convert_into_store(src, name, key, target_dtype, upcycled, progress, quant)
    except MoeinfError:
        # a bad source or option: nothing worth resuming (a hub download keeps its converted shards, so
        # a pull after the bad file is fetched again continues)
        shutil.rmtree(tmp_root, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp_root.parent.rmdir()  # $MOEINF_HOME/tmp, when no other pull uses it
        if kind != "hub" and kind != "alias":
            shutil.rmtree(models_dir() / f"{PARTIAL_PREFIX}{name}", ignore_errors=True)
        raise
    shutil.rmtree(tmp_root, ignore_errors=True)
    with contextlib.suppress(OSError):
        tmp_root.parent.rmdir()
    return result


def _size_damage(root: Path, manifest: dict) -> str | None:
    """The first file of a store model that is missing or not the size its manifest says, as words;
    None when all are there (a cheap check: sizes, not hashes; `moeinf verify` re-hashes)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "its manifest lists no files"
    for rel, info in files.items():
        try:
            size = (root / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if isinstance(info, dict) and size != info.get("size"):
            return f"{rel} is {size} bytes, not {info.get('size')}"
    return None


def _work_dir(name: str, key: dict) -> Path:
    """``$MOEINF_HOME/tmp/<name>``, emptied unless an earlier pull with the same key left it."""
    root = moeinf_home() / "tmp" / name
    try:
        same = json.loads((root / "pull-key.json").read_text()) == key
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        write_json(root / "pull-key.json", key)
    return root


def _step(out: Path, what: str, described: dict, progress: PullProgress, build: Callable[[Path], Path]) -> LocalSource:
    """The output of one step before the conversion: reused when an interrupted pull finished it."""
    if out.is_dir():
        progress.message(f"resuming: {what}: done by an earlier pull")
    else:
        build(out)
    return LocalSource(out, description=described)


def _from_gguf(path: str, out: Path, target_dtype, progress: PullProgress) -> Path:
    """The GGUF file as a checkpoint, block formats kept unless ``--dtype`` asks for floats (the
    upcycler copies kept blocks into the experts as they are)."""
    from engine.store.gguf import gguf_to_checkpoint

    return gguf_to_checkpoint(path, out, target_dtype, progress=progress,
                              keep_formats=target_dtype is None, notice=progress.message)


def _convert_into_store(src, name: str, key: dict, target_dtype, upcycled, progress: PullProgress, quant: dict) -> PullResult:
    config = read_config(src.meta_dir, hint="fix the file or re-download the checkpoint")
    layout = moe_layout(config)  # refuses unsupported families
    partial = models_dir() / f"{PARTIAL_PREFIX}{name}"
    state = _load_state(partial, key, progress)
    sizes = src.shard_sizes() or {}
    total = sum(sizes.values())
    done_bytes = sum(sizes.get(s, 0) for s in state["done_shards"])
    _check_space(partial, config, total - done_bytes, target_dtype)
    try:
        return _build(src, name, config, layout, key, partial, state, sizes, target_dtype, upcycled, progress, quant)
    except OSError as err:
        if err.errno in _NO_SPACE:
            from engine.store.convert import disk_full_error

            raise disk_full_error(partial, err) from None
        raise


def _load_state(partial: Path, key: dict, progress: PullProgress) -> dict:
    fresh = {"key": key, "done_shards": [], "files": {}, "pending": None, "converter": {}}
    path = partial / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        if state and state.get("key") == key and _verified(partial, state["files"]) and (
            state["pending"] is None or (partial / state["pending"]).is_file()
        ):
            progress.message(f"resuming: {len(state['done_shards'])} source shard(s) already converted and verified")
            return state
    shutil.rmtree(partial, ignore_errors=True)
    return fresh


def _check_space(partial: Path, config: dict, remaining_src: int, target_dtype) -> None:
    if remaining_src <= 0:
        return
    need = _estimate_bytes(config, remaining_src, target_dtype)
    models_dir().mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models_dir()).free
    if need > free:
        raise MoeinfError(
            f"not enough disk space in {models_dir()}: the model needs about {_size(need)} more, "
            f"{_size(free)} free; free some space or set MOEINF_HOME to a bigger disk"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _build(src, name, config, layout, key, partial: Path, state, sizes, target_dtype, upcycled, progress, quant):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from engine.store.convert import Converter
    from engine.store.dtypes import dtype_name, parse_dtype
    from engine.store.header import HeaderError

    partial.mkdir(parents=True, exist_ok=True)
    meta = {}
    for fname in META_FILES:
        p = src.meta_dir / fname
        if fname in ("config.json", "model.safetensors.index.json") or not p.is_file():
            continue
        shutil.copyfile(p, partial / fname)
        meta[fname] = {"size": (partial / fname).stat().st_size, "sha256": sha256_file(partial / fname)}

    done = sum(sizes.get(s, 0) for s in state["done_shards"])
    advance = progress.task("converting", sum(sizes.values()) or None, done=done)
    seen = [0]  # bytes of tensors converted from the current shard

    def on_bytes(n: int) -> None:
        seen[0] += n
        advance(n)

    conv = Converter(config, partial, parse_dtype(target_dtype), on_bytes=on_bytes,
                     quantize=quant["experts"], quantize_dense=quant["dense"])
    c = state["converter"]
    conv.experts_done = {tuple(x) for x in c.get("experts_done", [])}
    conv.stored_dtype = getattr(torch, c["stored_dtype"]) if c.get("stored_dtype") else None
    conv.source_dtype = getattr(torch, c["source_dtype"]) if c.get("source_dtype") else None
    conv.dequantized = c.get("dequantized")
    conv.dropped = c.get("dropped", 0)
    conv.formats = c.get("formats") or conv.formats
    if state["pending"]:
        conv.restore_pending(load_file(str(partial / state["pending"])))
    throttle = float(os.environ.get("MOEINF_PULL_THROTTLE_S") or 0)

    for k, shard in enumerate(src.shards, 1):
        if shard in state["done_shards"]:
            continue
        path = src.fetch(shard)
        seen[0] = 0
        try:
            written = conv.convert_shard(path, k)
        except (SafetensorError, ValueError, EOFError, json.JSONDecodeError) as err:
            if isinstance(err, MoeinfError) and not isinstance(err, HeaderError):
                raise
            hint = src.corrupt_hint(shard)
            raise MoeinfError(f"source file {shard} is corrupt or truncated ({_short(err)}); {hint}") from None
        except OSError as err:
            if err.errno in _NO_SPACE:
                raise
            raise MoeinfError(f"cannot read source file {shard} ({err.strerror or err}); {src.corrupt_hint(shard)}") from None
        advance(max(0, sizes.get(shard, 0) - seen[0]))  # the shard's header and padding: the bar ends full
        for w in written:
            state["files"][w.rel] = {"size": w.size, "sha256": w.sha256}
        pending = conv.pending_tensors()
        old_pending = state["pending"]
        state["pending"] = None
        if pending:
            state["pending"] = f"pending-{k:05d}.safetensors"
            save_file(pending, str(partial / state["pending"]))
        state["done_shards"].append(shard)
        state["converter"] = {
            "experts_done": sorted(conv.experts_done), "dropped": conv.dropped, "dequantized": conv.dequantized,
            "stored_dtype": conv.stored_dtype and dtype_name(conv.stored_dtype),
            "source_dtype": conv.source_dtype and dtype_name(conv.source_dtype),
            "formats": conv.formats,
        }
        write_json(partial / STATE, state)
        if old_pending and old_pending != state["pending"]:
            (partial / old_pending).unlink(missing_ok=True)
        src.release(shard)
        if throttle:
            time.sleep(throttle)

    missing = conv.missing()
    if missing:
        shutil.rmtree(partial, ignore_errors=True)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MoeinfError(f"the checkpoint is incomplete: missing {'; '.join(missing[:3])}{more}")
    if not any(r.startswith("dense/") for r in state["files"]):
        raise MoeinfError("the checkpoint has no dense tensors (embeddings, attention); it is not a complete model")
    return _finish(src, name, config, layout, key, partial, state, meta, conv, upcycled)


def _short(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _finish(src, name, config, layout, key, partial: Path, state, meta, conv, upcycled) -> PullResult:
    from engine import __version__
    from engine.store.dtypes import dtype_name

    stored = conv.stored_dtype
    if stored is None:  # dense model: the dtype of the dense weights
        from engine.store.header import read_header

        first = sorted(r for r in state["files"] if r.startswith("dense/"))[0]
        floats = [t.torch_dtype for t in read_header(partial / first).tensors.values()]
        stored = next((d for d in floats if d.is_floating_point), conv.compute_dtype)
    cfg = dict(config)
    changed = conv.dequantized is not None or (conv.source_dtype is not None and stored != conv.source_dtype)
    if conv.dequantized:
        cfg.pop("quantization_config", None)
    if changed or "dtype" in cfg or "torch_dtype" in cfg:
        cfg["dtype"] = dtype_name(stored)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(stored)
    cw = write_json(partial / "config.json", cfg)

    files = {**meta, "config.json": {"size": cw.size, "sha256": cw.sha256}, **state["files"]}
    files = dict(sorted(files.items()))
    expert_bytes = 0
    if layout.is_moe:
        rel = expert_shard_path(Path("."), layout.moe_layers[0], 0).as_posix()
        expert_bytes = files[rel]["size"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "moeinf_version": __version__,
        "source": src.describe() | ({"upcycled": upcycled} if upcycled else {}),
        "family": layout.family,
        "num_layers": layout.num_layers,
        "num_experts": layout.num_experts,
        "top_k": layout.top_k,
        "moe_layers": layout.moe_layers,
        "hidden_size": layout.hidden_size,
        "expert_intermediate_size": layout.expert_intermediate_size,
        "dtype": dtype_name(stored),
        "source_dtype": dtype_name(conv.source_dtype or stored),
        "dequantized": conv.dequantized,
        "formats": conv.formats,
        "expert_tensors": list(conv.required) if layout.is_moe else [],
        "dropped_tensors": conv.dropped,
        "dense_bytes": sum(v["size"] for k, v in files.items() if k.startswith("dense/")),
        "expert_bytes": expert_bytes,
        "total_bytes": sum(v["size"] for v in files.values()),
        "pull_key": key,
        "files": files,
    }
    if state["pending"]:
        (partial / state["pending"]).unlink(missing_ok=True)
    write_json(partial / MANIFEST, manifest)
    (partial / STATE).unlink(missing_ok=True)
    for leftover in list(partial.rglob("*.tmp")) + list(partial.rglob("*.data")):
        leftover.unlink(missing_ok=True)
    final = models_dir() / name
    old = models_dir() / f".old-{name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return PullResult(name, final, manifest)


def remove_model(name: str) -> Path:
    """Delete a store model, any half-built pull of it and its recorded traces; returns the path removed."""
    from engine.store.manifest import resolve_model

    path = resolve_model(name)
    if path.parent != models_dir():
        raise MoeinfError(f"{name} is not in the store ({models_dir()}); `moeinf rm` only deletes store models")
    trash = models_dir() / f".rm-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(models_dir() / f"{PARTIAL_PREFIX}{path.name}", ignore_errors=True)
    traces = traces_dir(path.name)
    if traces.is_dir():
        shutil.rmtree(traces, ignore_errors=True)
    return path


"""The one loader of moeinf's native code: build the CPU kernels (and the CUDA kernels where a GPU
and ``nvcc`` exist), cache them, load them with ctypes, describe what is in use.

The CPU library is every ``csrc/cpu/*.c`` compiled together by the system C compiler (``$CC``, else
``cc``). It is cached under ``$XDG_CACHE_HOME/moeinf/kernels`` (default ``~/.cache``) as
``cpu-<build>-<key>.so``, the key hashing the sources, the compiler (its path, size and mtime), the
flags, the machine and, for ``-march=native`` builds, the CPU's feature flags: a home directory
shared by two machines keeps one build per CPU. Before the first call the library's own report of
the instruction sets it was compiled for (``moeinf_isa``) is checked against this CPU's flags; a
build that asks for one the CPU lacks is never used.

Builds, tried in order: ``native`` (``-march=native``), ``portable`` (``-O3`` only).
``MOEINF_NATIVE_KERNELS``: ``0`` turns the native code off (the PyTorch path everywhere), ``native``,
``avx2`` (``-mavx2 -mfma -mf16c``) or ``portable`` asks for that build only; unset or ``1`` is the default.

The CUDA library (``csrc/cuda/*.cu``) is built by ``nvcc`` for the current device's architecture,
cached the same way (``cuda-sm<cc>-<key>.so``), and used only where torch sees a CUDA device.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
BUILDS: dict[str, list[str]] = {
    "native": ["-O3", "-march=native"],
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c"],
    "portable": ["-O3"],
}
DEFAULT_BUILDS = ("native", "portable")
_COMMON_FLAGS = ["-pthread", "-shared", "-fPIC"]

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_f32 = ctypes.c_float
# x, k, gate, up, down, gate_bias, up_bias, down_bias, coef, type, H, I, act, alpha, limit, acc, threads
_EXPERTS_ARGS = [_p, _int, _p, _p, _p, _p, _p, _p, _p, _int, _i64, _i64, _int, _f32, _f32, _p, _int]
# the C functions the Python side calls, with their argument types (all return void unless named in _RESTYPES)
SIGNATURES: dict[str, list] = {
    "moeinf_isa": [],
    "moeinf_gemv_many": [_p, _i64, _int, _p, _p, _p, _p, _int],
    "moeinf_heads_xtw": [_p, _p, _p, _i64, _i64, _i64, _i64, _i64, _int],
    "moeinf_heads_wx": [_p, _p, _p, _i64, _i64, _i64, _i64, _i64, _int],
    "moeinf_experts_acc": _EXPERTS_ARGS,
    "moeinf_experts_acc_f32": _EXPERTS_ARGS,
    "moeinf_experts_acc_f32_int8": _EXPERTS_ARGS,
    "moeinf_qgemv": [_int, _p, _i64, _i64, _p, _int, _i64, _p, _p, _int, _int],
    "moeinf_fgemv": [_int, _p, _i64, _i64, _p, _i64, _p, _p, _int],
    "moeinf_qgemm": [_int, _p, _i64, _i64, _p, _i64, _p, _p, _int],
    "moeinf_qgemm_swiglu": [_int, _p, _p, _i64, _i64, _p, _i64, _p, _int],
    "moeinf_read_bytes": [_p, _i64, _int],
    "moeinf_attn_decode": [_p, _p, _p, _p, _i64, _i64, _p, _int],
    "moeinf_attn_decode_f32": [_p, _p, _p, _p, _i64, _i64, _p, _int, _int],
    "moeinf_rms_norm": [_p, _p, _i64, _f32, _p],
    "moeinf_rms_norm_f32w": [_p, _p, _i64, _f32, _p],
    "moeinf_rms_norm_f32": [_p, _p, _i64, _f32, _p],
    "moeinf_route": [_p, _p, _p, _i64, _i64, _int, _int, _int, _p, _p, _int, _int],
    "moeinf_decode_layers": [_p, _int, _i64, _p, _p, _p, _i64, _i64, _p, _p, _p, _int],
    "moeinf_decode_layers_f32": [_p, _int, _i64, _p, _p, _p, _i64, _i64, _p, _p, _p, _int],
    "moeinf_route_f32": [_p, _p, _p, _i64, _i64, _int, _int, _p, _p],
    "moeinf_step_profile": [_p],
    "moeinf_mla_decode": [_p, _p, _p, _p, _i64, _i64, _p, _int],
    "moeinf_route_v3": [_p, _p, _p, _i64, _i64, _int, _int, _int, _int, _f32, _p, _p],
    "moeinf_route_v3_mt": [_p, _p, _p, _i64, _i64, _int, _int, _int, _int, _f32, _p, _p, _int],
}
_RESTYPES = {
    "moeinf_isa": ctypes.c_char_p,
    "moeinf_qgemv": _int,
    "moeinf_fgemv": _int,
    "moeinf_qgemm": _int,
    "moeinf_qgemm_swiglu": _int,
    "moeinf_experts_acc": _int,
    "moeinf_experts_acc_f32": _int,
    "moeinf_experts_acc_f32_int8": _int,
    "moeinf_attn_decode": _int,
    "moeinf_attn_decode_f32": _int,
    "moeinf_route": _int,
    "moeinf_route_v3": _int,
    "moeinf_route_v3_mt": _int,
    "moeinf_decode_layers": _int,
    "moeinf_decode_layers_f32": _int,
    "moeinf_route_f32": _int,
    "moeinf_mla_decode": _int,
    "moeinf_read_bytes": ctypes.c_uint64,
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}


@dataclass(frozen=True)
class Library:
    """A loaded native library: the ctypes handle, which build it is, what it was compiled for, where."""

    lib: ctypes.CDLL
    build: str
    isa: tuple[str, ...]
    path: Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeinf" / "kernels"


def cpu_features() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them (``flags`` on x86, ``Features`` on Arm);
    None where the system does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def _compiler(env: str, default: str) -> Path | None:
    found = shutil.which(os.environ.get(env) or default)
    return Path(found).resolve() if found else None


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def sources(kind: str) -> list[Path]:
    """The source files of one library (``cpu``: C sources and headers; ``cuda``: .cu and .cuh)."""
    patterns = ("*.c", "*.h") if kind == "cpu" else ("*.cu", "*.cuh")
    return sorted(p for pattern in patterns for p in (CSRC / kind).glob(pattern))


def _source_hash(kind: str) -> str:
    h = hashlib.sha256()
    for path in sources(kind):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _native_marker(cc: Path) -> str:
    """What ``-march=native`` means here: the CPU's flags, or (no /proc/cpuinfo) the compiler's own
    list of the macros it defines for this CPU."""
    features = cpu_features()
    if features is not None:
        return " ".join(sorted(features))
    out = subprocess.run(
        [str(cc), "-march=native", "-dM", "-E", "-x", "c", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout


def cpu_library_path(build: str, cc: Path) -> Path:
    """Where the CPU library of ``build`` by compiler ``cc`` is cached on this machine."""
    flags = BUILDS[build]
    parts = [_source_hash("cpu"), _identity(cc), " ".join(flags + _COMMON_FLAGS), platform.machine()]
    if "-march=native" in flags:
        parts.append(_native_marker(cc))
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu-{build}-{key}.so"


def _compile(command: list[str], out: Path, timeout: int = 300) -> None:
    """Run ``command`` (which writes ``{out}``) aside in the cache folder, then move the result in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        aside = Path(tmp) / out.name
        subprocess.run(
            [str(aside) if part == "{out}" else part for part in command],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        os.replace(aside, out)


def _open(path: Path, build: str) -> Library | None:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = _RESTYPES.get(name)
    isa = tuple(lib.moeinf_isa().decode().split())
    features = cpu_features()
    if features is not None and not set(isa) <= features:
        return None  # compiled for instructions this CPU lacks: never call into it
    return Library(lib, build, isa, path)


def build_cpu(build: str) -> Library | None:
    """Compile (or reuse) and load one CPU build; None when that is impossible here."""
    cc = _compiler("CC", "cc")
    if cc is None or not sources("cpu"):
        return None
    try:
        path = cpu_library_path(build, cc)
        if not path.exists():
            c_files = [str(p) for p in sources("cpu") if p.suffix == ".c"]
            _compile([str(cc), *BUILDS[build], *_COMMON_FLAGS, "-o", "{out}", *c_files, "-lm"], path)
        return _open(path, build)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None


def _wanted_builds() -> tuple[str, ...]:
    setting = os.environ.get("MOEINF_NATIVE_KERNELS", "1").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return ()
    if setting in BUILDS:
        return (setting,)
    return DEFAULT_BUILDS


def cpu() -> Library | None:
    """The CPU kernels for this process (built on first use), or None: turned off, or no compiler."""
    if "cpu" not in _loaded:
        with _lock:
            if "cpu" not in _loaded:
                found = None
                for build in _wanted_builds():
                    found = build_cpu(build)
                    if found is not None:
                        break
                _loaded["cpu"] = found
    return _loaded["cpu"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded libraries (the next call builds or loads again; tests change the settings)."""
    with _lock:
        _loaded.clear()


def nvcc() -> Path | None:
    """The CUDA compiler (``$NVCC``, else ``nvcc`` on PATH), or None."""
    return _compiler("NVCC", "nvcc")


def nvcc_command(arch: str, out: str = "{out}", shared: bool = True) -> list[str]:
    """The nvcc command line that builds the CUDA library for ``arch`` (``sm_80``, ...) into ``out``."""
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc")
    cu_files = [str(p) for p in sources("cuda") if p.suffix == ".cu"]
    mode = ["-shared", "-Xcompiler", "-fPIC"] if shared else ["-c"]
    return [str(compiler), "-O3", f"-arch={arch}", "-std=c++17", *mode, "-o", out, *cu_files]


CUDA_SIGNATURES: dict[str, list] = {
    "moeinf_cuda_dequant": [_int, _p, _p, _i64, _int, _p],
    "moeinf_cuda_formats": [_p, _int],
}


def cuda_library_path(arch: str, compiler: Path) -> Path:
    """Where the CUDA library for ``arch`` built by ``compiler`` is cached."""
    parts = [
        _source_hash("cuda"),
        _identity(compiler),
        " ".join(nvcc_command(arch, "out")),
        platform.machine(),
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / f"cuda-{arch}-{key}.so"


def build_cuda(arch: str) -> Library | None:
    """Compile (or reuse) and load the CUDA library for ``arch``; None when that is impossible here."""
    compiler = nvcc()
    if compiler is None or not sources("cuda"):
        return None
    try:
        path = cuda_library_path(arch, compiler)
        if not path.exists():
            _compile(nvcc_command(arch), path, timeout=900)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in CUDA_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = _int
        return Library(lib, arch, (), path)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None


def cuda() -> Library | None:
    """The CUDA kernels for the current device (built on first use), or None: turned off, no CUDA
    device that torch sees, or no nvcc."""
    if "cuda" not in _loaded:
        with _lock:
            if "cuda" not in _loaded:
                found = None
                if _wanted_builds() and nvcc() is not None:
                    import torch

                    if torch.cuda.is_available():
                        major, minor = torch.cuda.get_device_capability()
                        found = build_cuda(f"sm_{major}{minor}")
                _loaded["cuda"] = found
    return _loaded["cuda"]  # type: ignore[return-value]


def describe() -> str:
    """One line on the kernels in use, for ``moeinf --version``."""
    setting = os.environ.get("MOEINF_NATIVE_KERNELS", "1").strip().lower()
    lib = cpu()
    if lib is not None:
        isa = " ".join(lib.isa) or "baseline ISA"
        line = f"kernels: native CPU ({lib.build} build: {isa})"
    elif not _wanted_builds():
        line = f"kernels: PyTorch (MOEINF_NATIVE_KERNELS={setting})"
    else:
        line = "kernels: PyTorch (no C compiler found; set CC)"
    if nvcc() is not None and _wanted_builds():
        gpu = cuda()
        line += f"; CUDA: native ({gpu.build})" if gpu is not None else "; CUDA: PyTorch (no CUDA device)"
    return line

"""The native-code loader: one build per CPU (the cache key names the CPU features), a build for
instructions the CPU lacks is never used, settings, and the CUDA sources compile where nvcc exists."""

from __future__ import annotations

import shutil

import pytest

from cuda_ext import loader

CC = loader._compiler("CC", "cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH (the PyTorch path is used)")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private kernel cache and a loader that builds again; restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MOEINF_NATIVE_KERNELS", raising=False)
    loader.reset()
    yield tmp_path
    monkeypatch.undo()
    loader.reset()


@needs_cc
def test_cache_key_names_the_cpu_features_for_native_builds_only(fresh, monkeypatch):
    here = loader.cpu_library_path("native", CC)
    monkeypatch.setattr(loader, "cpu_features", lambda: frozenset({"sse2"}))
    other_cpu = loader.cpu_library_path("native", CC)
    assert here != other_cpu and here.parent == other_cpu.parent == fresh / "moeinf" / "kernels"
    monkeypatch.undo()
    portable = loader.cpu_library_path("portable", CC)
    monkeypatch.setattr(loader, "cpu_features", lambda: frozenset({"sse2"}))
    assert loader.cpu_library_path("portable", CC) == portable  # no -march=native: the same build serves both


@needs_cc
def test_cache_key_follows_the_sources(fresh, monkeypatch, tmp_path):
    before = loader.cpu_library_path("portable", CC)
    copy = tmp_path / "csrc"
    shutil.copytree(loader.CSRC, copy)
    (copy / "cpu" / "pool.c").write_text((copy / "cpu" / "pool.c").read_text() + "\n/* changed */\n")
    monkeypatch.setattr(loader, "CSRC", copy)
    assert loader.cpu_library_path("portable", CC) != before


@needs_cc
def test_a_build_for_instructions_this_cpu_lacks_is_never_used(fresh, monkeypatch):
    native = loader.cpu()
    assert (
        native is not None and native.build == "native" and native.path.parent == fresh / "moeinf" / "kernels"
    )
    if not native.isa:
        pytest.skip("this CPU's native build uses no optional instruction set")
    # the same machine, claiming none of those features: the native build it already has would be
    # wrong for it, so the loader must not hand it out (it falls back to the portable build)
    lacking = (loader.cpu_features() or frozenset()) - set(native.isa)
    monkeypatch.setattr(loader, "cpu_features", lambda: lacking)
    assert loader._open(native.path, "native") is None
    loader.reset()
    found = loader.cpu()
    assert found is not None and found.build == "portable" and set(found.isa) <= lacking


@needs_cc
def test_settings_choose_the_build(fresh, monkeypatch):
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "portable")
    loader.reset()
    assert loader.cpu().build == "portable"
    assert loader.describe().startswith("kernels: native CPU (portable build")
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    assert loader.cpu() is None
    assert loader.describe() == "kernels: PyTorch (MOEINF_NATIVE_KERNELS=0)"


def test_no_compiler_means_the_pytorch_path(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    loader.reset()
    assert loader.cpu() is None
    assert loader.describe().startswith("kernels: PyTorch (no C compiler found; set CC)")


def test_sources_ship_with_the_package():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(loader.__file__).parents[1] / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["cuda_ext"]
    for kind in ("cpu", "cuda"):
        for path in loader.sources(kind):
            rel = path.relative_to(loader.CSRC.parent)
            assert any(rel.match(p) for p in patterns), rel

"""The import rules of ARCHITECTURE.md hold: `lint-imports` keeps every contract in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_contract_names_every_engine_package():
    """A new package under engine/ must be placed in the layers, or the contract silently ignores it."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    engine = next(c for c in contracts if c.get("containers") == ["engine"])
    placed = {name.strip(" ()") for layer in engine["layers"] for name in layer.split("|")}
    packages = sorted(p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").is_file())
    missing = [p for p in packages if p not in placed]
    assert not missing, f"engine packages not in the import contract's layers: {missing}"

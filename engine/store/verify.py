"""``verify_model``: re-hash every file of a store model against its manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.store.files import sha256_file
from engine.store.manifest import MANIFEST, read_manifest


@dataclass
class VerifyReport:
    root: Path
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, what is wrong)

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_model(root: str | Path, on_file: Callable[[str, int], None] | None = None) -> VerifyReport:
    """Check size and sha256 of every manifest file and look for files the manifest does not list."""
    root = Path(root)
    manifest = read_manifest(root)
    report = VerifyReport(root)
    files: dict[str, dict] = manifest["files"]
    for rel, info in files.items():
        p = root / rel
        report.checked += 1
        if not p.is_file():
            report.bad.append((rel, "missing"))
        elif p.stat().st_size != info["size"]:
            report.bad.append((rel, f"size {p.stat().st_size}, expected {info['size']}"))
        elif sha256_file(p) != info["sha256"]:
            report.bad.append((rel, "sha256 mismatch"))
        if on_file:
            on_file(rel, info["size"])
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            report.bad.append((rel, "not in the manifest"))
    return report

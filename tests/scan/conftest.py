"""Helpers for the YARA scanner tests: rule files, planted bytes in synthetic guests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sva.vmi.base import MappedBackend

REPO = Path(__file__).resolve().parents[2]
# Public rule sets (elastic, signature-base, Yara-Rules) kept next to the checkout.
TESTDATA_YARA = REPO.parent / "shared" / "testdata" / "yara"


def write_rules(directory: Path, name: str, text: str) -> Path:
    """Write a rule file `name` under `directory` (created) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def poke(backend: MappedBackend, gpa: int, data: bytes) -> None:
    """Change guest-physical bytes of a file-backed backend (its mapping is shared, so the
    backend sees the change at once)."""
    fd = os.open(backend.path, os.O_WRONLY)
    try:
        pos = 0
        for _region, off, n in backend.memory_map.translate(gpa, len(data)):
            os.pwrite(fd, data[pos : pos + n], off)
            pos += n
    finally:
        os.close(fd)


@pytest.fixture
def yara_testdata() -> Path:
    if not (TESTDATA_YARA / "signature-base").is_dir():
        pytest.skip(f"public YARA rule sets not found at {TESTDATA_YARA}")
    return TESTDATA_YARA

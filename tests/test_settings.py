"""Environment variables are read in one module, lazymerge/settings.py, when asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lazymerge
from lazymerge import settings

PACKAGE = Path(lazymerge.__file__).parent
READERS = {"settings.py"}


def test_no_module_but_settings_reads_the_environment() -> None:
    readers = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text(encoding="utf-8"))
    }
    assert readers <= READERS, sorted(readers - READERS)


def test_values_are_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.WRITE_LANES_ENV, "4")
    assert settings.write_lanes() == 4
    monkeypatch.setenv(settings.WRITE_LANES_ENV, "x")
    assert settings.write_lanes() is None
    monkeypatch.setenv(settings.DIRECT_WRITE_ENV, "0")
    assert settings.direct_write() is False
    monkeypatch.delenv(settings.DIRECT_WRITE_ENV)
    assert settings.direct_write() is None
    monkeypatch.setenv(settings.DEBUG_ENV, "false")
    assert not settings.debug_enabled()
    monkeypatch.setenv(settings.PREFETCH_ENV, "0")
    assert not settings.prefetch_enabled()

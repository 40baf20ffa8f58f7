"""atomic_write: whole files, exact modes, exclusive publication (bottle_tasks.sidecars.files)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bottle_tasks.sidecars.files import atomic_write, atomic_write_json


def test_writes_text_or_bytes_creating_parents_with_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.txt"
    assert atomic_write(target, "héllo\n", mode=0o600) == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(target, b"\x00bytes", fsync=True)
    assert target.read_bytes() == b"\x00bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["file.txt"], "no temp file is left behind"


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "decision.json"
    atomic_write_json(target, {"b": 1, "a": "ü"}, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_json(target, {"other": True}, exclusive=True)
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "ü", "b": 1}
    assert target.read_text(encoding="utf-8").startswith('{\n  "a"'), "indented, keys sorted"
    assert os.listdir(tmp_path) == ["decision.json"]

"""Helpers shared by the robustness tests (a module of its own: ``conftest`` is a name every test folder uses)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gen.errors import BespokeError

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """Import ``scripts/<name>.py`` (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bad_inputs = load_script("make_bad_inputs")


def refused(fn: Callable[[], object], exc: type[BaseException] = BespokeError, match: str | None = None) -> str:
    """Run ``fn``, which must raise ``exc`` (a BespokeError) with a one-line message matching ``match``.

    Returns ``"ErrorType: message"`` for the table.
    """
    with pytest.raises(exc) as info:
        fn()
    error = info.value
    assert isinstance(error, BespokeError), f"{type(error).__name__} is not a BespokeError: {error}"
    message = str(error)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    if match is not None:
        assert re.search(match, message), f"{message!r} does not match {match!r}"
    return f"{type(error).__name__}: {message}"


def short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- registry snapshots -------------------------------------------------------------------------


def registry_state(root: Path) -> dict:
    """Everything a registry holds: every table's rows, and every file with its hash (tmp and quarantine too)."""
    state: dict = {}
    index = root / "index.sqlite"
    if index.exists():
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            for table in ("concepts", "versions", "aliases"):
                state[table] = sorted(tuple(row) for row in conn.execute(f"SELECT * FROM {table}"))
        finally:
            conn.close()
    for sub in ("blobs", "tmp", "quarantine"):
        folder = root / sub
        state[sub] = sorted(
            (str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.rglob("*") if p.is_file()
        ) if folder.exists() else []
    return state

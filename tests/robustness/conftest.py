"""Shared pieces of the robustness tests: the bad-input corpus, a tiny base, registry snapshots, and the table.

Every check records a row (area, case, entry point, expected, observed) through the ``observe``
fixture. ``scripts/robustness_report.py`` runs these tests with ``BESPOKE_ROBUSTNESS_JSON`` set and
turns the rows, with each test's outcome, into ``docs/ROBUSTNESS.md``: every row of that table is
a check that ran.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # robustness_helpers, train_child
from robustness_helpers import bad_inputs  # noqa: E402

TABLE_ENV = "BESPOKE_ROBUSTNESS_JSON"
_ROWS: list[dict] = []
_OUTCOMES: dict[str, str] = {}


# --- the table ----------------------------------------------------------------------------------


@pytest.fixture
def observe(request) -> Callable[..., None]:
    """``observe(area, case, entry, expected, observed)``: one row of docs/ROBUSTNESS.md."""

    def record(area: str, case: str, entry: str, expected: str, observed: str) -> None:
        _ROWS.append({"test": request.node.nodeid, "area": area, "case": case, "entry": entry, "expected": expected, "observed": observed})

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" or report.outcome != "passed":
        _OUTCOMES[item.nodeid] = "skipped" if report.skipped else report.outcome
    return report


def pytest_sessionfinish(session):
    path = os.environ.get(TABLE_ENV)
    if path and _ROWS:
        rows = [{**row, "outcome": _OUTCOMES.get(row["test"], "unknown")} for row in _ROWS]
        Path(path).write_text(json.dumps(rows, indent=1, ensure_ascii=False))


# --- corpus and base ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sd():
    """The tiny SD pipeline as a Base and its BaseSpec (built in memory, shared by the session)."""
    from adapters.validate import BaseSpec
    from gen.base import Base
    from gen.tiny import build_tiny_pipeline

    base = Base.from_pipeline(build_tiny_pipeline("sd"))
    return base, BaseSpec.from_base(base)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, sd) -> Path:
    """The bad-input corpus, generated once per session (never committed)."""
    return bad_inputs.make_corpus(tmp_path_factory.mktemp("bad_inputs"), sd[1])


@pytest.fixture
def populated(tmp_path, sd):
    """A registry where alice and bob each hold adapters (both have a ``rex``), and a snapshot function."""
    from adapters.registry import Registry
    from adapters.registry.synthetic import random_adapter

    base, spec = sd
    registry = Registry(tmp_path / "registry", busy_timeout_s=2.0)
    registry.for_user("alice").put(random_adapter(spec, seed=1, std=0.2), base, "rex", trigger="sks", class_word="dog")
    registry.for_user("alice").put(random_adapter(spec, seed=2, std=0.2), base, "cat", trigger="zwx", class_word="cat")
    registry.for_user("bob").put(random_adapter(spec, seed=3, std=0.2), base, "rex", trigger="qqz", class_word="fox")
    yield registry
    registry.close()


# --- proof that nothing unpickles ---------------------------------------------------------------

_GUARD = {"active": False, "events": []}


def _audit(event: str, args: tuple) -> None:
    # Raised by every unpickler (C and Python) when a pickle names a global: any real unpickling
    # of the corpus's pickles would pass here, whichever API reached it.
    if _GUARD["active"] and event == "pickle.find_class":
        _GUARD["events"].append(args)


@pytest.fixture
def no_unpickling(monkeypatch, corpus):
    """Fail the test if anything calls an unpickler or ``torch.load``, or a pickle's code runs.

    Three independent tripwires: the usual entry points are replaced by functions that fail the
    test; an audit hook sees every ``pickle.find_class`` (any unpickler, however reached); and the
    corpus's pickles would create ``UNPICKLED`` when loaded.
    """
    import pickle
    import sys

    import numpy
    import torch

    if not _GUARD.get("installed"):
        sys.addaudithook(_audit)
        _GUARD["installed"] = True

    def tripwire(name: str):
        def called(*args, **kwargs):
            raise AssertionError(f"{name} was called on a user-supplied file")
        return called

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load"), (numpy, "load")):
        monkeypatch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))
    _GUARD["events"].clear()
    _GUARD["active"] = True
    try:
        yield
    finally:
        _GUARD["active"] = False
    assert not _GUARD["events"], f"an unpickler resolved globals: {_GUARD['events']}"
    assert not (corpus / bad_inputs.MARKER).exists(), "a pickle from the corpus was unpickled"

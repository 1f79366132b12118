"""Hostile and broken adapter files through every entry point that accepts one.

Entry points: the format reader (``adapters.formats.read_adapter``: detection, header checks,
loading, validation), the registry's import (``UserRegistry.put(path)``) and the CLI's
``bespoke registry import``. Each refused file gets a one-line error naming the problem; nothing is
written (the registry's tables and files are byte-for-byte as before, no temp files), other users'
adapters are untouched, and no pickle is ever loaded (see ``no_unpickling``).
"""

from __future__ import annotations

import pytest
from robustness_helpers import bad_inputs, refused, registry_state, short

from adapters.formats import read_adapter
from adapters.validate import InvalidAdapter

CASES = bad_inputs.ADAPTER_NAMES


def _case(corpus, name):
    return bad_inputs.adapter_cases(corpus)[name]


@pytest.mark.parametrize("name", CASES)
def test_format_reader(corpus, sd, name, observe, no_unpickling):
    case, path = _case(corpus, name), corpus / "adapters" / name
    if case.expect == "accepted":
        adapter, fmt = read_adapter(path, sd[1])
        observe("adapter files", f"`{name}`: {case.what}", "adapters.formats.read_adapter", "accepted", f"accepted as {fmt}, rank {adapter.rank}")
        return
    observed = refused(lambda: read_adapter(path, sd[1]), InvalidAdapter, case.match)
    observe("adapter files", f"`{name}`: {case.what}", "adapters.formats.read_adapter", f"refused: /{short(case.match, 60)}/", short(observed))


@pytest.mark.parametrize("name", CASES)
def test_registry_import(corpus, populated, sd, name, observe, no_unpickling):
    case, path = _case(corpus, name), corpus / "adapters" / name
    before = registry_state(populated.root)
    alice_rex = populated.get("alice", "rex").tensors
    carol = populated.for_user("carol")
    if case.expect == "accepted":
        record = carol.put(path, sd[0], "imported")
        assert (record.user, record.version) == ("carol", 1)
        observe("adapter files", f"`{name}`: {case.what}", "registry `put(path)`", "accepted", f"stored as carol/imported v{record.version}")
        return
    observed = refused(lambda: carol.put(path, sd[0], "imported"), InvalidAdapter, case.match)
    assert registry_state(populated.root) == before  # no record, no blob, no temp file
    assert all((populated.get("alice", "rex").tensors[k] == t).all() for k, t in alice_rex.items())
    observe("adapter files", f"`{name}`: {case.what}", "registry `put(path)`", "refused; registry unchanged; other users untouched", short(observed))


@pytest.mark.parametrize("name", CASES)
def test_cli_import(corpus, populated, tiny_sd_dir, name, observe, capsys, no_unpickling):
    from demo.cli import main

    case, path = _case(corpus, name), corpus / "adapters" / name
    before = registry_state(populated.root)
    code = main(["registry", "import", "carol", "imported", str(path), "--base", tiny_sd_dir, "--registry", str(populated.root)])
    out, err = capsys.readouterr()
    if case.expect == "accepted":
        assert code == 0 and "imported diffusers adapter as imported v1" in out
        observe("adapter files", f"`{name}`: {case.what}", "CLI `bespoke registry import`", "exit 0", f"exit 0: {out.strip()}")
        return
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert registry_state(populated.root) == before
    observe("adapter files", f"`{name}`: {case.what}", "CLI `bespoke registry import`", "exit 2 with a one-line error; registry unchanged", f"exit {code}: {short(err.strip())}")

"""``bespoke registry ...`` subcommands, driven in-process through their argparse parser."""

from __future__ import annotations

import argparse
import json

import pytest

from adapters.formats import write_adapter
from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from demo.cli_registry import add_registry_commands
from gen.base import load_base
from gen.errors import BespokeError

COMMANDS = ["list", "history", "show", "alias", "rollback", "delete", "export", "import", "verify"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bespoke")
    add_registry_commands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture
def run(tmp_path, capsys):
    root = str(tmp_path / "reg")

    def run(*argv: str) -> tuple[int, str]:
        args = parser().parse_args(["registry", *argv[:1], *argv[1:], "--registry", root])
        code = args.func(args)
        return code, capsys.readouterr().out

    run.root = root
    return run


@pytest.fixture(scope="module")
def base(tiny_sd_dir):
    return load_base(tiny_sd_dir, device="cpu", dtype="float32")


def test_every_subcommand_has_one_line_help(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["registry", "--help"])
    help_text = capsys.readouterr().out
    for command in COMMANDS:
        line = next(line for line in help_text.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split(None, 1)[1]) > 10, command


def test_import_list_show_alias_rollback_export_delete_verify(run, base, tiny_sd_dir, tmp_path):
    spec = BaseSpec.from_base(base)
    source = tmp_path / "src"
    write_adapter(random_adapter(spec, alpha=8), source, "diffusers")
    write_adapter(random_adapter(spec, seed=1), tmp_path / "k.safetensors", "kohya")

    code, out = run("import", "alice", "rex", str(source), "--base", tiny_sd_dir, "--trigger", "sks", "--tag", "dogs", "--alias", "prod")
    assert code == 0 and "imported diffusers adapter as rex v1 (rank 4, alpha 8)" in out
    code, out = run("import", "alice", "rex", str(tmp_path / "k.safetensors"), "--base", tiny_sd_dir)
    assert "imported kohya adapter as rex v2" in out

    code, out = run("list", "alice")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CONCEPT", "VERSION", "ALIASES"] and len(lines) == 3
    assert run("list", "alice", "--tag", "dogs", "--json")[1].count('"version"') == 1
    assert [r["version"] for r in json.loads(run("history", "alice", "rex", "--json")[1])] == [2, 1]
    shown = json.loads(run("show", "alice", "rex", "prod")[1])
    assert shown["version"] == 1 and shown["trigger"] == "sks" and shown["aliases"] == ["prod"]

    assert run("alias", "alice", "rex", "canary", "2")[1].strip() == "rex@canary -> v2"
    assert run("alias", "alice", "rex", "canary", "--remove")[0] == 0
    assert run("rollback", "alice", "rex")[1].strip() == "rex@latest -> v3 (a copy of v1)"
    run("alias", "alice", "rex", "prod", "2")
    assert run("rollback", "alice", "rex", "--alias", "prod", "--to", "1")[1].strip() == "rex@prod -> v1"

    code, out = run("export", "alice", "rex", str(tmp_path / "out.safetensors"), "--format", "kohya", "--version", "2")
    assert code == 0 and out.strip().endswith("out.safetensors")
    assert run("delete", "alice", "rex", "2")[1].strip() == "deleted rex v2"
    code, out = run("verify")
    assert code == 0 and out.splitlines()[-1] == "ok"


def test_user_errors_are_bespoke_errors(run, tmp_path):
    """Each prints as one line in the main CLI; an unsafe file is refused before any base is loaded."""
    with pytest.raises(BespokeError, match="no concept 'rex'"):
        run("show", "alice", "rex")
    with pytest.raises(BespokeError, match="user name '../x'"):
        run("list", "../x")
    with pytest.raises(BespokeError, match="pickle"):
        (tmp_path / "a.bin").write_bytes(b"\x80\x04.")
        run("import", "alice", "rex", str(tmp_path / "a.bin"), "--base", str(tmp_path / "no-such-base"))


def test_verify_exits_1_on_damage(run, base):
    with Registry(run.root) as reg:
        record = reg.for_user("alice").put(random_adapter(BaseSpec.from_base(base)), base, "rex")
        path = reg.blobs.path(record.sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    code, out = run("verify")
    assert code == 1 and "damaged: alice/rex v1" in out

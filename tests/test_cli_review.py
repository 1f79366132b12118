"""CLI review: a bad --out, seeds and ports out of range, Ctrl-C and generate's sidecar, each refused or handled in one line."""

from __future__ import annotations

import json
import warnings

import pytest

from demo.cli import main


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BESPOKE_HOME", str(tmp_path))
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # main() sets both for its process: give them back after
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    return main


def _one_error_line(stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr and len(errors) == 1 and message in errors[0], stderr


def test_an_unusable_out_is_refused_before_any_work(cli, tmp_path, capsys, monkeypatch):
    """`--out` naming a file raised FileExistsError, after the images (or the photos, the report) were made."""
    import gen

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setattr(gen, "load_base", lambda *a, **k: pytest.fail("the base was loaded before --out was checked"))
    assert cli(["generate", "--prompt", "x", "--out", str(a_file / "sub")]) == 2
    _one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert cli(["sample-subject", "robot-3", "--out", str(a_file)]) == 2
    _one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert cli(["eval", "--train", "--out", str(a_file)]) == 2
    _one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert a_file.read_text() == "x"


def test_eval_seed_and_demo_port_out_of_range_are_usage_errors(cli, capsys):
    """`eval --eval-seed -1` was parsed (for an adapter it reached numpy as a ValueError traceback); `demo --port 70000` reached Gradio's bind() as one."""
    for argv, message in [
        (["eval", "--train", "--eval-seed", "-1"], "seed must be between 0 and"),
        (["demo", "--port", "70000"], "port must be between 1 and 65535, got 70000"),
    ]:
        with pytest.raises(SystemExit) as exited:
            cli(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_bad_names_and_options_are_refused_before_the_base_is_sampled(cli, tiny_sd_dir, tmp_path, capsys, monkeypatch):
    """`quickstart --train-steps 0` was falsy, so the preset's 800 steps ran; bad names and options were refused only
    after the fidelity hook and captions had sampled the base for a minute."""
    import adapters.fidelity
    import gen
    from gen.base import load_base

    tiny = load_base(tiny_sd_dir)
    monkeypatch.setattr(gen, "load_base", lambda *a, **k: tiny)
    monkeypatch.setattr("gen.base.load_base", lambda *a, **k: tiny)
    for hook in ("world_fidelity_hook", "world_captions"):
        monkeypatch.setattr(adapters.fidelity, hook, lambda *a, **k: pytest.fail("the base was sampled before the request was checked"))
    assert cli(["quickstart", "--train-steps", "0", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "q")]) == 2
    _one_error_line(capsys.readouterr().err, "steps must be >= 1, got 0")
    train = ["train", "--class-word", "robot", "--images", str(tmp_path), "--registry", str(tmp_path / "reg")]
    assert cli([*train, "--user", "../x", "--concept", "robo"]) == 2
    _one_error_line(capsys.readouterr().err, "user")
    assert cli([*train, "--user", "alice", "--concept", "robo", "--lr", "nan"]) == 2
    _one_error_line(capsys.readouterr().err, "lr must be a finite number")


def test_ctrl_c_prints_one_line_and_exits_130(cli, capsys, monkeypatch):
    import demo.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.cli, "cmd_generate", interrupted)
    try:
        code = cli(["generate", "--prompt", "x"])
    except KeyboardInterrupt:  # escaping main() it would end the test session, not fail this test
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "interrupted"


def test_generate_keeps_earlier_runs_in_the_sidecar_and_says_when_it_replaces_a_png(tiny_sd_dir, cli, tmp_path, capsys):
    """A second run into the same --out rewrote provenance.json with its own records alone, and replaced a PNG without a word."""
    out = tmp_path / "out"
    common = ["generate", "--base", tiny_sd_dir, "--prompt", "a red mug", "--steps", "1", "--out", str(out)]
    assert cli([*common, "--seed", "3"]) == 0
    assert cli([*common, "--seed", "5", "-n", "2"]) == 0
    capsys.readouterr()
    assert [r["seed"] for r in json.loads((out / "provenance.json").read_text())] == [3, 5, 6]
    with pytest.warns(UserWarning, match="replaced .*0000000005.png"):
        assert cli([*common, "--seed", "5", "--prompt", "a blue mug"]) == 0
    records = json.loads((out / "provenance.json").read_text())
    assert [(r["seed"], r["prompt"]) for r in records] == [(3, "a red mug"), (6, "a red mug"), (5, "a blue mug")]
    assert sorted(p.name for p in out.iterdir()) == ["0000000003.png", "0000000005.png", "0000000006.png", "provenance.json"]


def test_training_flags_show_the_values_the_presets_run():
    """Each flag showed TrainConfig's own default ("--steps ... 400") while the built-in presets run 300/800/1500."""
    import argparse

    from adapters.train.config import PRESETS, add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    steps = "/".join(str(cfg.steps) for cfg in PRESETS["builtin"].values())
    assert f"builtin {steps}" in text and "TrainConfig default" not in text
    assert "[default: None]" not in text  # alpha, resolution: their help says what stands in

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from gen.provenance import read_provenance

ROOT = Path(__file__).resolve().parents[1]


def bespoke(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BESPOKE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "demo.cli", *args], capture_output=True, text=True, env=env, timeout=600)  # a safety net for a loaded machine, not a speed check


def test_help_lists_each_command_in_a_line(tmp_path):
    out = bespoke("--help", home=tmp_path)
    assert out.returncode == 0
    for command in ["generate", "quickstart"]:
        assert any(line.strip().startswith(command + " ") for line in out.stdout.splitlines()), command


def test_building_the_parser_imports_neither_torch_nor_diffusers():
    """`bespoke --help` and argument errors stay instant: the flags come from torch-free modules."""
    code = "import sys; from demo.cli import build_parser; build_parser(); print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_generate_writes_pngs_with_provenance_and_a_sidecar(tiny_sd_dir, tmp_path):
    out_dir = tmp_path / "out"
    run = bespoke("generate", "--base", tiny_sd_dir, "--prompt", "a red mug", "-n", "2", "--seed", "3", "--steps", "3", "--out", str(out_dir), home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    pngs = sorted(out_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["0000000003.png", "0000000004.png"]
    sidecar = json.loads((out_dir / "provenance.json").read_text())
    assert [r["seed"] for r in sidecar] == [3, 4]
    prov = read_provenance(pngs[1])
    assert prov.seed == 4 and prov.prompt == "a red mug" and prov.steps == 3
    assert np.asarray(Image.open(pngs[0])).shape == (64, 64, 3)


def _one_error_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr


def test_user_errors_print_one_line_and_no_traceback(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    run = bespoke("generate", "--base", str(tmp_path / "missing"), "--prompt", "x", home=tmp_path)  # one in a real process: exit code, stderr
    assert run.returncode == 2, run.stderr
    _one_error_line(run.stderr, "no base at")
    from demo.cli import main

    monkeypatch.setenv("BESPOKE_HOME", str(tmp_path))
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # main() sets both for its process: give them back after
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cases = [  # the rest through the same entry point in this process (a subprocess costs seconds of imports each)
        (["generate", "--base", tiny_sd_dir, "--prompt", "  "], "prompt is empty"),
        (["generate", "--base", tiny_sd_dir, "--prompt", "x", "--height", "63"], "not a multiple of the VAE factor"),
        (["generate", "--base", tiny_sd_dir, "--prompt", "x", "--dtype", "float16", "--device", "cpu"], "float16 cannot run on the cpu"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        _one_error_line(capsys.readouterr().err, message)


def test_quickstart_personalizes_a_sample_subject_and_saves_a_before_after_grid(tiny_sd_dir, tmp_path):
    out_dir = tmp_path / "quick"
    run = bespoke(
        "quickstart", "--base", tiny_sd_dir, "--subject", "mug-2", "--preset", "quick", "--train-steps", "2", "--registry", str(tmp_path / "reg"),
        "--out", str(out_dir), home=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "trained quickstart/mug_2 v1" in run.stdout
    grid = Image.open(out_dir / "before_after.png")
    assert grid.width > 4 * 128 and grid.height > 5 * 128  # photos row + 4 prompts, 4 columns


def test_quickstart_names_an_unknown_subject(tmp_path):
    run = bespoke("quickstart", "--subject", "dragon-1", home=tmp_path)
    assert run.returncode == 2 and "unknown sample subject 'dragon-1'" in run.stderr and "Traceback" not in run.stderr


def test_seeds_and_photo_counts_out_of_range_are_usage_errors(tmp_path, monkeypatch, capsys):
    """A huge seed reached torch (a traceback); `sample-subject -n 0` succeeded having written nothing."""
    import pytest

    from demo.cli import main

    monkeypatch.setenv("BESPOKE_HOME", str(tmp_path))
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    for seed in ("100000000000000000000", "-3"):
        with pytest.raises(SystemExit) as exited:  # argparse: before any base is loaded
            main(["generate", "--prompt", "x", "--seed", seed, "--out", str(tmp_path / "out")])
        assert exited.value.code == 2
        assert f"seed must be between 0 and {2**63 - 1} (2**63 - 1), got {int(seed)}" in capsys.readouterr().err
    for n in ("0", "-1", "101"):
        assert main(["sample-subject", "robot-3", "--out", str(tmp_path / "photos"), "-n", n]) == 2
        _one_error_line(capsys.readouterr().err, f"-n/--num-images must be between 1 and 100, got {n}")
    assert not (tmp_path / "photos").exists()

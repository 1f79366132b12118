"""scripts/pretrain_base.py at toy size: a crashed run resumes to exactly the weights of an unbroken one.

The resumed run also renders with two processes and prepares batches in a DataLoader worker, which
must not change what it learns either.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_base", ROOT / "scripts" / "pretrain_base.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_base"] = module  # worker processes unpickle batches by module name
    spec.loader.exec_module(module)
    return module


def _args(out: Path, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--pool-size", "48", "--vae-steps", "2", "--steps", "4", "--batch", "2", "--checkpoint-every", "2",
        "--sample-every", "1000", "--sample-steps", "2", "--unet-channels", "32,32", "--vae-channels", "16,16,16", "--threads", "1", *extra,
    ]


def _unet(out: Path) -> dict:
    return load_file(out / "base" / "unet" / "diffusion_pytorch_model.safetensors")


def test_crash_and_resume_with_workers_matches_an_unbroken_run(tmp_path, monkeypatch):
    pretrain = _script()
    pretrain.main(_args(tmp_path / "straight"))

    crashed = tmp_path / "crashed"
    original = pretrain.StepBatches.__getitem__

    def crash_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(pretrain.StepBatches, "__getitem__", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(_args(crashed))
    monkeypatch.setattr(pretrain.StepBatches, "__getitem__", original)
    assert (crashed / "checkpoint" / "step.json").read_text() == '{"step": 2}'

    pretrain.main(_args(crashed, "--render-workers", "2", "--loader-workers", "1"))
    straight, resumed = _unet(tmp_path / "straight"), _unet(crashed)
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight)
    assert (crashed / "samples_000004.png").is_file()


def test_a_decoder_only_run_changes_the_decoder_and_nothing_the_unet_was_trained_on(tmp_path):
    pretrain = _script()
    pretrain.main(_args(tmp_path / "first"))
    pretrain.main(_args(tmp_path / "decoder", "--init-from", str(tmp_path / "first" / "base"), "--vae-decoder-steps", "2", "--steps", "0"))
    vae = lambda out: load_file(out / "base" / "vae" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    before, after = vae(tmp_path / "first"), vae(tmp_path / "decoder")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all((before[k] == after[k]).all() for k in encoder)  # the latents are the same latents
    assert any((before[k] != after[k]).any() for k in before if k.startswith("decoder."))
    unet_before, unet_after = _unet(tmp_path / "first"), _unet(tmp_path / "decoder")
    assert all((unet_before[k] == unet_after[k]).all() for k in unet_before)


def test_a_sample_grid_without_denoising_steps_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _script().main(_args(tmp_path / "out", "--sample-steps", "0"))
    assert "--sample-steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "--batch must be at least 1"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["--pool-size", "0"], "--pool-size must be at least 1"),
        (["--steps", "-1"], "--steps must be at least 0"),
        (["--init-from", "no/such/base"], "is not a saved base"),
    ],
)
def test_bad_sizes_and_a_missing_init_are_refused_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        _script().main(_args(tmp_path / "out", *extra))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_holding_a_run_with_other_settings_is_refused_and_the_same_run_resumes(tmp_path, capsys):
    pretrain = _script()
    out = tmp_path / "out"
    cfg, _ = pretrain.parse_args(_args(out))
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (out / "vae_metrics.json").write_text(json.dumps({"steps": 2}))
    with pytest.raises(SystemExit):
        pretrain.parse_args(_args(out, "--seed", "1"))
    assert "seed: 0 there, 1 now" in capsys.readouterr().err
    resumed, _ = pretrain.parse_args(_args(out, "--render-workers", "2", "--steps", "6"))  # how long and how spread: fine
    assert resumed.steps == 6


def test_a_crash_while_saving_keeps_the_previous_base_whole(tmp_path, monkeypatch):
    from gen.tiny import build_tiny_pipeline

    pretrain = _script()
    pipe = build_tiny_pipeline("sd")
    pretrain.save_base(pipe, pretrain.PretrainConfig(), tmp_path, [])
    before = sorted(p.name for p in (tmp_path / "base").iterdir())

    def killed(*args, **kwargs):  # asdict runs for bespoke.json, after diffusers has written model_index.json
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(pretrain, "asdict", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.save_base(pipe, pretrain.PretrainConfig(), tmp_path, [])
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before and "bespoke.json" in before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert next(pipe.unet.parameters()).dtype == torch.float32


def test_shipping_that_fails_midway_keeps_the_shipped_base(tmp_path, monkeypatch):
    pretrain = _script()
    new, shipped = tmp_path / "new", tmp_path / "shipped"
    for folder, text in ((new, "new"), (shipped, "old")):
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(text)
        (folder / "unet" / "weights").write_text(text)
    real_copy = shutil.copytree

    def copy_then_die(src, dst, **kwargs):
        Path(dst).mkdir()
        shutil.copy(Path(src) / "model_index.json", dst)
        raise OSError("disk full")

    monkeypatch.setattr(pretrain.shutil, "copytree", copy_then_die)
    with pytest.raises(OSError):
        pretrain.ship_base(new, shipped)
    assert (shipped / "unet" / "weights").read_text() == "old" and (shipped / "model_index.json").read_text() == "old"
    monkeypatch.setattr(pretrain.shutil, "copytree", real_copy)
    pretrain.ship_base(new, shipped)
    assert (shipped / "unet" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "shipped"]

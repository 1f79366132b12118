"""scripts/pretrain_base.py at toy size: a crashed run resumes to exactly the weights of an unbroken one.

The resumed run also renders with two processes and prepares batches in a DataLoader worker, which
must not change what it learns either.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
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

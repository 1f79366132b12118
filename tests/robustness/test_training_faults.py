"""Training under faults: killed mid-run it resumes to the same adapter; a bad learning rate registers nothing.

The kill is real: a child process trains and is SIGKILLed after its second checkpoint (a torn
third checkpoint is left beside it, as a kill during a save would). Resuming in this process
replays only the remaining steps and ends with exactly the tensors of an uninterrupted run. The
trainer's own checkpoint files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robustness_helpers import ROOT, refused, registry_state, short
from train_child import SETTINGS, job

from adapters.registry import Registry
from adapters.samples import save_sample_subject
from adapters.train import TrainingDiverged, personalize, resolve_config, train_adapters
from gen.base import load_base
from gen.errors import InvalidRequest

HERE = Path(__file__).parent


@pytest.fixture
def photos(tmp_path) -> Path:
    save_sample_subject("mug-2", tmp_path / "photos", n=3)
    return tmp_path / "photos"


def _kill_after(step: int, base_dir: str, photos: Path, run_dir: Path, tmp_path: Path) -> float:
    """Start the child, wait until it has checkpointed ``step``, SIGKILL it; returns seconds until the kill."""
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, str(HERE / "train_child.py"), base_dir, str(photos), str(run_dir), str(ready), str(step)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        while not ready.exists():
            if child.poll() is not None:
                raise AssertionError(f"the training child exited early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() - started > 300:
                raise AssertionError("the training child did not reach its checkpoint in 300 s")
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    return time.monotonic() - started


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_adapter(tiny_sd_dir, photos, tmp_path, monkeypatch, observe):
    base = load_base(tiny_sd_dir)
    (straight,) = train_adapters(base, job(photos), resolve_config(base, output_dir=str(tmp_path / "straight"), **SETTINGS))

    run_dir = tmp_path / "killed"
    _kill_after(2, tiny_sd_dir, photos, run_dir, tmp_path)
    assert json.loads((run_dir / "checkpoint-000002" / "train_state.json").read_text())["step"] == 2
    torn = run_dir / "checkpoint-000003"  # a kill during the next save: files, but no train_state.json
    torn.mkdir()
    (torn / "lora.safetensors").write_bytes(b"half a checkpoint")

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    steps = []
    cfg = resolve_config(base, output_dir=str(run_dir), **SETTINGS)
    (resumed,) = train_adapters(base, job(photos), cfg, progress=lambda s, t, i: steps.append(s) if i["phase"] == "train" else None)
    monkeypatch.undo()

    assert steps == [3, 4]  # from the last complete checkpoint; the torn one was ignored, then overwritten
    assert resumed.loss_curve == pytest.approx(straight.loss_curve)
    assert resumed.adapter.tensors.keys() == straight.adapter.tensors.keys()
    for key, tensor in straight.adapter.tensors.items():
        torch.testing.assert_close(resumed.adapter.tensors[key], tensor, rtol=0, atol=0)
    assert loads and all(w is True for w in loads), loads  # optimizer/RNG state: the restricted unpickler only
    observe(
        "training", "training process SIGKILLed after checkpoint 2 of 4 (plus a torn checkpoint 3)", "`train_adapters` with `resume`",
        "resumes at step 3, ignores the torn checkpoint, ends with the uninterrupted run's tensors",
        f"resumed steps {steps}; all {len(straight.adapter.tensors)} tensors identical; torch.load only with weights_only=True ({len(loads)} calls)",
    )


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_non_finite_learning_rate_is_refused_before_training(sd, populated, photos, lr, observe):
    base, _ = sd
    before = registry_state(populated.root)
    observed = refused(
        lambda: personalize(base, "carol", "mug", photos, "mug", registry=populated, preset="quick", lr=lr, steps=2), InvalidRequest, rf"lr must be a finite number, got {lr}"
    )
    assert registry_state(populated.root) == before
    observe("training", f"lr={lr}", "`personalize(lr=...)`", "refused before any work; nothing registered", short(observed))


def test_a_diverging_run_stops_and_registers_nothing(sd, populated, photos, tmp_path, observe):
    base, _ = sd
    before = registry_state(populated.root)
    observed = refused(
        lambda: personalize(base, "carol", "mug", photos, "mug", registry=populated, preset="quick", lr=1e30, warmup_steps=0, steps=4,
                            num_class_images=2, class_image_steps=2, output_dir=str(tmp_path / "run")),
        TrainingDiverged, r"training diverged at step \d \(loss carol/mug: (nan|inf)\).*try a lower learning rate",
    )
    assert registry_state(populated.root) == before
    assert populated.for_user("alice").get("rex").version == 1
    observe("training", "lr=1e30 (finite, but the loss becomes NaN)", "`personalize(lr=1e30)` with a registry", "TrainingDiverged naming the step; nothing registered; other users untouched", short(observed))

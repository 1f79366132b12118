"""Review fixes in the world and in the scripts that train on it: odd specs and captions, bad sizes, crashes while saving."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gen import evaluator as ev
from gen import world
from gen.evaluate import stated_attributes
from gen.world import Instance, SceneSpec, parse_caption

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _spec(**overrides) -> SceneSpec:
    base = dict(instance=Instance("mug", 42), background="blue", scene="plain", position="center", size="large", count=1, accessory="none")
    return SceneSpec(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"count": 2.0}, "count must be an integer"),  # passed `in COUNTS`, then broke caption() with a TypeError
        ({"count": True}, "count must be an integer"),
        ({"instance": Instance("mug", 3.0)}, "no such instance"),  # was a raw TypeError from tuple indexing
        ({"instance": ("mug", 3)}, "expected an Instance"),  # was an AttributeError
    ],
)
def test_specs_with_mistyped_fields_are_refused_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        _spec(**overrides)


def test_a_prompt_without_a_background_states_no_scene():
    assert parse_caption("a photo of a sks mug")["scene"] is None
    assert "scene" not in stated_attributes("a photo of a sks mug")  # so a prompt scorer does not check one
    assert parse_caption("a mug on a red background")["scene"] == "plain"
    assert parse_caption("a mug in front of a blue wall")["scene"] == "plain"
    assert parse_caption("a mug on grass")["scene"] == "grass"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--views-per-instance", "3"], "--views-per-instance must be at least 4"),
        (["--eval-n", "0"], "--eval-n must be at least 1"),
        (["--seed", "-1"], "--seed must be at least 0"),
    ],
)
def test_train_evaluator_refuses_bad_sizes_before_rendering(tmp_path, monkeypatch, capsys, argv, message):
    script = _script("train_evaluator")
    monkeypatch.setattr(script, "build_pool", lambda cfg: pytest.fail("rendered the pool before checking the arguments"))
    with pytest.raises(SystemExit):
        script.main([*argv, "--out", str(tmp_path / "evaluator")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "evaluator").exists()


def test_train_evaluator_killed_while_saving_keeps_the_old_evaluator(tmp_path, monkeypatch):
    script = _script("train_evaluator")
    out = tmp_path / "evaluator"
    old = ev.Evaluator(ev.EvaluatorConfig())
    ev.save_evaluator(old, out, {"metrics": "old"})
    metrics = {"attributes": {"class": 1.0}, "attributes_held_out": {"class": 1.0}, "identity_auc_same_class": 1.0}
    monkeypatch.setattr(script.torch, "set_num_threads", lambda n: None)  # main's thread count would outlive the test
    monkeypatch.setattr(script, "build_pool", lambda cfg: None)
    monkeypatch.setattr(script, "train", lambda cfg, pool: ev.Evaluator(ev.EvaluatorConfig()))
    monkeypatch.setattr(script, "measure_accuracy", lambda model, n, seed: metrics)
    monkeypatch.setattr(script, "format_table", lambda m: "")
    real_save_file = ev.save_file

    def killed_after_the_weights(state, path):
        real_save_file(state, path)
        raise KeyboardInterrupt("killed before config.json")

    monkeypatch.setattr(ev, "save_file", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--out", str(out), "--epochs", "1"])
    loaded = ev.load_evaluator(out)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
    assert json.loads((out / "config.json").read_text())["metrics"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluator"]
    monkeypatch.setattr(ev, "save_file", real_save_file)
    script.main(["--out", str(out), "--epochs", "1"])
    assert json.loads((out / "config.json").read_text())["metrics"] == metrics


def test_eval_base_reports_the_evaluators_stored_accuracy():
    metrics = _script("eval_base").evaluator_metrics()
    assert metrics == json.loads((ev.DEFAULT_DIR / "config.json").read_text())["metrics"] and metrics["attributes"]


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n must be at least 1"), (["--per-class", "0"], "--per-class must be at least 1"),
                                           (["--steps", "0"], "--steps must be at least 1")])
def test_eval_base_refuses_bad_sizes_before_loading_anything(tmp_path, monkeypatch, capsys, argv, message):
    script = _script("eval_base")
    monkeypatch.setattr(script, "load_base", lambda *a, **k: pytest.fail("loaded the base before checking the arguments"))
    with pytest.raises(SystemExit):
        script.main([*argv, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

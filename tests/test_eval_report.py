"""``bespoke eval`` end to end on tiny pipelines: one registered adapter (with composition) and a training
configuration with a metrics-over-steps curve, each writing HTML + JSON + PNGs; and bench_dreambooth's quick mode."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from demo.cli import main
from gen.base import load_base
from test_evaluate import tiny_clip_dir  # noqa: F401  (a fixture: a tiny CLIP model saved to a folder)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--prompts", "4", "--images-per-prompt", "2", "--prior-images", "2", "--sample-steps", "2"]


def _check_report(folder: Path) -> dict:
    """The page's images all exist, and the JSON parses (strictly: no NaN)."""
    html = (folder / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images, "the report shows no images"
    for name in images:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 1000, name
    data = json.loads((folder / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
    assert sorted(data["files"]) == sorted(images)
    return data


@pytest.fixture
def registry_with_two(tiny_sd_dir, tmp_path) -> Path:
    base = load_base(tiny_sd_dir)
    spec = BaseSpec.from_base(base)
    with Registry(tmp_path / "reg") as registry:
        alice = registry.for_user("alice")
        alice.put(random_adapter(spec, rank=4, alpha=4.0, seed=1, std=0.2), base, "robo", trigger="sks", class_word="robot", metrics={"loss/step_000010": 0.3, "loss/step_000020": 0.2})
        alice.put(random_adapter(spec, rank=4, alpha=4.0, seed=2, std=0.2), base, "mugg", trigger="zwx", class_word="mug")
    return tmp_path / "reg"


def test_eval_of_a_registered_adapter_writes_html_json_and_pngs(tiny_sd_dir, registry_with_two, tmp_path, capsys):
    out = tmp_path / "report"
    code = main([
        "eval", "--base", tiny_sd_dir, "--registry", str(registry_with_two), "--user", "alice", "--concept", "robo",
        "--subject", "robot-0", "--compose", "mugg", "--compose-subject", "mug-0", "--composition-prompts", "2", *SMALL, "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert code == 0 and str(out / "report.html") in printed and "alice/robo v1: subject fidelity" in printed
    data = _check_report(out)
    files = set(data["files"])
    assert {"references.png", "prior.png", "layer_norms.png", "spectra.png", "effective_rank.png", "loss_curve.png", "composition_joint.png", "overlap.png"} <= files
    assert any(f.startswith("samples_") for f in files)
    metrics = data["metrics"]
    for key in ("subject_fidelity", "prompt_fidelity", "diversity", "prior_identity_similarity", "prior_drift_identity", "memorization_copy_rate",
                "prompt_fidelity/recontextualization", "prompt_fidelity/accessorization", "prompt_fidelity/property"):
        assert isinstance(metrics[key], float), key
    assert data["adapter"]["concept"] == "robo" and data["adapter"]["version"] == 1
    assert len(data["per_prompt"]) == 4 and all("<robo>" in p["prompt"] for p in data["per_prompt"])
    assert data["diagnostics"]["summary"]["layers"] > 0 and data["diagnostics"]["layers"][0]["relative_norm"] > 0
    comp = data["composition"]
    assert comp["names"] == ["alice/robo v1", "alice/mugg v1"] and "alice/robo v1/leakage" in comp["metrics"]
    assert 0 <= comp["overlap"]["summary"]["mean_column_overlap"] <= 1
    assert data["subject"]["references_are_training_data"] is None  # the record holds no data fingerprints
    html = (out / "report.html").read_text()
    assert "DreamBench" in html and "Composition with alice/mugg v1" in html and "&lt;robo&gt;" in html


def test_eval_refuses_unclear_requests_with_one_line_errors(tiny_sd_dir, registry_with_two, tmp_path, capsys):
    common = ["eval", "--base", tiny_sd_dir, "--registry", str(registry_with_two), "--user", "alice", *SMALL, "--out", str(tmp_path / "x")]
    assert main([*common, "--concept", "robo"]) == 2
    assert "exactly one of --subject or --references" in capsys.readouterr().err
    assert main([*common, "--concept", "nope", "--subject", "robot-0"]) == 2
    assert "no concept 'nope'" in capsys.readouterr().err
    assert main([*common, "--concept", "robo", "--subject", "robot-77"]) == 2
    assert "robot-77 is not a held-out subject" in capsys.readouterr().err
    assert main(["eval", "--base", tiny_sd_dir, "--out", str(tmp_path / "y")]) == 2
    assert "--train" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_refuses_flags_of_the_other_mode_before_loading_anything(monkeypatch, capsys):
    """Such flags were parsed and dropped: ``--train --subject robot-3`` trained robot-0 without a word."""
    import adapters.evaluation
    import gen.base

    def never(*a, **k):
        raise AssertionError("the request should have been refused first")

    for name in ("evaluate_adapter", "evaluate_config"):
        monkeypatch.setattr(adapters.evaluation, name, never)
    monkeypatch.setattr(gen.base, "load_base", never)
    adapter = ["eval", "--user", "alice", "--concept", "robo", "--subject", "robot-3"]
    cases = (
        (["eval", "--train", "--subject", "robot-3"], "--subject is for evaluating a registered adapter, not for --train; pick sample subjects with --subjects"),
        (["eval", "--train", "--user", "alice", "--version", "7", "--class-word", "dog"], "--user, --version, --class-word are for evaluating a registered adapter"),
        (["eval", "--train", "--compose", "mia"], "--compose is for evaluating"),
        ([*adapter, "--preset", "best"], "--preset is for --train"),
        ([*adapter, "--subjects", "mug-0", "--curve-steps", "1,2"], "--subjects, --curve-steps are for --train"),
        ([*adapter, "--rank", "32", "--no-text-encoder-lora"], "--rank, --text-encoder-lora are for --train"),
        (["eval", "--train", "--curve-steps", "1,2", "--steps", "9"], "--curve-steps sets --steps"),
    )
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_eval_of_a_training_configuration_checks_every_subject_before_training(monkeypatch):
    """A misspelt second subject failed only after the first had trained fully."""
    import adapters.train
    from adapters.evaluation import evaluate_config
    from gen.errors import EvaluationError

    trained = []
    monkeypatch.setattr(adapters.train, "personalize", lambda *a, **k: trained.append(a) or pytest.fail("trained before checking the names"))
    with pytest.raises(EvaluationError, match="robot-99 is not a held-out subject.*robot-0 to robot-9"):
        evaluate_config(None, ["robot-0", "robot-99"])  # no base needed: refused before anything uses it
    assert trained == []


def test_eval_of_a_training_configuration_reports_a_curve_over_steps(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "config"
    code = main([
        "eval", "--train", "--base", tiny_sd_dir, "--subjects", "robot-0", "--preset", "quick", "--curve-steps", "1,2",
        "--num-class-images", "2", "--class-image-steps", "2", "--batch-size", "1", *SMALL, "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    index = json.loads((out / "report.json").read_text())
    assert [s["subject"] for s in index["subjects"]] == ["robot-0"] and "metric_curve.png" in index["files"]
    sub = _check_report(out / "robot-0")
    assert [p["step"] for p in sub["curve"]] == [1.0, 2.0]
    assert "metric_curve.png" in sub["files"] and "loss_curve.png" in sub["files"]
    assert sub["subject"]["references_are_training_data"] is True
    assert sub["record"]["training_config"]["steps"] == 2 and sub["record"]["metrics"]["steps"] == 2.0
    assert 'href="robot-0/report.html"' in (out / "report.html").read_text()


def test_bench_dreambooth_quick_runs_end_to_end(tiny_sd_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_dreambooth

    out = tmp_path / "db.json"
    results = bench_dreambooth.main(["--quick", "--base", tiny_sd_dir, "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"dreambooth_lora", "dreambooth_lora_no_prior", "textual_inversion"}
    assert set(data["findings"]) == {
        "lora_beats_textual_inversion_on_subject_fidelity", "prior_preservation_lowers_class_drift", "overtraining_raises_subject_lowers_prompt_fidelity",
    }
    assert [p["step"] for p in data["curve"]["mean"]] == [2.0, 4.0]
    assert Path(results["plot"]).is_file()
    # Textual inversion's LoRA must not move: its update stays ~0 while DreamBooth-LoRA's does not.
    assert data["methods"]["textual_inversion"]["mean"]["lora_relative_norm"] < 1e-4 < data["methods"]["dreambooth_lora"]["mean"]["lora_relative_norm"]
    table = bench_dreambooth.table(results["methods"], markdown=True)
    assert table.startswith("| method |") and "Textual inversion" in table


def test_a_base_outside_the_world_is_judged_by_a_local_clip_with_dreambench_prompts(tiny_sd_dir, tiny_clip_dir, tmp_path):
    from adapters.evaluation import Subject, evaluate_adapter, write_report
    from adapters.samples import save_sample_subject
    from gen.benchmark import BenchmarkSettings
    from gen.embedders import load_judge
    from gen.errors import EvaluationError

    base = load_base(tiny_sd_dir)
    adapter = replace(random_adapter(BaseSpec.from_base(base), rank=2, seed=5, std=0.2), user="bo", concept="rex", version=3, trigger="sks", class_word="dog")
    with pytest.raises(EvaluationError, match="give a local CLIP"):
        load_judge(base, "dog")  # the world has no dogs
    subject = Subject.from_files([save_sample_subject("cat-1", tmp_path / "photos", n=3)[0].parent], base.default_size)
    assert len(subject.references) == 3 and len(subject.fingerprints) == 3
    ev = evaluate_adapter(base, adapter, subject, judge=load_judge(base, "dog", clip=tiny_clip_dir),
                          settings=BenchmarkSettings(prompts=4, images_per_prompt=2, prior_images=2, steps=2))
    assert any("jungle" in p["prompt"] or "beach" in p["prompt"] for p in ev.run.per_prompt)
    assert all("<rex>" in p["prompt"] for p in ev.run.per_prompt)
    assert -1.0 <= ev.run.metrics["prompt_fidelity"] <= 1.0 and "prior_class_accuracy" not in ev.run.metrics
    data = _check_report(tmp_path / "report") if write_report(ev, tmp_path / "report") else None
    assert data["judge"]["identity"].startswith("CLIP") and data["adapter"]["version"] == 3


def test_a_low_subject_fidelity_is_blamed_on_the_autoencoder_only_when_its_ceiling_is_low():
    from adapters.evaluation import metric_warnings

    (capped,) = metric_warnings({"subject_fidelity": 0.70, "autoencoder_ceiling": 0.80})
    assert "autoencoder alone brings the photos down to 0.80" in capped
    (untrained,) = metric_warnings({"subject_fidelity": 0.70, "autoencoder_ceiling": 0.95})
    assert "not learned well" in untrained
    assert metric_warnings({"subject_fidelity": 0.90, "autoencoder_ceiling": 0.80}) == []

"""Review of evaluation and diagnostics: metrics where real vs real is at or below the class floor, empty
inputs, unnamed adapters composed, repeated subjects, and report tables over broken or mixed-rank layers."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from adapters.diagnostics import AdapterDiagnostics, LayerStats, diagnose
from adapters.samples import sample_subject_images
from gen.adapter import LoraAdapter
from gen.base import load_base
from gen.benchmark import BenchmarkRun, BenchmarkSettings, generic_prompts, score_benchmark, world_prompts
from gen.errors import EvaluationError
from gen.evaluate import Judge, WorldEmbedder, diversity, fidelity_above_class
from gen.report import HtmlReport
from test_evaluate import TableEmbedder  # noqa: E402  (tests/ is on the path, as for demo_support)


def _run(reference_rows, generated_row, class_row):
    """A benchmark run on four generic prompts (two images each) with the given embeddings."""
    def image(i):
        return Image.new("RGB", (8, 8), (i * 20 % 255, i * 7 % 255, i * 3 % 255))

    references = [image(i) for i in range(len(reference_rows))]
    generated = [[image(10 + 2 * k), image(11 + 2 * k)] for k in range(4)]
    prior_adapted, prior_base = [image(30), image(31)], [image(40), image(41)]
    table = {id(im): row for im, row in zip(references, reference_rows)}
    table.update({id(im): generated_row for group in generated for im in group})
    table.update({id(im): class_row for im in prior_adapted + prior_base})
    prompts = generic_prompts("dog", 4)
    run = BenchmarkRun(prompts, [p.text("sks dog") for p in prompts], generated, prior_adapted, prior_base, references, {}, [], {})
    return run, Judge(identity=TableEmbedder(table))


def test_subject_above_class_is_nan_not_a_blow_up_when_real_vs_real_is_not_above_the_class_floor():
    # real vs real 0.196, the base's class images 0.770 like the photos: the old ratio gave -166648
    run, judge = _run([[1, 0], [0.2, 1]], [1, 0.01], [1, 1])
    metrics = score_benchmark(run, judge, "dog").metrics
    assert metrics["prior_identity_similarity_base"] > metrics["real_vs_real"]
    assert math.isnan(metrics["subject_fidelity_above_class"])
    # real vs real exactly 0: per-kind subject fidelity divided by it (ZeroDivisionError); now 0 as subject_fidelity is
    run, judge = _run([[1, 0], [0, 1]], [1, 0.01], [1, 1])
    metrics = score_benchmark(run, judge, "dog").metrics
    assert metrics["subject_fidelity"] == metrics["subject_fidelity/recontextualization"] == 0.0
    assert math.isnan(metrics["subject_fidelity_above_class"])
    # a real scale still gives the ratio
    assert fidelity_above_class(0.8, 0.9, 0.7) == pytest.approx(0.5)
    assert math.isnan(fidelity_above_class(0.8, 0.7, 0.7)) and math.isnan(fidelity_above_class(0.8, 0.705, 0.7))


def test_the_training_hook_leaves_out_subject_above_class_when_the_class_floor_is_above_real_vs_real(monkeypatch):
    """The base's class images are the photos themselves, so the floor (self-similarity included) tops real vs real."""
    from adapters import fidelity

    photos = sample_subject_images("robot-3", 4)

    class Recorder:
        def __init__(self, base=None):
            pass

        def generate(self, prompt, num_images, **sampling):
            return SimpleNamespace(images=photos * (num_images // len(photos)))

        def generate_many(self, requests):
            return [SimpleNamespace(images=photos[:1] * r.num_images) for r in requests]

    monkeypatch.setattr(fidelity, "Sampler", Recorder)
    settings = fidelity.FidelitySettings(prompts=2, images_per_prompt=1, prior_images=4, steps=1)
    hook = fidelity.world_fidelity_hook(load_base("builtin"), "robot", photos, settings)
    metrics = hook(Recorder(), SimpleNamespace(trigger="sks"))
    assert metrics["prior_identity_similarity_base"] > metrics["real_vs_real"]
    assert "subject_fidelity_above_class" not in metrics  # the old ratio: a number in the thousands
    assert all(math.isfinite(v) for v in metrics.values())


def test_diversity_of_no_images_is_an_evaluation_error_for_any_embedder():
    for images in ([], sample_subject_images("robot-3", 1)):
        with pytest.raises(EvaluationError, match="two images of one prompt"):
            diversity(images, WorldEmbedder())  # no images: a ValueError from np.stack inside the evaluator


def test_world_prompts_for_a_word_outside_the_world_name_the_world_classes():
    with pytest.raises(EvaluationError, match="'dog' is not a class of the built-in world"):
        world_prompts("dog")  # was a bare StopIteration


def _adapter(seed: int, class_word: str) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {"unet.l.lora_A.weight": torch.randn(2, 8, generator=g), "unet.l.lora_B.weight": torch.randn(6, 2, generator=g)}
    return LoraAdapter(tensors, 2, 2.0, ("l",), "fp", class_word=class_word)


def test_two_unnamed_adapters_compose_under_two_names():
    """Adapters without user, concept or version are both "adapter": scoring them refused after all the sampling."""
    from adapters.evaluation import Subject, _compose

    robot, mug = sample_subject_images("robot-3", 2), sample_subject_images("mug-0", 2)
    run = BenchmarkRun(world_prompts("robot", 2), [], [robot, robot], [], [], robot, {}, [], {})
    settings = BenchmarkSettings(prompts=2, images_per_prompt=2)
    comp = _compose(lambda requests: [[robot[0]] * r.num_images for r in requests], SimpleNamespace(default_size=64), _adapter(1, "robot"),
                    Subject("robot-3", robot), (_adapter(2, "mug"), Subject("mug-0", mug)), run, Judge.world(), settings, 2, None)
    assert comp.names[0] != comp.names[1] and comp.overlap.names == comp.names
    assert {f"{name}/joint_fidelity" for name in comp.names} <= set(comp.metrics)


def test_a_subject_named_twice_is_refused_before_training(monkeypatch):
    import adapters.train
    from adapters.evaluation import evaluate_config

    monkeypatch.setattr(adapters.train, "personalize", lambda *a, **k: pytest.fail("trained a subject named twice"))
    with pytest.raises(EvaluationError, match="robot-0 given more than once"):
        evaluate_config(None, ["robot-0", "mug-0", "robot-0"])  # refused before the base is used


def test_the_largest_updates_table_lists_a_broken_layer_first_and_the_rest_in_order(tmp_path):
    from adapters.evaluation import _diagnostics_section

    nan = float("nan")
    norms = [7.0, 9.0, nan, 6.0, 3.0, 5.0, 12.0, 4.0, 11.0, 2.0, 8.0, 10.0, 1.0]  # an order a NaN sort key scrambled
    layers = [
        LayerStats(f"unet.l{int(v)}", (4, 4), 2, v, 100.0, (v, 0.0), 1.0, 1.0) if math.isfinite(v)
        else LayerStats("unet.broken", (4, 4), 2, nan, 100.0, (), nan, nan, ("non-finite",))
        for v in norms
    ]
    report = HtmlReport(tmp_path, "t")
    _diagnostics_section(report, AdapterDiagnostics(layers))
    html = "".join(report.parts)
    listed = re.findall(r"<td>(unet\.[a-z0-9]+)</td>", html[html.index("the ten largest updates"):])
    assert listed == ["unet.broken", *[f"unet.l{n}" for n in range(12, 3, -1)]]


def test_the_effective_rank_plot_names_the_largest_rank_when_layers_differ():
    from adapters.evaluation import _rank_lines

    def layer(rank):
        return LayerStats("unet.l", (4, 4), rank, 1.0, None, (1.0,), 1.0, 1.0)

    assert _rank_lines([layer(4), layer(4)]) == {"LoRA rank 4": 4}
    assert _rank_lines([layer(4), layer(16)]) == {"largest LoRA rank 16 (ranks 4-16)": 16}  # was "LoRA rank 4", the first layer's


def test_a_composition_sharing_no_layer_says_so_instead_of_nan(tmp_path):
    from adapters.diagnostics import subspace_overlap
    from adapters.evaluation import CompositionRun, _composition_section

    first = _adapter(1, "robot")
    second = LoraAdapter({k.replace("unet.l.", "unet.m."): v for k, v in _adapter(2, "mug").tensors.items()}, 2, 2.0, ("m",), "fp")
    overlap = subspace_overlap(first, second)
    photos = sample_subject_images("robot-3", 1)
    comp = CompositionRun(("a", "b"), {}, overlap, ["a and b"], [photos], {"a": photos, "b": photos}, {"a": photos, "b": photos})
    report = HtmlReport(tmp_path, "t")
    _composition_section(report, comp)
    html = "".join(report.parts)
    assert "nan" not in html and "update no layer in common" in html


def test_a_zero_update_on_a_zero_weight_is_dead_not_exploding():
    a = LoraAdapter({"unet.l.lora_A.weight": torch.randn(2, 8), "unet.l.lora_B.weight": torch.zeros(6, 2, dtype=torch.bfloat16)}, 2, 2.0, ("l",), "fp")
    (layer,) = diagnose(a, {"unet.l": torch.zeros(6, 8)}).layers
    assert layer.flags == ("dead",) and layer.relative_norm == 0.0


def test_the_config_reports_mean_of_a_metric_no_subject_has_is_nan_without_a_warning():
    import warnings

    from adapters.evaluation import _mean_of

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.nanmean warned "Mean of empty slice" for a judge without class accuracy
        assert math.isnan(_mean_of([None, None])) and _mean_of([None, 1.0, float("nan"), 3.0]) == 2.0


def test_a_trigger_that_is_a_world_word_is_neither_scored_nor_steers_the_prompts(monkeypatch):
    """With the trigger "red", "a red robot" read as a recoloured robot: prompt fidelity then scored a colour nobody asked for."""
    from adapters import fidelity

    photos = sample_subject_images("robot-3", 4)
    asked: dict[str, list[str]] = {}

    class Recorder:
        def __init__(self, base=None):
            self.trigger = None

        def generate(self, prompt, num_images, **sampling):
            return SimpleNamespace(images=photos * (num_images // len(photos)))

        def generate_many(self, requests):
            asked[self.trigger] = [r.prompt for r in requests]
            return [SimpleNamespace(images=photos[:1] * r.num_images) for r in requests]

    monkeypatch.setattr(fidelity, "Sampler", Recorder)
    settings = fidelity.FidelitySettings(prompts=4, images_per_prompt=1, prior_images=4, steps=1)
    hook = fidelity.world_fidelity_hook(load_base("builtin"), "robot", photos, settings)
    metrics = {}
    for trigger in ("zq", "red", "left"):
        sampler = Recorder()
        sampler.trigger = trigger
        metrics[trigger] = hook(sampler, SimpleNamespace(trigger=trigger))
    assert all(f"{t} robot" in p for t in ("red", "left") for p in asked[t][:-1])  # the trigger is still what is sampled
    assert [p.replace("zq", "red") for p in asked["zq"]] == asked["red"]  # and it did not change which captions were drawn
    assert metrics["red"]["prompt_fidelity"] == metrics["left"]["prompt_fidelity"] == metrics["zq"]["prompt_fidelity"]


def test_the_verdict_says_when_one_photo_leaves_real_vs_real_unmeasured_and_the_json_keeps_composition_alarms():
    from adapters.evaluation import AdapterEvaluation

    photos = sample_subject_images("robot-3", 2)
    overlap = SimpleNamespace(warnings=["the two adapters share layer x"])
    ev = SimpleNamespace(
        run=SimpleNamespace(metrics={"subject_fidelity": 0.9}), diagnostics=SimpleNamespace(warnings=[]), judge={"prompt": "world"},
        subject=SimpleNamespace(references=photos[:1]), composition=SimpleNamespace(overlap=overlap),
    )
    alarms = AdapterEvaluation.alarms(ev)
    assert alarms[0].startswith("one reference photo") and alarms[-1] == "the two adapters share layer x"
    ev.subject.references = photos
    assert AdapterEvaluation.alarms(ev) == ["the two adapters share layer x"]

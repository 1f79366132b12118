"""Evaluation metrics on constructed cases with known answers: identical images, different subjects,
a copied training photo, a constant image; the benchmark's prompts and scoring on real world renders;
composition arithmetic; and CLIP/DINO judges loaded from a local folder (never downloaded)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.samples import sample_subject_images, subject_instance
from gen import world
from gen.adapter import Fingerprints, LoraAdapter
from gen.base import load_base
from gen.benchmark import (
    DREAMBENCH_KINDS,
    BenchmarkRun,
    class_prompt,
    evaluation_specs,
    generic_prompts,
    score_benchmark,
    world_prompts,
)
from gen.composition import composition_metrics, merge_adapters
from gen.embedders import load_judge
from gen.errors import EvaluationError
from gen.evaluate import (
    Judge,
    PixelEmbedder,
    WorldPromptScorer,
    as_embedder,
    autoencoder_ceiling,
    diversity,
    mean_similarity,
    memorization,
    prior_preservation,
    prompt_fidelity,
    real_vs_real,
    subject_fidelity,
)
from gen.evaluator import load_evaluator

CONSTANT = Image.new("RGB", (64, 64), (128, 128, 128))


@pytest.fixture(scope="module")
def photos():
    return sample_subject_images("robot-3", 4)


@pytest.fixture(scope="module")
def judge():
    return Judge.world()


class TableEmbedder:
    """Embeds each image as a fixed vector looked up by identity: metrics with exact answers."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def embed(self, images):
        return torch.nn.functional.normalize(torch.tensor([self.table[id(im)] for im in images], dtype=torch.float32), dim=1)


def test_identical_images_give_full_fidelity_zero_diversity_and_are_copies(photos):
    one = photos[0]
    same = subject_fidelity([one] * 3, [one] * 3)
    assert same["identity_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert same["real_vs_real"] == pytest.approx(1.0, abs=1e-5) and same["subject_fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert diversity([one] * 4) == pytest.approx(0.0, abs=1e-6)
    copies = memorization([one, one], photos)
    assert copies.copy_rate == 1.0 and copies.nearest_index == [0, 0]
    assert copies.nearest_similarity[0] == pytest.approx(1.0, abs=1e-5) and copies.nearest_distance == [0.0, 0.0]


def test_the_same_subject_in_new_scenes_scores_high_and_a_different_subject_low(photos):
    instance = subject_instance("robot-3")
    renders = [world.render(spec, 100 + i) for i, (kind, spec) in enumerate(evaluation_specs("robot", 6, 1, instance)) if kind != "colour"]
    same = subject_fidelity(renders, photos)["subject_fidelity"]
    other_robot = subject_fidelity(sample_subject_images("robot-4", 4), photos)["subject_fidelity"]
    other_class = subject_fidelity(sample_subject_images("mug-0", 4), photos)["subject_fidelity"]
    assert same > 0.95 > other_robot > other_class
    assert other_class < 0.5
    assert 0.5 < real_vs_real(photos) <= 1.0


def test_a_copied_training_photo_is_flagged_and_a_new_scene_is_not(photos):
    instance = subject_instance("robot-3")
    new_scene = world.render(evaluation_specs("robot", 1, 5, instance)[0][1], 7)
    result = memorization([new_scene, photos[2].copy()], photos)
    assert result.copies == [1]
    assert result.nearest_index[1] == 2 and result.nearest_distance[1] == 0.0
    assert result.nearest_distance[0] > 0.1 and result.nearest_similarity[0] < result.threshold
    summary = result.summary()
    assert summary["memorization_copy_rate"] == 0.5 and summary["memorization_min_distance"] == 0.0
    assert summary["memorization_training_nearest"] < 0.95  # the photos themselves are not copies of each other


def test_a_constant_image_has_no_identity_no_prompt_and_no_copy(photos, judge):
    fidelity = subject_fidelity([CONSTANT] * 2, photos)["subject_fidelity"]
    assert fidelity < 0.3
    assert PixelEmbedder().embed([CONSTANT]).abs().sum() == 0  # featureless
    assert diversity([CONSTANT] * 3) == 0.0  # identical constant images are not diverse
    assert memorization([CONSTANT], photos).copies == []
    assert memorization([CONSTANT], [CONSTANT]).copies == [0]  # but a constant photo is copied by a constant image
    prompt = "a photo of a robot on a red background, on the left"
    assert prompt_fidelity([CONSTANT], [prompt]) < 0.5
    assert prompt_fidelity([world.render(world.SceneSpec(world.Instance("robot", 5), "red", "plain", "left", "large", 1, "none"), 0)], [prompt]) == 1.0


def test_the_autoencoder_ceiling_is_one_when_lossless_low_when_destructive_and_below_one_for_the_builtin_vae(photos, monkeypatch):
    import gen.evaluate

    base = load_base("builtin")
    builtin = autoencoder_ceiling(base, photos)
    assert 0.5 < builtin < 1.0  # a 0.68M-parameter VAE at 64 px loses some of the subject, not all of it
    assert base.pipe.vae.dtype == torch.float32
    monkeypatch.setattr(gen.evaluate, "autoencode", lambda base, images: list(images))
    assert autoencoder_ceiling(base, photos) == pytest.approx(1.0)  # each photo against the others: real vs real
    monkeypatch.setattr(gen.evaluate, "autoencode", lambda base, images: [CONSTANT] * len(images))
    assert autoencoder_ceiling(base, photos) < 0.3
    with pytest.raises(EvaluationError, match="at least 2"):
        autoencoder_ceiling(base, photos[:1])


def test_the_scene_ceiling_scores_the_true_subject_in_the_evaluation_scenes(photos, monkeypatch):
    from adapters import fidelity

    base, evaluator = load_base("builtin"), load_evaluator()
    subject, other = subject_instance("robot-3"), subject_instance("robot-4")
    specs = fidelity.evaluation_specs(subject.cls, 8, 0, subject)
    builtin = fidelity.scene_ceiling(base, subject, specs, photos, evaluator)
    assert 0.8 < builtin < 1.05  # the decoder loses a little of the subject, as in the photos' own scenes
    assert fidelity.scene_ceiling(base, other, specs, photos, evaluator) < builtin - 0.05  # another robot is not this one
    monkeypatch.setattr(fidelity, "autoencode", lambda base, images: list(images))
    assert fidelity.scene_ceiling(base, subject, specs, photos, evaluator) == pytest.approx(1.0, abs=0.05)  # lossless: as real vs real


def test_the_training_fidelity_hook_samples_with_its_settings_steps_seed_and_guidance(photos, monkeypatch):
    """The hook's settings reach every request: the base's reference images and the adapter's prompts alike."""
    from adapters import fidelity

    seen = []

    class Recorder:
        def __init__(self, base=None):
            pass

        def generate(self, prompt, num_images, **sampling):
            seen.append(sampling)
            return type("Generation", (), {"images": photos[:1] * num_images})()

        def generate_many(self, requests):
            seen.extend({"seed": r.seed, "steps": r.steps, "guidance_scale": r.guidance_scale} for r in requests)
            return [type("Generation", (), {"images": photos[:1] * r.num_images})() for r in requests]

    monkeypatch.setattr(fidelity, "Sampler", Recorder)
    settings = fidelity.FidelitySettings(prompts=2, images_per_prompt=1, prior_images=2, steps=3, guidance_scale=1.7, seed=5)
    instance = subject_instance("robot-3")
    hook = fidelity.world_fidelity_hook(load_base("builtin"), instance.cls, photos, settings, instance=instance)
    metrics = hook(Recorder(), SimpleNamespace(trigger="sks"))
    assert len(seen) == 1 + 2 + 1  # the base's class images, then two prompts and the class prompt
    assert all(s == {"seed": 5, "steps": 3, "guidance_scale": 1.7} for s in seen), seen
    assert metrics["subject_fidelity"] > 0.9  # the photos themselves came back


def test_metrics_with_a_plugged_in_embedder_have_exact_answers():
    a, b, c = (Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3))
    emb = TableEmbedder({id(a): [1.0, 0.0], id(b): [0.0, 1.0], id(c): [1.0, 1.0]})
    assert mean_similarity([a], [b], emb) == pytest.approx(0.0)
    assert mean_similarity([a], [c], emb) == pytest.approx(2**-0.5)
    assert real_vs_real([a, b], emb) == pytest.approx(0.0)
    assert diversity([a, b, a, a], emb, groups=[0, 0, 1, 1]) == pytest.approx(0.5)  # group 0: 1 - 0, group 1: 1 - 1
    assert memorization([c, a], [a, b], emb, threshold=0.99).copies == [1]
    with pytest.raises(EvaluationError, match="two images of one prompt"):
        diversity([a, b], emb, groups=[0, 1])
    with pytest.raises(EvaluationError, match="not an Embedder"):
        as_embedder(object())
    with pytest.raises(EvaluationError, match="need at least 1"):
        subject_fidelity([], [a], emb)


def test_prior_preservation_sees_the_class_collapse_onto_the_subject(photos, judge):
    others = [im for name in ("robot-5", "robot-6", "robot-7", "robot-8") for im in sample_subject_images(name, 1)]
    unchanged = prior_preservation(others, others, photos, judge, "robot")
    assert unchanged["prior_drift_identity"] == pytest.approx(0.0, abs=1e-6) and unchanged["prior_class_shift"] == pytest.approx(0.0, abs=1e-6)
    assert unchanged["prior_class_accuracy"] == 1.0
    collapsed = prior_preservation(sample_subject_images("robot-3", 4, seed=9), others, photos, judge, "robot")
    assert collapsed["prior_drift_identity"] > 0.05 and collapsed["prior_class_shift"] > 0.0
    broken = prior_preservation([CONSTANT] * 4, others, photos, judge, "robot")
    assert broken["prior_drift_class_accuracy"] < -0.5


def test_world_prompts_cover_dreambench_kinds_and_read_back_from_renders(photos, judge):
    instance = subject_instance("robot-3")
    prompts = world_prompts("robot", 8, 0, instance)
    assert {p.kind for p in prompts} == set(DREAMBENCH_KINDS)
    assert all("{subject}" in p.template and "{" not in p.plain for p in prompts)
    assert all(p.text("<robo>").count("<robo>") == 1 for p in prompts)
    assert [p.keeps_identity for p in prompts] == [p.kind != "property" for p in prompts]
    assert world.parse_caption(prompts[3].plain)["colour"] is not None  # property change states a colour
    assert {p.kind for p in generic_prompts("dog", 8)} == set(DREAMBENCH_KINDS)
    assert class_prompt("robot") == "a photo of a robot" and class_prompt("owl") == "a photo of an owl"

    # Real renders of exactly what the prompts ask: the benchmark must score them as near perfect ...
    renders = [[world.render(spec, 300 + 2 * i + k) for k in range(2)] for i, (_, spec) in enumerate(evaluation_specs("robot", 8, 0, instance))]
    base_prior = sample_subject_images("robot-5", 4)
    good = score_benchmark(BenchmarkRun(prompts, [p.text("sks robot") for p in prompts], renders, base_prior, base_prior, photos, {}, [], {}), judge, "robot")
    m = good.metrics
    assert m["subject_fidelity"] > 0.95 and m["prompt_fidelity"] > 0.9
    assert all(f"prompt_fidelity/{kind}" in m for kind in DREAMBENCH_KINDS) and "subject_fidelity/property" not in m
    assert m["diversity"] > 0.05 and m["memorization_copy_rate"] < 0.25 and m["prior_drift_identity"] == pytest.approx(0.0, abs=1e-6)
    assert set(good.attribute_accuracy) >= {"background", "position", "accessory", "object_colour"}
    assert len(good.per_prompt) == 8 and all(r["prompt_score"] is not None for r in good.per_prompt)
    # ... and a model that draws the same constant picture for everything as a failure on every count.
    constant = [[CONSTANT, CONSTANT] for _ in prompts]
    bad = score_benchmark(BenchmarkRun(prompts, [p.text("sks robot") for p in prompts], constant, [CONSTANT] * 4, base_prior, photos, {}, [], {}), judge, "robot").metrics
    assert bad["subject_fidelity"] < 0.3 and bad["prompt_fidelity"] < 0.5 and bad["diversity"] == 0.0
    assert bad["prior_drift_class_accuracy"] < -0.5


def test_world_prompt_scorer_counts_each_stated_attribute():
    spec = world.SceneSpec(world.Instance("mug", 4), "blue", "grass", "right", "large", 1, "hat")
    image = world.render(spec, 1)
    scorer = WorldPromptScorer()
    assert scorer.score([image], ["a mug wearing a hat on blue grass, on the right"]) == [1.0]
    wrong = scorer.hits([image], ["a mug wearing a bow on red grass, on the left"])[0]
    assert wrong["class"] and wrong["scene"] and not wrong["accessory"] and not wrong["background"] and not wrong["position"]


def _adapter(tensors, rank, alpha, concept):
    return LoraAdapter(tensors=tensors, rank=rank, alpha=alpha, target_modules=("x",), base_fingerprint="f", concept=concept, trigger="t", class_word="dog")


def test_merged_adapters_apply_the_sum_of_their_updates():
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a = _adapter({"unet.x.lora_A.weight": t(2, 5), "unet.x.lora_B.weight": t(6, 2)}, 2, 4.0, "a")
    b = _adapter({"unet.x.lora_A.weight": t(3, 5), "unet.x.lora_B.weight": t(6, 3), "unet.y.lora_A.weight": t(3, 4), "unet.y.lora_B.weight": t(4, 3)}, 3, 3.0, "b")
    merged = merge_adapters(a, [(b, 0.5)])

    def delta(ad, m):
        return ad.scale * ad.tensors[f"unet.{m}.lora_B.weight"] @ ad.tensors[f"unet.{m}.lora_A.weight"]

    assert merged.rank == 5 and merged.scale == 1.0 and merged.concept == "a" and merged.trigger == "t"
    assert torch.allclose(delta(merged, "x"), delta(a, "x") + 0.5 * delta(b, "x"), atol=1e-5)
    assert torch.allclose(delta(merged, "y"), 0.5 * delta(b, "y"), atol=1e-5)  # a does not touch y
    with pytest.raises(EvaluationError, match="different bases"):
        merge_adapters(a, [(replace(b, base_fingerprint="g"), 1.0)])
    # One base's adapters recorded under either of its fingerprints (older ones hashed every weight) compose.
    both = Fingerprints(adapted=a.base_fingerprint, weights="w")
    assert merge_adapters(a, [(replace(b, base_fingerprint="w"), 1.0)], base=both).base_fingerprint == a.base_fingerprint
    with pytest.raises(EvaluationError, match="different bases"):
        merge_adapters(a, [(replace(b, base_fingerprint="g"), 1.0)], base=both)


def test_composition_scores_each_concept_against_its_own_references(photos):
    mugs = sample_subject_images("mug-0", 4)
    emb = as_embedder(None)
    robot_look = sample_subject_images("robot-3", 4, seed=5)
    m = composition_metrics({"robo": photos, "mugg": mugs}, emb, robot_look, solo={"robo": robot_look, "mugg": mugs}, composed={"robo": robot_look, "mugg": robot_look})
    assert m["robo/joint_fidelity"] > 0.9 > 0.5 > m["mugg/joint_fidelity"]  # the robot took over the joint prompt
    assert m["joint_balance"] > 0.4
    assert m["robo/leakage"] == pytest.approx(0.0, abs=1e-6) and m["robo/interference"] == pytest.approx(0.0, abs=1e-6)
    assert m["mugg/leakage"] > 0.3 and m["mugg/interference"] > 0.3  # composed mug images became robots
    assert m["robo/real_cross_similarity"] == pytest.approx(m["mugg/real_cross_similarity"], abs=1e-6)


def test_composition_scores_a_featureless_reference_zero_as_subject_fidelity_does(photos):
    """A featureless photo (a zero embedding) pulls real vs real to 0; the ratio is 0 there, never a ZeroDivisionError."""
    emb = PixelEmbedder()
    featureless = [CONSTANT, photos[0]]
    assert real_vs_real(featureless, emb) == 0.0
    m = composition_metrics({"blank": featureless, "robo": photos}, emb, photos[:1], solo={"blank": photos[:1], "robo": photos[:1]},
                            composed={"blank": photos[:1], "robo": photos[:1]})
    assert m["blank/joint_fidelity"] == m["blank/solo_fidelity"] == m["blank/composed_fidelity"] == 0.0
    assert m["blank/joint_fidelity"] == subject_fidelity(photos[:1], featureless, emb)["subject_fidelity"]


# --- judges from a local folder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from gen.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_clip_tokenizer("a photo of a red robot dog on the beach".split(), str(folder / "tok"), num_merges=50)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "bos_token_id": len(tokenizer) - 2, "eos_token_id": len(tokenizer) - 1, "pad_token_id": len(tokenizer) - 1}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def test_a_local_clip_folder_judges_any_base_and_nothing_is_downloaded(tiny_clip_dir, photos, tmp_path):
    judge = load_judge(None, "dog", clip=tiny_clip_dir)
    emb = judge.identity.embed(photos)
    assert emb.shape[0] == 4 and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert subject_fidelity([photos[0]] * 2, [photos[0]] * 2, judge.identity)["subject_fidelity"] == pytest.approx(1.0, abs=1e-4)
    scores = judge.prompt.score(photos[:2], ["a photo of a dog", "a red robot"])
    assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores)
    assert judge.describe()["prompt"].startswith("CLIP")
    with pytest.raises(EvaluationError, match="does not exist"):
        load_judge(None, "dog", clip=tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="cannot load"):
        load_judge(None, "dog", clip=tmp_path / "empty")
    with pytest.raises(EvaluationError, match="give a local CLIP"):
        load_judge(None, "dog")


def test_a_local_dino_folder_gives_identity_embeddings(tmp_path, photos):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    judge = load_judge(None, "robot", dino=tmp_path / "dino")
    assert judge.prompt is None and judge.identity.name.startswith("DINO")
    assert real_vs_real([photos[1]] * 3, judge.identity) == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(mean_similarity(photos, [CONSTANT], judge.identity))

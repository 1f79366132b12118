"""The shipped evaluator: loads from safetensors, reads attributes and identity on fresh renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gen import world
from gen.evaluator import (
    ATTRIBUTES, DEFAULT_DIR, Evaluator, EvaluatorConfig, identity_embeddings, identity_similarity,
    load_evaluator, measure_accuracy, read_attributes, roc_auc, save_evaluator,
)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return load_evaluator()


def test_shipped_files_are_small_and_documented():
    weights = DEFAULT_DIR / "model.safetensors"
    assert weights.stat().st_size < 3 * 1024 * 1024
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert set(config["metrics"]["attributes"]) == set(ATTRIBUTES)
    assert config["command"].startswith("python scripts/train_evaluator.py")
    assert min(config["metrics"]["attributes"].values()) >= 0.97
    assert config["metrics"]["identity_auc_same_class"] >= 0.98


def test_loading_never_unpickles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    model = load_evaluator(DEFAULT_DIR)
    assert not model.training


def test_forward_shapes_and_unit_embeddings(evaluator):
    out = evaluator(torch.rand(3, 3, 64, 64))
    assert out["embedding"].shape == (3, evaluator.config.embed_dim)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(3), atol=1e-5)
    for name, values in ATTRIBUTES.items():
        assert out[name].shape == (3, len(values))


def test_image_formats_agree(evaluator):
    rng = np.random.default_rng(0)
    specs = [world.sample_spec(rng) for _ in range(4)]
    array = world.render_batch(specs, [2**41 + i for i in range(4)])
    pil = [world.render(s, 2**41 + i) for i, s in enumerate(specs)]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    read = read_attributes(evaluator, array)
    assert read == read_attributes(evaluator, pil) == read_attributes(evaluator, tensor)
    assert set(read[0]) == set(ATTRIBUTES)
    assert torch.allclose(identity_embeddings(evaluator, array), identity_embeddings(evaluator, pil), atol=1e-5)


def test_identity_similarity_prefers_the_same_instance(evaluator):
    rng = np.random.default_rng(1)
    subject, other = world.Instance("cat", 3), world.Instance("cat", 4)

    def views(instance, k):
        specs = [world.sample_spec(rng, instances=[instance], colour_override_prob=0.0) for _ in range(k)]
        return world.render_batch(specs, 2**41 + rng.integers(0, 2**30, size=k))

    a, b, c = views(subject, 6), views(subject, 6), views(other, 6)
    assert identity_similarity(a, b, evaluator) > identity_similarity(a, c, evaluator) + 0.1


def test_measured_accuracy_on_fresh_renders(evaluator):
    metrics = measure_accuracy(evaluator, n=256, seed=12345)
    for name in ATTRIBUTES:
        assert metrics["attributes"][name] >= 0.95, (name, metrics["attributes"][name])
        assert metrics["attributes_held_out"][name] >= 0.95, (name, metrics["attributes_held_out"][name])
        assert metrics["chance"][name] < 0.75
    assert metrics["identity_auc_same_class"] >= 0.95
    assert metrics["identity_auc_any_class"] >= 0.95


def test_roc_auc():
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(widths=(8, 16), hidden=16, embed_dim=8)).eval()
    save_evaluator(model, tmp_path, {"note": "tiny"})
    loaded = load_evaluator(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(model(x)["embedding"], loaded(x)["embedding"])
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "tiny"

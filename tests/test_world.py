"""The procedural world: determinism, identity, held-out sets, and captions that match specs."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from gen import world
from gen.world import (
    ACCESSORIES, CLASSES, COLOURS, HELD_OUT_INSTANCES, POSITIONS, SCENES, SIZES, VOCABULARY,
    Instance, SceneSpec, caption, class_prompt, instance_traits, is_held_out, is_held_out_combination,
    parse_caption, render, render_batch, sample_dataset, sample_spec,
)


def _spec(**overrides) -> SceneSpec:
    base = dict(instance=Instance("mug", 42), background="blue", scene="plain", position="center",
                size="large", count=1, accessory="none", colour=None)
    return SceneSpec(**{**base, **overrides})


def test_render_is_deterministic_by_seed_and_64x64_rgb():
    spec = _spec()
    a, b, c = render(spec, 3), render(spec, 3), render(spec, 4)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_render_batch_matches_render():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(5)]
    batch = render_batch(specs, [10, 11, 12, 13, 14])
    assert batch.shape == (5, 64, 64, 3) and batch.dtype == np.uint8
    for spec, seed, image in zip(specs, range(10, 15), batch):
        assert np.array_equal(image, np.asarray(render(spec, seed)))


def test_instances_are_distinct_and_stable_within_a_class():
    for cls in CLASSES:
        traits = [instance_traits(Instance(cls, i)) for i in range(world.INSTANCES_PER_CLASS)]
        assert len(set(traits)) == len(traits)
        assert all(t.primary != t.secondary for t in traits)
    assert instance_traits(Instance("cat", 7)) == instance_traits(Instance("cat", 7))
    with pytest.raises(ValueError):
        instance_traits(Instance("cat", world.INSTANCES_PER_CLASS))


def test_held_out_instances_are_never_sampled_for_pretraining():
    assert len(HELD_OUT_INSTANCES) == len(CLASSES) * world.N_HELD_OUT_PER_CLASS
    assert all(is_held_out(i) for i in HELD_OUT_INSTANCES)
    rng = np.random.default_rng(1)
    assert not any(is_held_out(sample_spec(rng).instance) for _ in range(2000))
    assert all(is_held_out(sample_spec(rng, instances="held_out").instance) for _ in range(200))
    chosen = [Instance("bird", 3)]
    assert all(sample_spec(rng, instances=chosen).instance == chosen[0] for _ in range(20))


def test_held_out_combinations_are_about_a_tenth_and_respected_by_the_sampler():
    triples = [_spec(instance=Instance(c, 50), background=b, position=p)
               for c in CLASSES for b in COLOURS for p in POSITIONS]
    held = [s for s in triples if is_held_out_combination(s)]
    assert 0.07 <= len(held) / len(triples) <= 0.13
    assert {s.instance.cls for s in held} == set(CLASSES)
    rng = np.random.default_rng(2)
    assert not any(is_held_out_combination(sample_spec(rng, combos="train")) for _ in range(1000))
    assert all(is_held_out_combination(sample_spec(rng, combos="held_out")) for _ in range(100))


def _object_box(image: np.ndarray, background: str) -> tuple[float, float, int]:
    """(centre x, centre y, height) of the pixels that differ clearly from a plain background."""
    far = np.abs(image.astype(np.float32) - world.RGB[background]).sum(-1) > 90
    ys, xs = np.nonzero(far)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, ys.max() - ys.min() + 1


def test_seed_jitters_only_a_little_and_attributes_move_a_lot():
    spec = _spec(instance=Instance("robot", 20))
    boxes = [_object_box(render_batch([spec], [s])[0], "blue") for s in range(12)]
    xs, ys, hs = zip(*boxes)
    assert max(xs) - min(xs) <= 5 and max(ys) - min(ys) <= 4
    assert max(hs) / min(hs) < 1.15
    left = _object_box(np.asarray(render(dataclasses.replace(spec, position="left"), 0)), "blue")
    right = _object_box(np.asarray(render(dataclasses.replace(spec, position="right"), 0)), "blue")
    small = _object_box(np.asarray(render(dataclasses.replace(spec, size="small"), 0)), "blue")
    assert left[0] < min(xs) - 8 and right[0] > max(xs) + 8
    assert small[2] < 0.7 * min(hs)


def test_colour_override_repaints_the_primary_colour():
    spec = _spec(colour="yellow")
    assert spec.object_colour == "yellow"
    assert _spec().object_colour == instance_traits(Instance("mug", 42)).primary


def test_spec_validation():
    with pytest.raises(ValueError):
        _spec(background="teal")
    with pytest.raises(ValueError):
        _spec(count=3)


def test_captions_match_their_specs():
    rng = np.random.default_rng(3)
    stated_size = stated_position = 0
    for i in range(3000):
        spec = sample_spec(rng, instances="any")
        token = "sks" if i % 3 == 0 else None
        text = caption(spec, rng, subject_token=token)
        parsed = parse_caption(text)
        assert parsed["class"] == spec.instance.cls, text
        assert parsed["background"] == spec.background, text
        assert parsed["scene"] == spec.scene, text
        assert parsed["count"] == spec.count, text
        assert parsed["accessory"] == spec.accessory, text
        assert parsed["colour"] == spec.colour, text
        if parsed["size"] is not None:
            stated_size += 1
            assert parsed["size"] == spec.size, text
        if parsed["position"] is not None:
            stated_position += 1
            assert parsed["position"] == spec.position, text
        if token:
            assert f"{token} {spec.instance.cls}" in text
        words = {w.strip(",") for w in text.split()} - {token}
        assert words <= set(VOCABULARY), words - set(VOCABULARY)
    assert 0.6 < stated_size / 3000 < 0.9 and 0.75 < stated_position / 3000 < 0.95


def test_captions_vary_and_are_deterministic_by_seed():
    spec = _spec()
    texts = {caption(spec, s) for s in range(50)}
    assert len(texts) > 20
    assert caption(spec, 5) == caption(spec, 5)
    assert all(t == t.lower() for t in texts)


def test_class_prompt():
    assert class_prompt("mug") == "a photo of a mug"
    assert class_prompt("cat", subject_token="sks") == "a photo of a sks cat"
    assert parse_caption(class_prompt("robot"))["class"] == "robot"


def test_constants_cover_the_spec_space():
    assert len(CLASSES) >= 6 and len(COLOURS) == 8 and len(SCENES) == 5
    assert len(POSITIONS) >= 3 and SIZES == ("small", "large") and set(ACCESSORIES) == {"none", "hat", "bow"}
    assert VOCABULARY == sorted(set(VOCABULARY))


def test_sample_dataset_is_deterministic():
    a_images, a_specs, a_caps = sample_dataset(6, seed=9, combos="train")
    b_images, b_specs, b_caps = sample_dataset(6, seed=9, combos="train")
    assert np.array_equal(a_images, b_images) and a_specs == b_specs and a_caps == b_caps
    assert a_images.shape == (6, 64, 64, 3)


def test_rendering_is_fast():
    rng = np.random.default_rng(4)
    specs = [sample_spec(rng) for _ in range(200)]
    render_batch(specs[:10], range(10))  # warm the background caches
    start = time.perf_counter()
    render_batch(specs, range(200))
    assert 200 / (time.perf_counter() - start) > 50  # ~600/s on one idle core; slack for a busy machine

import numpy as np
import pytest

from gen.base import load_base
from gen.errors import InvalidRequest
from gen.provenance import read_provenance, save_png
from gen.sampler import SCHEDULERS, PromptTruncatedWarning, Request, Sampler


@pytest.fixture(scope="module")
def sampler(tiny_sd_dir):
    return Sampler(load_base(tiny_sd_dir))


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_same_seed_same_image_whatever_the_batch(sampler, scheduler):
    batch = sampler.generate("a photo of a red mug", num_images=3, seed=40, steps=3, scheduler=scheduler)
    alone = sampler.generate("a photo of a red mug", num_images=1, seed=42, steps=3, scheduler=scheduler)
    assert [p.seed for p in batch.provenance] == [40, 41, 42]
    # Batched BLAS kernels may round differently in the last bit; images agree to one grey level.
    assert np.abs(_pixels(batch.images[2]) - _pixels(alone.images[0])).max() <= 1
    assert np.abs(_pixels(batch.images[0]) - _pixels(batch.images[1])).mean() > 5  # seeds really differ


def test_sdxl_generates_deterministically(tiny_sdxl_dir):
    sampler = Sampler(load_base(tiny_sdxl_dir))
    a = sampler.generate("a toy car", num_images=2, seed=7, steps=2)
    b = sampler.generate("a toy car", num_images=1, seed=8, steps=2)
    assert a.images[1].size == (64, 64)
    assert np.abs(_pixels(a.images[1]) - _pixels(b.images[0])).max() <= 1


def test_provenance_read_back_from_png_reproduces_the_image(sampler, tmp_path):
    gen = sampler.generate("a green car on grass", negative_prompt="blurry", num_images=3, seed=5, steps=3, guidance_scale=4.0, scheduler="dpm++")
    path = save_png(gen.images[1], gen.provenance[1], tmp_path / "img.png")
    prov = read_provenance(path)
    assert prov == gen.provenance[1]
    assert prov.base_fingerprint == sampler.base.fingerprint
    again = sampler.generate(**prov.generate_kwargs())
    assert np.abs(_pixels(again.images[0]) - _pixels(gen.images[1])).max() <= 1


def test_progress_callback_sees_every_step(sampler):
    seen = []
    sampler.generate("a mug", steps=4, seed=0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt_is_refused(sampler, prompt):
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        sampler.generate(prompt)


def test_overlong_prompt_is_truncated_with_the_dropped_words_named(sampler):
    prompt = " ".join(["red mug"] * 50) + " zebra giraffe"
    with pytest.warns(PromptTruncatedWarning, match="dropped: .*zebra giraffe"):
        gen = sampler.generate(prompt, steps=1, seed=0)
    assert "zebra" not in gen.provenance[0].prompt
    assert gen.provenance[0].prompt.startswith("red mug red mug")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=63), "height 63 is not a multiple of the VAE factor 4"),
        (dict(width=65), "width 65 is not a multiple"),
        (dict(height=0), "height must be between"),
        (dict(num_images=0), "num_images must be between"),
        (dict(steps=0), "steps must be between"),
        (dict(guidance_scale=-1), "guidance_scale must be >= 0"),
        (dict(scheduler="magic"), "unknown scheduler 'magic'"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be >= 0 and finite, got inf"),  # was a black image
        (dict(guidance_scale=float("nan")), "guidance_scale must be >= 0 and finite"),
        (dict(num_images=2.5), "num_images must be a whole number between 1 and 64, got float 2.5"),
        (dict(steps="3"), "steps must be a whole number between 1 and 1000, got str '3'"),
        (dict(seed=-1), "seed must be between 0 and"),
        (dict(seed=1.7), "seed must be a whole number .*, got float 1.7"),
        (dict(seed=True), "seed must be a whole number .*, got bool True"),
        (dict(seed=2**64), f"seed must be between 0 and {2**63 - 1}, got {2**64}"),
        (dict(seed=2**63 - 1, num_images=2), f"seed must be between 0 and {2**63 - 2}"),  # image 2's seed would overflow
    ],
)
def test_invalid_requests_name_the_problem(sampler, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        sampler.generate("a mug", **{"steps": 1, **kwargs})


def test_a_bad_seed_fails_alone_and_the_largest_seed_works(sampler):
    out = sampler.generate_many([Request("a dog", seed=1, steps=1), Request("a cat", seed=2**64, steps=1)], return_exceptions=True)
    assert len(out[0].images) == 1 and isinstance(out[1], InvalidRequest)
    assert sampler.generate("a dog", seed=2**63 - 1, steps=1).provenance[0].seed == 2**63 - 1


def test_prompt_that_fits_to_nothing_is_refused(sampler):
    with pytest.warns(PromptTruncatedWarning), pytest.raises(InvalidRequest, match="prompt's first word is longer than the text encoder reads"):
        sampler.generate("q" * 400 + " dog", steps=1, seed=0)


def test_a_raising_progress_callback_fails_only_its_own_request(sampler):
    def cancel(i, n):
        raise RuntimeError("client went away")

    requests = [Request("a dog", seed=1, steps=2), Request("a cat", seed=2, steps=2, progress=cancel)]
    batches = []
    run_batch = sampler._run_batch
    sampler._run_batch = lambda jobs: batches.append(len(jobs)) or run_batch(jobs)
    try:
        out = sampler.generate_many(requests, return_exceptions=True)
    finally:
        del sampler._run_batch
    assert batches == [2]  # they did share the pipeline call
    assert len(out[0].images) == 1 and isinstance(out[1], RuntimeError) and str(out[1]) == "client went away"
    alone = sampler.generate("a dog", seed=1, steps=2)
    assert np.abs(_pixels(out[0].images[0]) - _pixels(alone.images[0])).max() <= 1
    with pytest.raises(RuntimeError, match="client went away"):
        sampler.generate_many(requests)


def test_png_without_provenance_is_reported(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(InvalidRequest, match="carries no bespoke provenance"):
        read_provenance(path)

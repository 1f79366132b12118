"""The trainer's view of fidelity on the built-in base: the ``evaluate`` hook and world captions.

The metrics themselves live in :mod:`gen.evaluate` (any base, pluggable models) and the prompts in
:mod:`gen.benchmark`; this module applies them with the world's evaluator standing in for DINO and CLIP:

* **subject fidelity**: identity similarity of generated images to the user's photos, relative to
  the photos' similarity among themselves (real vs real), so 1.0 means "as alike as two real
  photos". Measured on prompts that keep the subject's colours (a recoloured subject is, to an
  identity embedding, partly another subject). Another instance of the same class already scores
  about 0.84 (robot-4 against robot-3's photos), so ``subject_fidelity_above_class`` also places
  the subject between the base's plain class images (0) and real vs real (1); it is left out when
  real vs real is not above the class images' similarity (see :func:`gen.evaluate.fidelity_above_class`).
* **prompt fidelity**: the fraction of attributes a prompt states (class, background, scene,
  position, size, count, accessory, colour) that the evaluator reads back from the images.
* **prior drift**: for the plain class prompt ("a photo of a robot"), how the adapter moves class
  accuracy and identity similarity to the subject relative to the base alone. Small drift means the
  adapter did not turn every robot into the user's robot.
* **diversity** and **memorization** (appearance, see :class:`gen.evaluate.PixelEmbedder`): how
  much images of one prompt differ, and how close they come to copying a training photo.
* **autoencoder ceiling**: the subject fidelity of the photos themselves after the base's VAE, which
  every generated image passes through: about what a perfect adapter could score.
* **scene ceiling** (world subjects only): the same for the true subject rendered in the evaluation
  prompts' own scenes, which the world can do and real photos cannot: what a perfect adapter would
  score on exactly these prompts.

:func:`world_fidelity_hook` packages these as the trainer's ``evaluate`` hook, and
:func:`world_captions` captions a subject's photos the way the base was trained to read. Both apply
when the evaluator can read the base's images: the base renders at the world's resolution and the
class word is one of the world's classes (see :func:`world_evaluator_applies`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from gen import world
from gen.adapter import LoraAdapter
from gen.base import Base
from gen.benchmark import PROMPT_KINDS, SUBJECT_MARK, BenchmarkSettings, evaluation_prompt, evaluation_specs  # noqa: F401  (re-exported)
from gen.evaluate import (  # noqa: F401  (the metrics live in gen; re-exported for callers of this module)
    PriorStats,
    autoencode,
    autoencoder_ceiling,
    class_accuracy,
    diversity,
    fidelity_above_class,
    memorization,
    prior_drift,
    prompt_fidelity,
    real_vs_real,
    stated_attributes,
    subject_fidelity,
    world_class,
    world_evaluator_applies,
)
from gen.evaluator import Evaluator, load_evaluator, read_attributes
from gen.sampler import Request, Sampler


# --- the evaluate hook and captions ---------------------------------------------------------------


def world_captions(images: Sequence[Image.Image], class_word: str, evaluator: Evaluator | None = None, seed: int = 0) -> list[str]:
    """Caption templates (``{trigger}`` for the subject) describing each photo, as read by the evaluator.

    The world's stand-in for BLIP captioning. A base trained on the world has only seen captions that
    state background, scene, position and size; with the bare "a {trigger} robot" the trigger absorbs
    the photos' backgrounds too (measured: identity similarity ~0.0 against ~0.5 with these captions).
    The subject's colour is never stated: it is part of who the subject is.
    """
    evaluator = evaluator or load_evaluator()
    instance = world.Instance(world_class(class_word), 0)  # identity traits are not captioned
    captions = []
    for i, seen in enumerate(read_attributes(evaluator, images)):
        spec = world.SceneSpec(
            instance=instance, background=seen["background"], scene=seen["scene"], position=seen["position"],
            size=seen["size"], count=seen["count"], accessory=seen["accessory"],
        )
        captions.append(world.caption(spec, np.random.default_rng([seed, i]), subject_token="{trigger}"))
    return captions


FidelitySettings = BenchmarkSettings  # how much sampling the training-time evaluation costs: a benchmark's settings


def world_fidelity_hook(
    base: Base,
    class_word: str,
    references: Sequence[Image.Image],
    settings: FidelitySettings = FidelitySettings(),
    *,
    instance: world.Instance | None = None,
    evaluator: Evaluator | None = None,
) -> Callable[[Sampler, LoraAdapter], dict[str, float]] | None:
    """The trainer's ``evaluate`` hook for a world subject, or None when the evaluator does not apply.

    Call it before training: it samples the base alone for the class prompt now, as the reference
    for prior drift.
    """
    if not world_evaluator_applies(base, class_word):
        return None
    cls = world_class(class_word)
    evaluator = evaluator or load_evaluator()
    references = list(references)
    class_prompt = world.class_prompt(cls)
    sampling = {"seed": settings.seed, "steps": settings.steps, "guidance_scale": settings.guidance_scale}
    base_images = Sampler(base).generate(class_prompt, num_images=settings.prior_images, **sampling).images
    base_prior = PriorStats.measure(base_images, cls, references, evaluator)
    ceiling = autoencoder_ceiling(base, references, evaluator) if len(references) >= 2 else None
    specs = evaluation_specs(cls, settings.prompts, settings.seed, instance)
    in_scene = scene_ceiling(base, instance, specs, references, evaluator) if instance is not None else None

    def evaluate(sampler: Sampler, adapter: LoraAdapter) -> dict[str, float]:
        # Captions are made and scored with a mark in the trigger's place, which the world reads as no word: a trigger
        # that is one ("red", "left") would otherwise count as a stated attribute, or steer which caption is drawn.
        marked = [evaluation_prompt(kind, spec, SUBJECT_MARK, settings.seed + i) for i, (kind, spec) in enumerate(specs)]
        prompts = [m.replace(SUBJECT_MARK, adapter.trigger) for m in marked]
        asks = [*prompts, class_prompt]
        counts = [settings.images_per_prompt] * len(prompts) + [settings.prior_images]
        requests = [Request(p, num_images=n, **sampling) for p, n in zip(asks, counts)]
        *prompted, prior = [g.images for g in sampler.generate_many(requests)]  # batched together
        images = [im for group in prompted for im in group]
        image_prompts = [p for p in marked for _ in range(settings.images_per_prompt)]
        kinds = [kind for kind, _ in specs for _ in range(settings.images_per_prompt)]
        metrics = subject_fidelity([im for im, kind in zip(images, kinds) if kind != "colour"], references, evaluator)
        metrics["prompt_fidelity"] = prompt_fidelity(images, image_prompts, evaluator)
        for kind in PROMPT_KINDS:
            chosen = [i for i, k in enumerate(kinds) if k == kind]
            if chosen:
                metrics[f"prompt_fidelity/{kind}"] = prompt_fidelity([images[i] for i in chosen], [image_prompts[i] for i in chosen], evaluator)
        metrics.update(prior_drift(PriorStats.measure(prior, cls, references, evaluator), base_prior))
        if settings.images_per_prompt >= 2:
            metrics["diversity"] = diversity(images, groups=image_prompts)
        metrics.update(memorization(images, references).summary())
        # Where the subject sits between "any member of the class" (0) and "another real photo" (1): other
        # instances of a class already score well above 0.8x real-vs-real, so the ratio alone flatters.
        # Left out when undefined (the photos no more alike than the class is to them), as a NaN would be.
        above = fidelity_above_class(metrics["identity_similarity"], metrics["real_vs_real"], base_prior.identity_similarity)
        if math.isfinite(above):
            metrics["subject_fidelity_above_class"] = above
        if ceiling is not None:
            metrics["autoencoder_ceiling"] = ceiling
        if in_scene is not None:
            metrics["scene_ceiling"] = in_scene
        return metrics

    return evaluate


def scene_ceiling(
    base: Base, instance: world.Instance, specs: Sequence[tuple[str, world.SceneSpec]], references: Sequence[Image.Image],
    evaluator: Evaluator, renders: int = 16,
) -> float:
    """Subject fidelity of ``instance`` itself rendered ``renders`` times in each evaluation scene and passed
    through the base's VAE, scored against ``references`` as generated images are (colour changes left out).

    The autoencoder ceiling asks this of the photos' own scenes; a new background can cost more, since
    the decoder loses a subject against colours close to its own. A subject fidelity short of this one
    is the adapter's shortfall, not the base's. With 16 renders per scene, other render seeds move it
    by about 0.01.
    """
    scenes = [replace(spec, instance=instance) for kind, spec in specs if kind != "colour"]
    rendered = [world.render(spec, 10_000 + j) for spec in scenes for j in range(renders)]
    return subject_fidelity(autoencode(base, rendered), references, evaluator)["subject_fidelity"]

"""How faithful a personalized model is, measured with the world's evaluator (the built-in base only).

Mirrors DreamBench's scores, with the evaluator standing in for DINO and CLIP:

* **subject fidelity**: identity similarity of generated images to the user's photos, relative to
  the photos' similarity among themselves (real vs real), so 1.0 means "as alike as two real
  photos". Measured on prompts that keep the subject's colours (a recoloured subject is, to an
  identity embedding, partly another subject). Another instance of the same class already scores
  about 0.84 (robot-4 against robot-3's photos), so ``subject_fidelity_above_class`` also places
  the subject between the base's plain class images (0) and real vs real (1).
* **prompt fidelity**: the fraction of attributes a prompt states (class, background, scene,
  position, size, count, accessory, colour) that the evaluator reads back from the images.
* **prior drift**: for the plain class prompt ("a photo of a robot"), how the adapter moves class
  accuracy and identity similarity to the subject relative to the base alone. Small drift means the
  adapter did not turn every robot into the user's robot.

:func:`world_fidelity_hook` packages these as the trainer's ``evaluate`` hook, and
:func:`world_captions` captions a subject's photos the way the base was trained to read. Both apply
when the evaluator can read the base's images: the base renders at the world's resolution and the
class word is one of the world's classes (see :func:`world_evaluator_applies`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from gen import world
from gen.adapter import LoraAdapter
from gen.base import Base
from gen.evaluator import Evaluator, identity_embeddings, identity_similarity, load_evaluator, read_attributes
from gen.sampler import Request, Sampler

PROMPT_KINDS = ("recontext", "position", "accessory", "colour")
_STATED_TO_READ = {"colour": "object_colour"}  # parse_caption's name -> the evaluator's


# --- metrics ------------------------------------------------------------------------------------


def real_vs_real(references: Sequence[Image.Image], evaluator: Evaluator) -> float:
    """Mean identity similarity between distinct reference photos (1.0 with a single photo)."""
    if len(references) < 2:
        return 1.0
    emb = identity_embeddings(evaluator, references)
    sims = emb @ emb.T
    n = len(references)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def subject_fidelity(generated: Sequence[Image.Image], references: Sequence[Image.Image], evaluator: Evaluator) -> dict[str, float]:
    """Identity similarity of generated images to the references, raw and relative to real vs real."""
    sim = identity_similarity(generated, references, evaluator)
    real = real_vs_real(references, evaluator)
    return {"identity_similarity": sim, "real_vs_real": real, "subject_fidelity": sim / real if real > 0 else 0.0}


def stated_attributes(prompt: str) -> dict[str, object]:
    """The attributes a world prompt states, under the evaluator's names."""
    return {_STATED_TO_READ.get(k, k): v for k, v in world.parse_caption(prompt).items() if v is not None}


def prompt_fidelity(images: Sequence[Image.Image], prompts: Sequence[str], evaluator: Evaluator) -> float:
    """Fraction of (image, stated attribute) pairs the evaluator reads back as the prompt says."""
    read = read_attributes(evaluator, images)
    hits = total = 0
    for attributes, prompt in zip(read, prompts):
        for name, value in stated_attributes(prompt).items():
            hits += attributes[name] == value
            total += 1
    return hits / total if total else 0.0


def class_accuracy(images: Sequence[Image.Image], cls: str, evaluator: Evaluator) -> float:
    """Fraction of images the evaluator reads as ``cls``."""
    return float(np.mean([a["class"] == cls for a in read_attributes(evaluator, images)]))


@dataclass(frozen=True)
class PriorStats:
    """What the plain class prompt gives: class accuracy and identity similarity to the subject."""

    class_accuracy: float
    identity_similarity: float

    @classmethod
    def measure(cls, images: Sequence[Image.Image], class_name: str, references: Sequence[Image.Image], evaluator: Evaluator) -> PriorStats:
        return cls(class_accuracy(images, class_name, evaluator), identity_similarity(images, references, evaluator))


def prior_drift(adapted: PriorStats, base: PriorStats) -> dict[str, float]:
    """The adapter's prior stats, the base's, and the differences (adapted minus base)."""
    return {
        "prior_class_accuracy": adapted.class_accuracy,
        "prior_class_accuracy_base": base.class_accuracy,
        "prior_drift_class_accuracy": adapted.class_accuracy - base.class_accuracy,
        "prior_identity_similarity": adapted.identity_similarity,
        "prior_identity_similarity_base": base.identity_similarity,
        "prior_drift_identity": adapted.identity_similarity - base.identity_similarity,
    }


# --- prompts ------------------------------------------------------------------------------------


def evaluation_specs(cls: str, n: int = 8, seed: int = 0, instance: world.Instance | None = None) -> list[tuple[str, world.SceneSpec]]:
    """``n`` (kind, spec) pairs cycling through new backgrounds, positions, accessories and a colour change.

    ``instance`` (when known) keeps recolours and backgrounds off the subject's own colour.
    """
    own = world.instance_traits(instance).primary if instance is not None else None
    instance = instance or world.Instance(cls, 0)  # prompts never state identity traits, so any instance will do
    others = [c for c in world.COLOURS if c != own]
    rng = np.random.default_rng([seed, world.CLASSES.index(cls)])
    specs = []
    for i in range(n):
        kind = PROMPT_KINDS[i % len(PROMPT_KINDS)]
        spec = world.SceneSpec(
            instance=instance,
            background=others[int(rng.integers(len(others)))],
            scene=world.SCENES[int(rng.integers(len(world.SCENES)))],
            position=world.POSITIONS[int(rng.integers(len(world.POSITIONS)))],
            size="large",
            count=1,
            accessory=("hat", "bow")[i // len(PROMPT_KINDS) % 2] if kind == "accessory" else "none",
        )
        if kind == "colour":
            recolour = [c for c in others if c != spec.background]
            spec = replace(spec, colour=recolour[int(rng.integers(len(recolour)))])
        specs.append((kind, spec))
    return specs


def evaluation_prompt(kind: str, spec: world.SceneSpec, trigger: str, seed: int) -> str:
    """A world caption of ``spec`` naming the subject by ``trigger``; position kinds always state the position."""
    for attempt in range(100):
        prompt = world.caption(spec, np.random.default_rng([seed, attempt]), subject_token=trigger)
        if kind != "position" or world.parse_caption(prompt)["position"] is not None:
            return prompt
    return prompt


# --- the evaluate hook and captions ---------------------------------------------------------------


def world_evaluator_applies(base: Base, class_word: str) -> bool:
    """Whether the world's evaluator can judge this base's images of ``class_word``."""
    return class_word in world.CLASS_WORDS.values() and base.default_size == world.IMAGE_SIZE


def _world_class(class_word: str) -> str:
    return next(c for c, w in world.CLASS_WORDS.items() if w == class_word)


def world_captions(images: Sequence[Image.Image], class_word: str, evaluator: Evaluator | None = None, seed: int = 0) -> list[str]:
    """Caption templates (``{trigger}`` for the subject) describing each photo, as read by the evaluator.

    The world's stand-in for BLIP captioning. A base trained on the world has only seen captions that
    state background, scene, position and size; with the bare "a {trigger} robot" the trigger absorbs
    the photos' backgrounds too (measured: identity similarity ~0.0 against ~0.5 with these captions).
    The subject's colour is never stated: it is part of who the subject is.
    """
    evaluator = evaluator or load_evaluator()
    instance = world.Instance(_world_class(class_word), 0)  # identity traits are not captioned
    captions = []
    for i, seen in enumerate(read_attributes(evaluator, images)):
        spec = world.SceneSpec(
            instance=instance, background=seen["background"], scene=seen["scene"], position=seen["position"],
            size=seen["size"], count=seen["count"], accessory=seen["accessory"],
        )
        captions.append(world.caption(spec, np.random.default_rng([seed, i]), subject_token="{trigger}"))
    return captions


@dataclass(frozen=True)
class FidelitySettings:
    """How much sampling an evaluation costs."""

    prompts: int = 8
    images_per_prompt: int = 2
    prior_images: int = 8
    steps: int | None = None  # default: the base's
    seed: int = 0


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
    cls = _world_class(class_word)
    evaluator = evaluator or load_evaluator()
    references = list(references)
    class_prompt = world.class_prompt(cls)
    base_images = Sampler(base).generate(class_prompt, num_images=settings.prior_images, seed=settings.seed, steps=settings.steps).images
    base_prior = PriorStats.measure(base_images, cls, references, evaluator)
    specs = evaluation_specs(cls, settings.prompts, settings.seed, instance)

    def evaluate(sampler: Sampler, adapter: LoraAdapter) -> dict[str, float]:
        prompts = [evaluation_prompt(kind, spec, adapter.trigger, settings.seed + i) for i, (kind, spec) in enumerate(specs)]
        asks = [*prompts, class_prompt]
        counts = [settings.images_per_prompt] * len(prompts) + [settings.prior_images]
        requests = [Request(p, num_images=n, seed=settings.seed, steps=settings.steps) for p, n in zip(asks, counts)]
        *prompted, prior = [g.images for g in sampler.generate_many(requests)]  # batched together
        images = [im for group in prompted for im in group]
        image_prompts = [p for p in prompts for _ in range(settings.images_per_prompt)]
        kinds = [kind for kind, _ in specs for _ in range(settings.images_per_prompt)]
        metrics = subject_fidelity([im for im, kind in zip(images, kinds) if kind != "colour"], references, evaluator)
        metrics["prompt_fidelity"] = prompt_fidelity(images, image_prompts, evaluator)
        for kind in PROMPT_KINDS:
            chosen = [i for i, k in enumerate(kinds) if k == kind]
            if chosen:
                metrics[f"prompt_fidelity/{kind}"] = prompt_fidelity([images[i] for i in chosen], [image_prompts[i] for i in chosen], evaluator)
        metrics.update(prior_drift(PriorStats.measure(prior, cls, references, evaluator), base_prior))
        # Where the subject sits between "any member of the class" (0) and "another real photo" (1): other
        # instances of a class already score well above 0.8x real-vs-real, so the ratio alone flatters.
        floor = base_prior.identity_similarity
        metrics["subject_fidelity_above_class"] = (metrics["identity_similarity"] - floor) / max(metrics["real_vs_real"] - floor, 1e-6)
        return metrics

    return evaluate

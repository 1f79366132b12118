"""Metrics over images, for any base: is a personalization faithful, obedient, varied and original?

They mirror DreamBench's (Ruiz et al. 2023), with pluggable models standing in for theirs:

* **subject fidelity** (DINO, CLIP-I): mean identity similarity of generated images to the
  user's photos, also relative to the photos' similarity among themselves ("real vs real"), so
  1.0 means "as alike as two real photos";
* **prompt fidelity** (CLIP-T): how well images show what their prompts say;
* **diversity** (DIV, LPIPS in the paper): mean pairwise dissimilarity of images of one prompt;
  0 for identical images;
* **prior preservation** (PRES): similarity of the adapted model's plain class-prompt images to
  the subject's photos (high = every "robot" became the user's robot), against the base's;
* **memorization**: how close each generated image is to its nearest training photo; a copy is
  flagged. An overfit adapter repaints its photos (their backgrounds and layout) whatever the
  prompt asks;
* **autoencoder ceiling**: the subject fidelity of the photos themselves after the base's VAE;
  every generated image leaves through that decoder, so an adapter is not expected to beat it by much.

A metric is computed by models behind two small protocols: an :class:`Embedder` (images to
unit-norm feature rows) and a :class:`PromptScorer` (per-image agreement with a prompt). A
:class:`Judge` bundles the ones an evaluation uses. On the built-in base, the world's evaluator
(``gen.evaluator``) is the default: it embeds identity and reads every captioned attribute back,
so prompt fidelity is the fraction of stated attributes seen. For other bases, CLIP- and
DINO-like models on disk plug in through ``gen.embedders`` (never downloaded). The
:class:`PixelEmbedder` (downsampled, mean-centred pixels) needs no model at all; it measures
whole-image appearance (background, layout, colour), which is what diversity and memorization
are about, while identity embeddings deliberately ignore the background.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from gen import world
from gen.errors import EvaluationError
from gen.evaluator import Evaluator, identity_embeddings, load_evaluator, read_attributes

if TYPE_CHECKING:
    from gen.base import Base

Images = Sequence[Image.Image]
_STATED_TO_READ = {"colour": "object_colour"}  # parse_caption's name -> the evaluator's


# --- the protocols and the built-in models ----------------------------------------------------------


@runtime_checkable
class Embedder(Protocol):
    """Images to feature rows ``(N, D)``, each of unit norm (or zero for an image with no features).

    Cosine similarity of rows is the similarity the metrics use.
    """

    name: str

    def embed(self, images: Images) -> torch.Tensor: ...


@runtime_checkable
class PromptScorer(Protocol):
    """How well each image shows its prompt: one number per (image, prompt) pair, higher is better."""

    name: str

    def score(self, images: Images, prompts: Sequence[str]) -> list[float]: ...


@functools.lru_cache(maxsize=1)
def default_evaluator() -> Evaluator:
    """The shipped world evaluator, loaded once per process."""
    return load_evaluator()


class _WorldJudge:
    """A judge backed by the world's evaluator: the one given, else the shipped one (loaded on first use)."""

    def __init__(self, evaluator: Evaluator | None = None) -> None:
        self._evaluator = evaluator

    @property
    def evaluator(self) -> Evaluator:
        return self._evaluator if self._evaluator is not None else default_evaluator()


class WorldEmbedder(_WorldJudge):
    """Identity embeddings of the world's evaluator (the built-in base's DINO)."""

    name = "world-evaluator identity"

    def embed(self, images: Images) -> torch.Tensor:
        return identity_embeddings(self.evaluator, list(images)).float()


def stated_attributes(prompt: str) -> dict[str, object]:
    """The attributes a world prompt states, under the evaluator's names."""
    return {_STATED_TO_READ.get(k, k): v for k, v in world.parse_caption(prompt).items() if v is not None}


class WorldPromptScorer(_WorldJudge):
    """Per image, the fraction of the attributes its prompt states that the evaluator reads back."""

    name = "world-evaluator attributes"

    def score(self, images: Images, prompts: Sequence[str]) -> list[float]:
        hits = self.hits(images, prompts)
        return [sum(h.values()) / len(h) if h else float("nan") for h in hits]

    def hits(self, images: Images, prompts: Sequence[str]) -> list[dict[str, bool]]:
        """Per image, each stated attribute and whether it was read back."""
        _same_length(images, prompts)
        read = read_attributes(self.evaluator, list(images))
        return [{name: seen[name] == value for name, value in stated_attributes(prompt).items()} for seen, prompt in zip(read, prompts)]

    def attribute_accuracy(self, images: Images, prompts: Sequence[str]) -> dict[str, float]:
        """Per attribute (background, position, accessory, ...), the fraction read back as stated."""
        tally: dict[str, list[bool]] = {}
        for hits in self.hits(images, prompts):
            for name, ok in hits.items():
                tally.setdefault(name, []).append(ok)
        return {name: float(np.mean(v)) for name, v in sorted(tally.items())}


class PixelEmbedder:
    """Downsampled, mean-centred RGB pixels: whole-image appearance with no model (LPIPS's stand-in).

    Centring removes overall brightness, so a constant image has no features (a zero row, similar
    to nothing); box downsampling to ``size`` makes it tolerant of noise and a few pixels of shift.
    """

    def __init__(self, size: int = 16) -> None:
        if size < 1:
            raise EvaluationError(f"PixelEmbedder size must be >= 1, got {size}")
        self.size = size
        self.name = f"pixels {size}x{size}"

    def embed(self, images: Images) -> torch.Tensor:
        rows = [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BOX), np.float32).ravel() / 255.0 for im in images]
        x = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 3 * self.size**2)
        x = x - x.mean(dim=1, keepdim=True)
        norms = x.norm(dim=1, keepdim=True)
        return torch.where(norms > 1e-6, x / norms.clamp_min(1e-6), torch.zeros_like(x))


@dataclass
class Judge:
    """The models one evaluation uses.

    ``identity`` scores subject fidelity, prior preservation and composition; ``prompt`` scores
    prompt fidelity (None: not measured); ``appearance`` scores diversity and memorization;
    ``class_accuracy(images, class_word)`` (world only) says how many images show the class at all.
    """

    identity: Embedder
    prompt: PromptScorer | None = None
    appearance: Embedder = field(default_factory=PixelEmbedder)
    class_accuracy: Callable[[Images, str], float] | None = None

    @classmethod
    def world(cls, evaluator: Evaluator | None = None) -> Judge:
        """The built-in base's judge: the world's evaluator for identity, attributes and class."""
        return cls(
            identity=WorldEmbedder(evaluator),
            prompt=WorldPromptScorer(evaluator),
            class_accuracy=lambda images, class_word: class_accuracy(images, world_class(class_word), evaluator or default_evaluator()),
        )

    def describe(self) -> dict[str, str | None]:
        """Which model measured what, for reports."""
        return {
            "identity": self.identity.name,
            "prompt": self.prompt.name if self.prompt is not None else None,
            "appearance": self.appearance.name,
            "class_accuracy": "world-evaluator class head" if self.class_accuracy is not None else None,
        }


def as_embedder(model: Embedder | Evaluator | None) -> Embedder:
    """An embedder from an embedder, a world evaluator (its identity head) or None (the shipped evaluator)."""
    if model is None or isinstance(model, Evaluator):
        return WorldEmbedder(model)
    if not isinstance(model, Embedder):
        raise EvaluationError(f"{type(model).__name__} is not an Embedder (it needs a name and embed(images))")
    return model


def as_prompt_scorer(model: PromptScorer | Evaluator | None) -> PromptScorer:
    """A prompt scorer from a scorer, a world evaluator (its attribute heads) or None (the shipped evaluator)."""
    if model is None or isinstance(model, Evaluator):
        return WorldPromptScorer(model)
    if not isinstance(model, PromptScorer):
        raise EvaluationError(f"{type(model).__name__} is not a PromptScorer (it needs a name and score(images, prompts))")
    return model


# --- where the world's evaluator applies -------------------------------------------------------------


def world_evaluator_applies(base: Base, class_word: str) -> bool:
    """Whether the world's evaluator can judge this base's images of ``class_word``."""
    return class_word in world.CLASS_WORDS.values() and base.default_size == world.IMAGE_SIZE


def world_class(class_word: str) -> str:
    """The world class a class word names."""
    for cls, word in world.CLASS_WORDS.items():
        if word == class_word:
            return cls
    raise EvaluationError(f"{class_word!r} is not a class of the built-in world ({', '.join(world.CLASS_WORDS.values())})")


def class_accuracy(images: Images, cls: str, evaluator: Evaluator | None = None) -> float:
    """Fraction of images the world's evaluator reads as ``cls``."""
    _need(images, "images", 1)
    return float(np.mean([a["class"] == cls for a in read_attributes(evaluator or default_evaluator(), list(images))]))


# --- the metrics -----------------------------------------------------------------------------------


def _need(images: Images, what: str, n: int) -> None:
    if len(images) < n:
        raise EvaluationError(f"{what}: need at least {n} image{'s' if n > 1 else ''}, got {len(images)}")


def _same_length(images: Images, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise EvaluationError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of unit (or zero) rows; two featureless images (zero rows) count as identical."""
    sims = a.float() @ b.float().T
    empty_a, empty_b = a.norm(dim=1) < 1e-6, b.norm(dim=1) < 1e-6
    return torch.where(empty_a[:, None] & empty_b[None, :], torch.ones_like(sims), sims)


def similarity_matrix(a: Images, b: Images, embedder: Embedder) -> torch.Tensor:
    """Cosine similarities ``(len(a), len(b))``."""
    _need(a, "first image set", 1)
    _need(b, "second image set", 1)
    return cosine(embedder.embed(a), embedder.embed(b))


def mean_similarity(a: Images, b: Images, embedder: Embedder | Evaluator | None = None) -> float:
    """Mean cosine similarity over all (a, b) pairs (DreamBench's DINO and CLIP-I scores)."""
    return float(similarity_matrix(a, b, as_embedder(embedder)).mean())


def real_vs_real(references: Images, embedder: Embedder | Evaluator | None = None) -> float:
    """Mean similarity between distinct reference photos (1.0 with a single photo)."""
    _need(references, "references", 1)
    if len(references) < 2:
        return 1.0
    sims = similarity_matrix(references, references, as_embedder(embedder))
    n = len(references)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def relative_to_real(similarity: float, real: float) -> float:
    """``similarity`` relative to real vs real; 0 when that is not positive (featureless references)."""
    return similarity / real if real > 0 else 0.0


# The least gap (cosine) between real vs real and the class floor that :func:`fidelity_above_class` divides
# by: over a shorter scale, noise of that size at either end moves the ratio by a whole unit or more.
MIN_CLASS_GAP = 0.01


def fidelity_above_class(identity_similarity: float, real: float, class_floor: float) -> float:
    """Where ``identity_similarity`` sits between the class floor (0: the base's plain class images against
    the photos) and real vs real (1: another real photo).

    NaN when real vs real is not at least :data:`MIN_CLASS_GAP` above the floor: the identity embedder then
    finds the base's class images about as like the photos as the photos are to each other, so there is no
    scale to place the subject on (dividing by the gap gave numbers like -166648). Reports show it as a
    dash, JSON as null.
    """
    gap = real - class_floor
    if not gap >= MIN_CLASS_GAP:  # also NaN inputs
        return float("nan")
    return (identity_similarity - class_floor) / gap


def subject_fidelity(generated: Images, references: Images, embedder: Embedder | Evaluator | None = None) -> dict[str, float]:
    """Identity similarity of generated images to the references, raw and relative to real vs real."""
    embedder = as_embedder(embedder)
    sim = mean_similarity(generated, references, embedder)
    real = real_vs_real(references, embedder)
    return {"identity_similarity": sim, "real_vs_real": real, "subject_fidelity": relative_to_real(sim, real)}


def autoencoder_ceiling(base: Base, references: Images, embedder: Embedder | Evaluator | None = None) -> float:
    """The subject fidelity the base's autoencoder allows: each photo encoded and decoded, scored against the
    *other* photos as a generated image is, relative to real vs real (a lossless autoencoder gives 1.0).

    Every generated image leaves through the same decoder, so a subject whose details the autoencoder loses
    (fine stripes at 64 px, say) stays near this however well it trained: a low subject fidelity under a low
    ceiling is the base's limit, not the training's. An estimate, not a strict bound: the encoder's latents
    are not the decoder's best ones, and a generation can beat them a little (built-in base, robot-5: an
    adapter at 0.872 against a ceiling of 0.849).
    """
    _need(references, "references", 2)
    embedder = as_embedder(embedder)
    decoded = autoencode(base, references)
    sims = similarity_matrix(decoded, references, embedder)
    others = ~torch.eye(len(references), dtype=torch.bool)
    real = real_vs_real(references, embedder)
    return relative_to_real(float(sims[others].mean()), real)


@torch.no_grad()
def autoencode(base: Base, images: Images) -> list[Image.Image]:
    """``images`` through the base's VAE and back (posterior mode) at the base's default size."""
    pipe, size = base.pipe, base.default_size
    vae, dtype = pipe.vae, pipe.vae.dtype
    upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)  # SDXL's VAE overflows in fp16, as diffusers' pipelines know
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        x = pipe.image_processor.preprocess(list(images), height=size, width=size).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
        return pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    finally:
        if upcast:
            vae.to(dtype=dtype)


def prompt_fidelity(images: Images, prompts: Sequence[str], scorer: PromptScorer | Evaluator | None = None) -> float:
    """How well images follow their prompts: the world's evaluator gives the fraction of all (image,
    stated attribute) pairs read back as stated; any other scorer the mean per-image score (CLIP-T)."""
    _need(images, "images", 1)
    _same_length(images, prompts)
    scorer = as_prompt_scorer(scorer)
    if isinstance(scorer, WorldPromptScorer):
        hits = [ok for image_hits in scorer.hits(images, prompts) for ok in image_hits.values()]
        return float(np.mean(hits)) if hits else float("nan")
    scores = [s for s in scorer.score(images, prompts) if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


def diversity(images: Images, embedder: Embedder | None = None, groups: Sequence[object] | None = None) -> float:
    """Mean pairwise dissimilarity (1 - cosine) between images of the same group (e.g. the same prompt).

    Like DreamBench's DIV: 0 when every image of a prompt is the same picture. Groups with a
    single image are skipped; ``groups=None`` treats all images as one group.
    """
    embedder = embedder or PixelEmbedder()
    groups = list(groups) if groups is not None else [0] * len(images)
    if len(groups) != len(images):
        raise EvaluationError(f"got {len(groups)} group labels for {len(images)} images")
    members = [[i for i, g in enumerate(groups) if g == label] for label in dict.fromkeys(groups)]
    members = [idx for idx in members if len(idx) >= 2]
    if not members:  # before embedding: some embedders fail on no images at all
        raise EvaluationError("diversity needs at least two images of one prompt (images_per_prompt >= 2)")
    emb = embedder.embed(images)
    values = []
    for idx in members:
        sims = cosine(emb[idx], emb[idx])
        n = len(idx)
        values.append(1.0 - float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))))
    return float(np.mean(values))


def pixel_distance(a: Image.Image, b: Image.Image, size: int = world.IMAGE_SIZE) -> float:
    """Root-mean-square difference of two images at ``size`` x ``size``, in [0, 1] (0: identical)."""
    x = np.asarray(a.convert("RGB").resize((size, size), Image.BOX), np.float32) / 255.0
    y = np.asarray(b.convert("RGB").resize((size, size), Image.BOX), np.float32) / 255.0
    return float(np.sqrt(np.mean((x - y) ** 2)))


@dataclass(frozen=True)
class Memorization:
    """How close generated images come to the training photos.

    ``nearest_similarity[i]`` is image i's appearance similarity to its nearest training photo
    (``nearest_index[i]``) and ``nearest_distance[i]`` the pixel RMS distance to it. A copy is an
    image whose nearest similarity reaches ``threshold``. ``training_nearest`` is the same
    nearest similarity among the photos themselves (leave one out): how alike the photos already are.
    """

    nearest_similarity: list[float]
    nearest_distance: list[float]
    nearest_index: list[int]
    threshold: float
    training_nearest: float

    @property
    def copies(self) -> list[int]:
        return [i for i, s in enumerate(self.nearest_similarity) if s >= self.threshold]

    @property
    def copy_rate(self) -> float:
        return len(self.copies) / len(self.nearest_similarity)

    def summary(self) -> dict[str, float]:
        return {
            "memorization_max_similarity": max(self.nearest_similarity),
            "memorization_mean_similarity": float(np.mean(self.nearest_similarity)),
            "memorization_min_distance": min(self.nearest_distance),
            "memorization_mean_distance": float(np.mean(self.nearest_distance)),
            "memorization_copy_rate": self.copy_rate,
            "memorization_training_nearest": self.training_nearest,
        }


def memorization(generated: Images, training: Images, embedder: Embedder | None = None, threshold: float = 0.95) -> Memorization:
    """Each generated image's nearest training photo, by appearance, and whether it is a copy.

    The default threshold (0.95 cosine of 16x16 mean-centred pixels) is met by 62% of re-renders
    of a training photo's scene (same background, position and size; new noise and jitter) and by
    3% of renders of the benchmark's new scenes of the same subject (measured on 8 world subjects).
    """
    _need(generated, "generated images", 1)
    _need(training, "training images", 1)
    embedder = embedder or PixelEmbedder()
    gen_emb, train_emb = embedder.embed(generated), embedder.embed(training)
    sims = cosine(gen_emb, train_emb)
    best, index = sims.max(dim=1)
    distances = [pixel_distance(generated[i], training[int(j)]) for i, j in enumerate(index)]
    own = cosine(train_emb, train_emb)
    if len(training) > 1:
        own.fill_diagonal_(-float("inf"))
        training_nearest = float(own.max(dim=1).values.mean())
    else:
        training_nearest = float("nan")
    return Memorization(best.tolist(), distances, index.tolist(), threshold, training_nearest)


@dataclass(frozen=True)
class PriorStats:
    """What the plain class prompt gives: class accuracy (None when no class reader) and identity similarity to the subject."""

    class_accuracy: float | None
    identity_similarity: float

    @classmethod
    def measure(cls, images: Images, class_name: str, references: Images, evaluator: Evaluator | Judge | None = None) -> PriorStats:
        """``class_name`` is a world class with an evaluator, a class word with a judge."""
        if isinstance(evaluator, Judge):
            accuracy = evaluator.class_accuracy(images, class_name) if evaluator.class_accuracy is not None else None
            return cls(accuracy, mean_similarity(images, references, evaluator.identity))
        return cls(class_accuracy(images, class_name, evaluator), mean_similarity(images, references, evaluator))


def prior_drift(adapted: PriorStats, base: PriorStats) -> dict[str, float]:
    """The adapter's prior stats, the base's, and the differences (adapted minus base).

    ``prior_identity_similarity`` is DreamBench's PRES: how much the adapted model's plain class
    images look like the subject. Its drift above the base's is the collapse of the class onto the subject.
    """
    out = {
        "prior_identity_similarity": adapted.identity_similarity,
        "prior_identity_similarity_base": base.identity_similarity,
        "prior_drift_identity": adapted.identity_similarity - base.identity_similarity,
    }
    if adapted.class_accuracy is not None and base.class_accuracy is not None:
        out.update(
            prior_class_accuracy=adapted.class_accuracy,
            prior_class_accuracy_base=base.class_accuracy,
            prior_drift_class_accuracy=adapted.class_accuracy - base.class_accuracy,
        )
    return out


def class_shift(adapted: Images, base_images: Images, embedder: Embedder) -> float:
    """1 - cosine between the mean embeddings of the adapted and the base class images (0: same centre)."""
    a, b = embedder.embed(adapted).mean(dim=0), embedder.embed(base_images).mean(dim=0)
    denom = float(a.norm() * b.norm())
    return 1.0 - float(a @ b) / denom if denom > 1e-12 else 0.0


def prior_preservation(adapted: Images, base_images: Images, references: Images, judge: Judge, class_word: str) -> dict[str, float]:
    """PRES and drift of the adapted model's class prompt against the base's, plus the class centre's shift."""
    out = prior_drift(PriorStats.measure(adapted, class_word, references, judge), PriorStats.measure(base_images, class_word, references, judge))
    out["prior_class_shift"] = class_shift(adapted, base_images, judge.identity)
    return out

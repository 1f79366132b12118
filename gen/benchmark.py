"""The personalization benchmark's prompts: DreamBench's three kinds, on the world or in plain English.

DreamBench (Ruiz et al. 2023) asks for a subject in new contexts (**recontextualization**), with
things added (**accessorization**) and with a property changed (**property change**). Each
:class:`BenchPrompt` is a template in which ``{subject}`` stands for however the subject is named
(a concept mention ``<rex>``, the training view's ``sks robot``) and from which the plain prompt
(the class word in the subject's place) is made for prompt scoring, as DreamBench scores CLIP-T.

On the built-in world the prompts are world captions, so the evaluator can check every stated
attribute: recontextualization varies background colour, scene and position, accessorization adds
a hat or a bow, property change recolours the subject. Recoloured subjects are, to an identity
embedding, partly another subject, so those prompts are left out of subject fidelity
(``keeps_identity``). Other bases get a subset of DreamBench's own object prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from gen import world
from gen.errors import EvaluationError
from gen.evaluate import (
    Judge,
    WorldPromptScorer,
    cosine,
    diversity,
    fidelity_above_class,
    memorization,
    prior_preservation,
    prompt_fidelity,
    relative_to_real,
    subject_fidelity,
    world_class,
)
from gen.sampler import Request, Sampler

# The world suite's variants, in the order prompts cycle through them, and their DreamBench kinds.
PROMPT_KINDS = ("recontext", "position", "accessory", "colour")
DREAMBENCH_KINDS = ("recontextualization", "accessorization", "property")
KIND_OF_VARIANT = {"recontext": "recontextualization", "position": "recontextualization", "accessory": "accessorization", "colour": "property"}
SUBJECT = "{subject}"
SUBJECT_MARK = "\x00"  # stands for the subject token while a world caption is made; no world word, so read as none

# A subset of DreamBench's object prompts ("{0} {1}" = identifier + class noun there, {subject} here).
_GENERIC = {
    "recontextualization": (
        "a {subject} in the jungle", "a {subject} in the snow", "a {subject} on the beach", "a {subject} on a cobblestone street",
        "a {subject} on top of pink fabric", "a {subject} with a city in the background", "a {subject} floating on top of water",
        "a {subject} with a mountain in the background",
    ),
    "accessorization": (
        "a {subject} wearing a red hat", "a {subject} wearing a santa hat", "a {subject} wearing a rainbow scarf",
        "a {subject} wearing pink glasses",
    ),
    "property": ("a red {subject}", "a purple {subject}", "a shiny {subject}", "a cube shaped {subject}"),
}


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt; ``template`` names the subject as ``{subject}``."""

    kind: str  # a DreamBench kind
    variant: str  # finer: recontext, position, accessory, colour (world) or the kind again (generic)
    template: str
    class_word: str
    keeps_identity: bool = True  # False when the prompt changes how the subject looks (recolouring)

    def text(self, subject: str) -> str:
        """The prompt with the subject named by ``subject`` (e.g. ``"<rex>"`` or ``"sks robot"``)."""
        return self.template.replace(SUBJECT, subject)

    @property
    def plain(self) -> str:
        """The prompt with the class word in the subject's place: what a prompt scorer reads."""
        return self.text(self.class_word)


def evaluation_specs(cls: str, n: int = 8, seed: int = 0, instance: world.Instance | None = None) -> list[tuple[str, world.SceneSpec]]:
    """``n`` (variant, spec) pairs cycling through new backgrounds, positions, accessories and a colour change.

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


def world_prompts(class_word: str, n: int = 8, seed: int = 0, instance: world.Instance | None = None) -> list[BenchPrompt]:
    """``n`` world prompts for a subject of ``class_word`` (a world class), cycling through the variants."""
    cls = world_class(class_word)  # refuses a word the world has no class for
    prompts = []
    for i, (variant, spec) in enumerate(evaluation_specs(cls, n, seed, instance)):
        caption = evaluation_prompt(variant, spec, SUBJECT_MARK, seed + i)
        template = caption.replace(f"{SUBJECT_MARK} {class_word}", SUBJECT)
        prompts.append(BenchPrompt(KIND_OF_VARIANT[variant], variant, template, class_word, keeps_identity=variant != "colour"))
    return prompts


def generic_prompts(class_word: str, n: int = 8) -> list[BenchPrompt]:
    """``n`` of DreamBench's object prompts, taking the three kinds in turn (recontextualization twice as often)."""
    order = ("recontextualization", "accessorization", "recontextualization", "property")
    taken = {kind: 0 for kind in _GENERIC}
    prompts = []
    for i in range(n):
        kind = order[i % len(order)]
        template = _GENERIC[kind][taken[kind] % len(_GENERIC[kind])]
        taken[kind] += 1
        prompts.append(BenchPrompt(kind, kind, template, class_word, keeps_identity=kind != "property"))
    return prompts


def benchmark_prompts(class_word: str, n: int = 8, seed: int = 0, *, in_world: bool, instance: world.Instance | None = None) -> list[BenchPrompt]:
    """World prompts when the world's evaluator judges this base and class, else DreamBench's own."""
    return world_prompts(class_word, n, seed, instance) if in_world else generic_prompts(class_word, n)


def class_prompt(class_word: str) -> str:
    """The plain class prompt for prior preservation ("a photo of a robot")."""
    for cls, word in world.CLASS_WORDS.items():
        if word == class_word:
            return world.class_prompt(cls)
    article = "an" if class_word[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {class_word}"


# --- running and scoring the benchmark ------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSettings:
    """How much sampling one benchmark run costs (the defaults take ~30 s for the built-in base on 2 CPU cores)."""

    prompts: int = 8
    images_per_prompt: int = 2
    prior_images: int = 24  # the class prompt's images; 8 gave class accuracy in steps of 12.5 points, too coarse for a 5-point bar
    steps: int | None = None  # default: the base's
    guidance_scale: float | None = None
    seed: int = 0
    batch_images: int = 8  # images per sampler call (progress is reported per call)


@dataclass
class BenchmarkRun:
    """Everything one run generated, and its scores."""

    prompts: list[BenchPrompt]
    texts: list[str]  # the prompts as sampled
    images: list[list[Image.Image]]  # per prompt
    prior_adapted: list[Image.Image]  # the class prompt with the adapter on
    prior_base: list[Image.Image]  # the class prompt, base alone
    references: list[Image.Image]
    metrics: dict[str, float]
    per_prompt: list[dict]  # kind, variant, text, plain prompt, prompt score, identity similarity
    attribute_accuracy: dict[str, float]  # world only: per stated attribute


GenerateFn = Callable[[Sequence[Request]], list[list[Image.Image]]]
ProgressFn = Callable[[int, int, dict], None]


def sampler_generate(sampler: Sampler) -> GenerateFn:
    """A :data:`GenerateFn` over a sampler (requests are batched together where they fit)."""
    return lambda requests: [g.images for g in sampler.generate_many(requests)]


def generate_in_chunks(generate: GenerateFn, requests: Sequence[Request], batch_images: int, progress: ProgressFn | None, phase: str) -> list[list[Image.Image]]:
    """Run ``requests`` in calls of about ``batch_images`` images, reporting progress after each."""
    chunks: list[list[Request]] = [[]]
    for request in requests:
        if chunks[-1] and sum(r.num_images for r in chunks[-1]) + request.num_images > batch_images:
            chunks.append([])
        chunks[-1].append(request)
    total, done, out = sum(r.num_images for r in requests), 0, []
    for chunk in chunks:
        out += generate(chunk)
        done += sum(r.num_images for r in chunk)
        if progress is not None:
            progress(done, total, {"phase": phase})
    return out


def _replace_last(text: str, old: str, new: str) -> str:
    head, sep, tail = text.rpartition(old)
    return head + new + tail if sep else text


def run_benchmark(
    generate: GenerateFn,
    subject: str,
    class_word: str,
    references: Sequence[Image.Image],
    judge: Judge,
    settings: BenchmarkSettings = BenchmarkSettings(),
    *,
    in_world: bool,
    instance: world.Instance | None = None,
    class_subject: str | None = None,
    prior_base: Sequence[Image.Image] | None = None,
    generate_base: GenerateFn | None = None,
    user: str | None = None,
    progress: ProgressFn | None = None,
) -> BenchmarkRun:
    """Sample the benchmark's prompts naming the subject as ``subject`` and score them.

    ``generate`` samples with the adapter on. The class prompt is sampled with the adapter on,
    naming the class as ``class_subject`` (default: the class word; a serving sampler passes a
    mention that applies the adapter without its trigger), and with the base alone through
    ``generate_base`` unless ``prior_base`` images are given.
    """
    prompts = benchmark_prompts(class_word, settings.prompts, settings.seed, in_world=in_world, instance=instance)
    texts = [p.text(subject) for p in prompts]
    plain_class = class_prompt(class_word)
    adapted_class = _replace_last(plain_class, class_word, class_subject) if class_subject else plain_class
    common = {"seed": settings.seed, "steps": settings.steps, "guidance_scale": settings.guidance_scale, "user": user}
    requests = [Request(t, num_images=settings.images_per_prompt, **common) for t in texts]
    requests.append(Request(adapted_class, num_images=settings.prior_images, **common))
    *images, prior_adapted = generate_in_chunks(generate, requests, settings.batch_images, progress, "benchmark")
    if prior_base is None:
        if generate_base is None:
            raise EvaluationError("run_benchmark needs the base's class images or a way to make them (generate_base)")
        prior_base = generate_in_chunks(generate_base, [Request(plain_class, num_images=settings.prior_images, **common)], settings.batch_images, progress, "base prior")[0]
    run = BenchmarkRun(prompts, texts, images, list(prior_adapted), list(prior_base), list(references), {}, [], {})
    score_benchmark(run, judge, class_word)
    return run


def score_benchmark(run: BenchmarkRun, judge: Judge, class_word: str) -> BenchmarkRun:
    """Fill ``run.metrics``, ``run.per_prompt`` and ``run.attribute_accuracy`` from its images."""
    flat = [(p, im) for p, group in zip(run.prompts, run.images) for im in group]
    images = [im for _, im in flat]
    identity_images = [im for p, im in flat if p.keeps_identity]
    if not identity_images:
        raise EvaluationError("no benchmark prompt keeps the subject's look; use at least 2 prompts")
    metrics = subject_fidelity(identity_images, run.references, judge.identity)
    per_image_identity = cosine(judge.identity.embed(images), judge.identity.embed(run.references)).mean(dim=1).tolist()
    plain = [p.plain for p, _ in flat]
    scores = judge.prompt.score(images, plain) if judge.prompt is not None else [float("nan")] * len(images)
    if judge.prompt is not None:
        metrics["prompt_fidelity"] = prompt_fidelity(images, plain, judge.prompt)
    kinds = [p.kind for p, _ in flat]
    groups = [i for i, group in enumerate(run.images) for _ in group]
    for kind in DREAMBENCH_KINDS:
        chosen = [i for i, k in enumerate(kinds) if k == kind]
        if not chosen:
            continue
        if judge.prompt is not None:
            metrics[f"prompt_fidelity/{kind}"] = prompt_fidelity([images[i] for i in chosen], [plain[i] for i in chosen], judge.prompt)
        if flat[chosen[0]][0].keeps_identity:
            metrics[f"subject_fidelity/{kind}"] = relative_to_real(float(np.mean([per_image_identity[i] for i in chosen])), metrics["real_vs_real"])
        if len(chosen) > len({groups[i] for i in chosen}):
            metrics[f"diversity/{kind}"] = diversity([images[i] for i in chosen], judge.appearance, [groups[i] for i in chosen])
    if len(images) > len(run.images):
        metrics["diversity"] = diversity(images, judge.appearance, groups)
    metrics.update(memorization(images, run.references, judge.appearance).summary())
    prior = prior_preservation(run.prior_adapted, run.prior_base, run.references, judge, class_word)
    metrics.update(prior)
    metrics["subject_fidelity_above_class"] = fidelity_above_class(metrics["identity_similarity"], metrics["real_vs_real"], prior["prior_identity_similarity_base"])
    run.metrics = metrics
    k = 0
    run.per_prompt = []
    for p, text, group in zip(run.prompts, run.texts, run.images):
        idx = list(range(k, k + len(group)))
        k += len(group)
        run.per_prompt.append({
            "kind": p.kind, "variant": p.variant, "prompt": text, "plain": p.plain, "keeps_identity": p.keeps_identity,
            "prompt_score": float(np.nanmean([scores[i] for i in idx])) if judge.prompt is not None else None,
            "identity_similarity": float(np.mean([per_image_identity[i] for i in idx])),
        })
    if isinstance(judge.prompt, WorldPromptScorer):
        run.attribute_accuracy = judge.prompt.attribute_accuracy(images, plain)
    return run

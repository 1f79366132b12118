"""The engine behind ``bespoke eval``: benchmark an adapter (or a training configuration), then report.

One adapter (:func:`evaluate_adapter`): the DreamBench-like benchmark of :mod:`gen.benchmark`
sampled through a serving sampler (the path users' requests take), scored by a judge
(:mod:`gen.evaluate`), plus the adapter's weight diagnostics (:mod:`adapters.diagnostics`) and,
optionally, a composition with a second adapter (:mod:`gen.composition`).

A training configuration (:func:`evaluate_config`): train each sample subject with the given
preset and options, benchmarking inside the trainer's ``evaluate`` hook; with ``curve_steps``
the same run is continued from checkpoint to checkpoint (``steps`` 100, 200, 400, ...), so the
metrics-vs-steps curve costs one training run, not one per point.

:func:`write_report` turns an evaluation into a folder: ``report.html`` (sample grids, metric
tables, plots), ``report.json`` and the PNGs the page shows.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adapters.diagnostics import AdapterDiagnostics, OverlapReport, adapter_label, diagnose, short_name, subspace_overlap
from gen import world
from gen.adapter import LoraAdapter
from gen.base import Base
from gen.benchmark import (
    DREAMBENCH_KINDS,
    BenchmarkRun,
    BenchmarkSettings,
    benchmark_prompts,
    class_prompt,
    generate_in_chunks,
    run_benchmark,
    sampler_generate,
)
from gen.composition import composition_metrics, merge_adapters
from gen.embedders import load_judge
from gen.errors import EvaluationError
from gen.evaluate import Judge, autoencoder_ceiling, world_evaluator_applies
from gen.grid import make_grid
from gen.report import HtmlReport, bar_chart, line_chart, write_json
from gen.sampler import Request, Sampler

Progress = Callable[[int, int, dict], None]
EVAL_USER = "eval"
SUBJECT, PARTNER = "subject", "partner"


# --- what an adapter is judged against -----------------------------------------------------------


@dataclass
class Subject:
    """The photos an adapter is judged against (its training photos, ideally), and the world instance if known."""

    name: str
    references: list[Image.Image]
    instance: world.Instance | None = None
    fingerprints: tuple[str, ...] = ()  # as the trainer records them, to check against a record's data

    @classmethod
    def sample(cls, name: str, n: int = 4, seed: int = 0) -> Subject:
        """A held-out world subject (``"robot-3"``) with the photos ``bespoke sample-subject`` writes."""
        from adapters.data import load_images
        from adapters.samples import sample_subject_images, subject_instance

        try:
            instance = subject_instance(name)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        photos = sample_subject_images(instance, n, seed)
        return cls(name, photos, instance, tuple(im.sha256 for im in load_images(photos)))

    @classmethod
    def from_files(cls, sources: Sequence[str | Path], resolution: int, name: str | None = None) -> Subject:
        """User photos from files or folders, checked and cropped as training does."""
        from adapters.data import center_crop_resize, load_images

        images = load_images(list(sources))
        crops = [center_crop_resize(im.image, resolution)[0] for im in images]
        return cls(name or Path(str(sources[0])).name, crops, None, tuple(im.sha256 for im in images))


class PinnedSource:
    """An :class:`~gen.adapter.AdapterSource` over fixed adapters: the evaluation's own names, exact versions.

    Adapters are handed to the evaluation's own user under the evaluation's names (the serving
    layer refuses an adapter owned by someone other than the requesting user).
    """

    def __init__(self, adapters: Mapping[str, LoraAdapter]) -> None:
        self.adapters = dict(adapters)

    def get(self, user: str, concept: str, version: int | str = "latest") -> LoraAdapter:
        return replace(self.adapters[concept], user=user, concept=concept)

    def concepts(self, user: str) -> list[str]:
        return sorted(self.adapters)


def as_class(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter without its trigger or new tokens: a mention of it reads as the bare class word, LoRA on."""
    return replace(adapter, trigger=None, new_tokens=(), token_embeddings={})


# --- results -------------------------------------------------------------------------------------


@dataclass
class CompositionRun:
    """Two adapters at once: images and scores (see :mod:`gen.composition`)."""

    names: tuple[str, str]  # display names of subject and partner
    metrics: dict[str, float]
    overlap: OverlapReport
    joint_texts: list[str]
    joint_images: list[list[Image.Image]]
    solo: dict[str, list[Image.Image]]
    composed: dict[str, list[Image.Image]]


@dataclass
class AdapterEvaluation:
    """One adapter's benchmark, diagnostics and (optional) composition, curve and registry record."""

    label: str  # user/concept vN
    adapter: LoraAdapter
    subject: Subject
    run: BenchmarkRun
    diagnostics: AdapterDiagnostics
    judge: dict[str, str | None]
    settings: BenchmarkSettings
    base: dict[str, str]
    record: dict[str, Any] | None = None
    composition: CompositionRun | None = None
    curve: list[dict[str, float]] = field(default_factory=list)  # per training step: {"step": s, metric: value}
    seconds: float = 0.0

    @property
    def references_are_training_data(self) -> bool | None:
        """Whether the references are the photos the adapter was trained on (None: unknown)."""
        if not self.record or not self.record.get("data_fingerprints") or not self.subject.fingerprints:
            return None
        return set(self.subject.fingerprints) == set(self.record["data_fingerprints"])

    def alarms(self) -> list[str]:
        """The verdict's plain-language alarms, for the page and the JSON alike."""
        out = metric_warnings(self.run.metrics, _fraction(self)) + self.diagnostics.warnings
        if len(self.subject.references) == 1:  # real vs real reads 1.0 by definition then
            out.insert(0, "one reference photo: real vs real cannot be measured, so subject fidelity is the raw similarity, not a ratio")
        if self.composition is not None:
            out += self.composition.overlap.warnings
        return out


def _label(adapter: LoraAdapter) -> str:
    return adapter_label(adapter)


def _base_info(base: Base) -> dict[str, str]:
    return {"source": str(base.source), "fingerprint": base.fingerprint, "family": base.family, "size": str(base.default_size)}


# --- one adapter ---------------------------------------------------------------------------------


def evaluate_adapter(
    base: Base,
    adapter: LoraAdapter,
    subject: Subject,
    *,
    class_word: str | None = None,
    judge: Judge | None = None,
    settings: BenchmarkSettings = BenchmarkSettings(),
    partner: tuple[LoraAdapter, Subject] | None = None,
    composition_prompts: int = 4,
    record: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> AdapterEvaluation:
    """Benchmark ``adapter`` on ``base`` against ``subject``'s photos, diagnose it, and compose it with ``partner``.

    Sampling goes through a serving sampler, as users' requests do; the base is not modified
    beyond what any serving sampler does (a pool of placeholder tokens).
    """
    started = time.perf_counter()
    class_word = class_word or adapter.class_word
    if not class_word:
        raise EvaluationError(f"{_label(adapter)} names no class word; give one (--class-word)")
    adapter = replace(adapter, class_word=class_word)
    judge = judge or load_judge(base, class_word)
    in_world = world_evaluator_applies(base, class_word)
    pins = {SUBJECT: adapter, f"{SUBJECT}.as-class": as_class(adapter)}
    if partner is not None:
        other, _ = partner
        if not other.class_word:
            raise EvaluationError(f"{_label(other)} names no class word, so it cannot be prompted")
        pins.update({
            PARTNER: other, f"{SUBJECT}.with-{PARTNER}": merge_adapters(adapter, [(other, 1.0)], base=base.fingerprints),
            f"{PARTNER}.with-{SUBJECT}": merge_adapters(other, [(adapter, 1.0)], base=base.fingerprints),
        })
    sampler = Sampler(base, adapters=PinnedSource(pins))
    generate = sampler_generate(sampler)
    try:
        run = run_benchmark(
            generate, f"<{SUBJECT}>", class_word, subject.references, judge, settings, in_world=in_world, instance=subject.instance,
            class_subject=f"<{SUBJECT}.as-class>", generate_base=generate, user=EVAL_USER, progress=progress,
        )
        composition = None
        if partner is not None:
            composition = _compose(generate, base, adapter, subject, partner, run, judge, settings, composition_prompts, progress)
    finally:
        sampler.serving.runtime.close()  # this sampler's LoRA slots and hooks leave the warm base
    if len(subject.references) >= 2:
        run.metrics["autoencoder_ceiling"] = autoencoder_ceiling(base, subject.references, judge.identity)
    _name_subject(run, f"<{SUBJECT}>", f"<{adapter.concept or SUBJECT}>")
    diagnostics = diagnose(adapter, base, name=_label(adapter))
    return AdapterEvaluation(
        _label(adapter), adapter, subject, run, diagnostics, judge.describe(), settings, _base_info(base),
        record=dict(record) if record is not None else None, composition=composition, seconds=time.perf_counter() - started,
    )


def _name_subject(run: BenchmarkRun, internal: str, shown: str) -> None:
    """Show prompts with the user's concept name rather than the evaluation's internal mention."""
    run.texts = [t.replace(internal, shown) for t in run.texts]
    for row in run.per_prompt:
        row["prompt"] = row["prompt"].replace(internal, shown)


def _compose(generate, base: Base, adapter: LoraAdapter, subject: Subject, partner: tuple[LoraAdapter, Subject], run: BenchmarkRun,
             judge: Judge, settings: BenchmarkSettings, n: int, progress: Progress | None) -> CompositionRun:
    """Joint prompts naming both; each concept's own prompts solo and with the other's weights on."""
    other, other_subject = partner
    common = {"seed": settings.seed, "steps": settings.steps, "guidance_scale": settings.guidance_scale, "user": EVAL_USER}
    keep = [p for p in run.prompts if p.keeps_identity][:n]
    joint_texts = [p.text(f"<{SUBJECT}> and a <{PARTNER}>") for p in keep]
    other_prompts = [p for p in benchmark_prompts(other.class_word, max(n * 2, 4), settings.seed, in_world=world_evaluator_applies(base, other.class_word), instance=other_subject.instance) if p.keeps_identity][:n]
    texts = {
        "joint": joint_texts,
        f"solo {PARTNER}": [p.text(f"<{PARTNER}>") for p in other_prompts],
        f"composed {SUBJECT}": [p.text(f"<{SUBJECT}.with-{PARTNER}>") for p in keep],
        f"composed {PARTNER}": [p.text(f"<{PARTNER}.with-{SUBJECT}>") for p in other_prompts],
    }
    requests = [Request(t, num_images=settings.images_per_prompt, **common) for group in texts.values() for t in group]
    images = generate_in_chunks(generate, requests, settings.batch_images, progress, "composition")
    grouped, k = {}, 0
    for key, group in texts.items():
        grouped[key] = images[k:k + len(group)]
        k += len(group)
    flat = lambda rows: [im for row in rows for im in row]  # noqa: E731
    subject_solo = flat(run.images[i] for i, p in enumerate(run.prompts) if p.keeps_identity)[: n * settings.images_per_prompt]
    names = (_label(adapter), _label(other))
    if names[0] == names[1]:  # two unnamed adapters (loaded from files): scores are keyed by name, so they need two
        names = (f"{names[0]} ({SUBJECT})", f"{names[1]} ({PARTNER})")
    solo = {names[0]: subject_solo, names[1]: flat(grouped[f"solo {PARTNER}"])}
    composed = {names[0]: flat(grouped[f"composed {SUBJECT}"]), names[1]: flat(grouped[f"composed {PARTNER}"])}
    references = {names[0]: subject.references, names[1]: other_subject.references}
    metrics = composition_metrics(references, judge.identity, flat(grouped["joint"]), solo, composed)
    joint_readable = [t.replace(f"<{SUBJECT}>", f"<{adapter.concept or SUBJECT}>").replace(f"<{PARTNER}>", f"<{other.concept or PARTNER}>") for t in joint_texts]
    return CompositionRun(names, metrics, replace(subspace_overlap(adapter, other), names=names), joint_readable, grouped["joint"], solo, composed)


# --- a training configuration ---------------------------------------------------------------------


def benchmark_hook(
    base: Base,
    class_word: str,
    subject: Subject,
    judge: Judge,
    settings: BenchmarkSettings,
    runs: list[BenchmarkRun],
):
    """A trainer ``evaluate`` hook running the benchmark with the adapter live; each run is appended to ``runs``.

    Make it before training: it samples the base alone for the class prompt now.
    """
    in_world = world_evaluator_applies(base, class_word)
    prior_base = Sampler(base).generate(
        class_prompt(class_word), num_images=settings.prior_images, seed=settings.seed, steps=settings.steps, guidance_scale=settings.guidance_scale
    ).images

    def evaluate(sampler: Sampler, adapter: LoraAdapter) -> dict[str, float]:
        run = run_benchmark(
            sampler_generate(sampler), f"{adapter.trigger} {class_word}", class_word, subject.references, judge, settings,
            in_world=in_world, instance=subject.instance, prior_base=prior_base,
        )
        runs.append(run)
        return {k: v for k, v in run.metrics.items() if isinstance(v, float) and math.isfinite(v)}

    return evaluate


def evaluate_config(
    base: Base,
    subjects: Sequence[str],
    *,
    preset: str = "quick",
    options: Mapping[str, Any] | None = None,
    settings: BenchmarkSettings = BenchmarkSettings(),
    registry=None,
    curve_steps: Sequence[int] | None = None,
    judge: Judge | None = None,
    photos: int = 4,
    progress: Progress | None = None,
) -> list[AdapterEvaluation]:
    """Train every sample subject with ``preset`` + ``options`` and benchmark each; one evaluation per subject.

    With ``curve_steps`` (e.g. ``[100, 200, 400]``) training stops at each step count, is
    benchmarked, and resumes from its checkpoint; the last count is the adapter reported.
    """
    from adapters.fidelity import world_captions
    from adapters.registry import Registry
    from adapters.train import personalize, resolve_config

    options = dict(options or {})
    steps_list = sorted({int(s) for s in curve_steps}) if curve_steps else [None]
    if steps_list[0] is not None and steps_list[0] < 1:
        raise EvaluationError("curve steps must be positive")
    samples = [Subject.sample(name, photos) for name in subjects]  # every name checked before the first (long) training run
    twice = sorted({name for name in subjects if list(subjects).count(name) > 1})
    if twice:
        # A second run would resume from the first one's checkpoints and overwrite its report folder.
        raise EvaluationError(f"subject {', '.join(twice)} given more than once; name each subject once")
    own_registry = registry is None
    work = Path(tempfile.mkdtemp(prefix="bespoke-eval-"))
    registry = registry if registry is not None else Registry(work / "registry")
    evaluations = []
    try:
        for subject in samples:
            name = subject.name
            started = time.perf_counter()
            class_word = world.CLASS_WORDS[subject.instance.cls]
            subject_judge = judge or load_judge(base, class_word)
            captions = world_captions(subject.references, class_word) if world_evaluator_applies(base, class_word) else None
            runs: list[BenchmarkRun] = []
            hook = benchmark_hook(base, class_word, subject, subject_judge, settings, runs)
            curve, record = [], None
            for steps in steps_list:
                stage = dict(options)
                if steps is not None:
                    stage.update(steps=steps, output_dir=str(work / "checkpoints" / name), checkpoint_every=max(steps_list), resume=True)
                record = personalize(
                    base, f"eval-{name}", name, subject.references, class_word, captions=captions, registry=registry,
                    progress=progress, evaluate=hook, preset=preset, **stage,
                )
                curve.append({"step": record.metrics.get("steps", float(steps or 0)), **runs[-1].metrics})
            adapter = registry.for_user(record.user).get(record.concept, record.version)
            evaluations.append(AdapterEvaluation(
                _label(adapter), adapter, subject, runs[-1], diagnose(adapter, base, name=_label(adapter)), subject_judge.describe(),
                settings, _base_info(base), record=record.to_dict(), curve=curve if len(curve) > 1 else [],
                seconds=time.perf_counter() - started,
            ))
        cfg = resolve_config(base, preset, **options)
        for evaluation in evaluations:
            evaluation.record = {**(evaluation.record or {}), "resolved_config": cfg.to_record()}
    finally:
        if own_registry:
            registry.close()
        shutil.rmtree(work, ignore_errors=True)
    return evaluations


# --- the report ----------------------------------------------------------------------------------


HEADLINE = (
    ("subject_fidelity", "subject fidelity (x real vs real)", "identity similarity to the photos / photos among themselves (DINO-like)"),
    ("identity_similarity", "identity similarity", "mean cosine to the photos"),
    ("real_vs_real", "real vs real", "the photos among themselves"),
    ("subject_fidelity_above_class", "subject above class", "0 = any member of the class, 1 = another real photo; a dash: the photos are no more alike than the class is to them"),
    ("autoencoder_ceiling", "autoencoder ceiling", "the photos' own subject fidelity through the base's VAE: about what a perfect adapter could score"),
    ("prompt_fidelity", "prompt fidelity", "stated attributes read back (world) or CLIP-T"),
    ("diversity", "diversity", "1 - cosine between images of one prompt (DIV-like, appearance)"),
    ("prior_identity_similarity", "PRES (adapted)", "plain class images' similarity to the subject"),
    ("prior_identity_similarity_base", "PRES (base)", "the same for the base alone"),
    ("prior_drift_identity", "prior drift (identity)", "adapted minus base: the class collapsing onto the subject"),
    ("prior_class_accuracy", "class accuracy (adapted)", "plain class images read as the class"),
    ("prior_drift_class_accuracy", "prior drift (class accuracy)", "adapted minus base"),
    ("prior_class_shift", "class shift", "1 - cosine of the class images' mean embeddings, adapted vs base"),
    ("memorization_max_similarity", "memorization: nearest photo (max)", "appearance similarity of the closest generated image to a training photo"),
    ("memorization_copy_rate", "memorization: copy rate", "generated images at or above the copy threshold"),
    ("memorization_min_distance", "memorization: min pixel distance", "RMS in [0, 1] to the nearest training photo"),
)


def metric_warnings(metrics: Mapping[str, float], prompt_is_fraction: bool = True) -> list[str]:
    """Plain-language alarms from the numbers (the thresholds are issue 5's acceptance targets).

    ``prompt_is_fraction``: prompt fidelity is a fraction of attributes (world), not a CLIP-T cosine.
    """
    out = []
    if metrics.get("subject_fidelity", 1.0) < 0.85:
        ceiling = metrics.get("autoencoder_ceiling", 1.0)
        why = (
            f"the base's autoencoder alone brings the photos down to {ceiling:.2f} (it loses this subject's details): expect little from more training"
            if ceiling < 0.85 else "the subject is not learned well (more steps, a higher rank or a new token)"
        )
        out.append(f"subject fidelity {metrics['subject_fidelity']:.2f}x real-vs-real is below 0.85: {why}")
    if prompt_is_fraction and metrics.get("prompt_fidelity", 1.0) < 0.8:
        out.append(f"prompt fidelity {metrics['prompt_fidelity']:.0%} is below 80%: the adapter overrides what prompts ask")
    if metrics.get("prior_drift_identity", 0.0) > 0.05:
        out.append(f"plain class images moved {metrics['prior_drift_identity']:+.3f} toward the subject: the class prior is drifting (use prior preservation)")
    if metrics.get("prior_drift_class_accuracy", 0.0) < -0.05:
        out.append(f"class accuracy of plain class images fell by {-metrics['prior_drift_class_accuracy']:.0%}: the adapter damages the class")
    if metrics.get("memorization_copy_rate", 0.0) > 0.25:
        out.append(f"{metrics['memorization_copy_rate']:.0%} of generated images are near-copies of a training photo: overfitting (fewer steps)")
    return out


def _fraction(ev: AdapterEvaluation) -> bool:
    return (ev.judge.get("prompt") or "").startswith("world")


def _grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], title: str | None = None, cols: Sequence[str] | None = None) -> Image.Image:
    return make_grid(rows, row_labels=list(labels), col_labels=list(cols) if cols else None, cell=96, title=title)


def _loss_curve(record: Mapping[str, Any] | None) -> tuple[list[float], list[float]] | None:
    metrics = (record or {}).get("metrics") or {}
    points = sorted((int(k.split("_")[-1]), v) for k, v in metrics.items() if k.startswith("loss/step_"))
    return ([float(s) for s, _ in points], [float(v) for _, v in points]) if len(points) > 1 else None


def write_report(evaluation: AdapterEvaluation, folder: str | Path, title: str | None = None) -> Path:
    """Write ``report.html``, ``report.json`` and the PNGs into ``folder``; returns the HTML path."""
    ev, run = evaluation, evaluation.run
    report = HtmlReport(folder, title or f"Adapter report: {ev.label}")
    report.paragraph(
        f"base {ev.base['source']} ({ev.base['family']}, {ev.base['size']} px, fingerprint {ev.base['fingerprint']}); "
        f"trigger {ev.adapter.trigger!r}, class word {ev.adapter.class_word!r}, rank {ev.adapter.rank}, alpha {ev.adapter.alpha:g}; "
        f"references: {ev.subject.name} ({len(ev.subject.references)} photos); made in {ev.seconds:.0f} s.", "note",
    )
    judged = ", ".join(f"{k}: {v}" for k, v in ev.judge.items() if v)
    report.paragraph(
        f"Judged by {judged}. {len(run.prompts)} prompts x {ev.settings.images_per_prompt} images, {ev.settings.prior_images} class images "
        f"each for the adapted model and the base, seed {ev.settings.seed}.", "note",
    )
    if ev.references_are_training_data is False:
        report.warnings(["the references are not the adapter's training photos (their fingerprints differ): memorization is measured against these references"])

    report.heading("Verdict")
    report.warnings(ev.alarms(), ok="no alarms: fidelity, prompt following, prior and weights look healthy")

    report.heading("Benchmark (DreamBench-style)")
    report.table(["metric", "value", "meaning"], [[label, run.metrics.get(key), meaning] for key, label, meaning in HEADLINE if key in run.metrics])
    rows = []
    for kind in DREAMBENCH_KINDS:
        n = sum(p.kind == kind for p in run.prompts)
        if n:
            rows.append([kind, n, run.metrics.get(f"subject_fidelity/{kind}"), run.metrics.get(f"prompt_fidelity/{kind}"), run.metrics.get(f"diversity/{kind}")])
    report.table(["kind", "prompts", "subject fidelity", "prompt fidelity", "diversity"], rows, "by DreamBench's prompt kinds (property changes recolour the subject, so they are not scored for identity)")
    if run.attribute_accuracy:
        report.table(list(run.attribute_accuracy), [list(run.attribute_accuracy.values())], "stated attributes read back, per attribute")
    report.table(
        ["kind", "prompt", "prompt score", "identity sim."],
        [[p["kind"], p["prompt"], p["prompt_score"], p["identity_similarity"]] for p in run.per_prompt],
    )

    report.heading("Samples")
    report.image(_grid([ev.subject.references], ["references"]), "references", "the photos the adapter is judged against")
    for kind in DREAMBENCH_KINDS:
        idx = [i for i, p in enumerate(run.prompts) if p.kind == kind]
        if idx:
            report.image(_grid([run.images[i] for i in idx], [run.texts[i] for i in idx], kind), f"samples_{kind}", f"{kind}: one row per prompt")
    report.image(
        _grid([run.prior_base, run.prior_adapted], ["base alone", "with the adapter"], "plain class prompt"), "prior",
        "prior preservation: the plain class prompt with and without the adapter",
    )

    _diagnostics_section(report, ev.diagnostics)
    _training_section(report, ev)
    if ev.composition is not None:
        _composition_section(report, ev.composition)

    html_path = report.write()
    write_json(Path(folder) / "report.json", report_data(ev, report.files))
    return html_path


def _diagnostics_section(report: HtmlReport, diag: AdapterDiagnostics) -> None:
    report.heading("Weights")
    summary = diag.summary()
    report.key_values({k.replace("_", " "): v for k, v in summary.items()})
    layers = diag.layers
    labels = [short_name(layer.module) for layer in layers]
    colour = {"dead": "#999999", "exploding": "#d62728", "non-finite": "#000000"}
    colours = [colour.get(layer.flags[0], "#4878cf") if layer.flags else "#4878cf" for layer in layers]
    relative = all(layer.relative_norm is not None for layer in layers)
    values = [layer.relative_norm if relative else layer.delta_norm for layer in layers]
    positive = [v for v in values if math.isfinite(v) and v > 0]
    report.plot(
        bar_chart(
            labels, values, title="update size per layer (grey: dead, red: exploding)", ylabel="||BA|| * scale / ||W||" if relative else "||BA|| * scale",
            log=bool(positive) and max(positive) / min(positive) > 100, colours=colours,
            hlines={"exploding": diag.config.exploding_relative_norm} if relative else None,
        ),
        "layer_norms", "update norm per targeted layer" + (", relative to the base weight" if relative else ""),
    )
    series = {}
    for label, layer in zip(labels, layers):
        s = [v for v in layer.singular_values]
        if s and s[0] > 0:
            series[label] = (list(range(1, len(s) + 1)), [max(v / s[0], 1e-8) for v in s])
    if series:
        report.plot(
            line_chart(series, title="singular values of each layer's update (normalised)", xlabel="index", ylabel="s_i / s_1", log=True, legend=len(series) <= 12),
            "spectra", "a fast decay means the layer uses few of its rank's directions",
        )
        report.plot(
            bar_chart(labels, [layer.effective_rank for layer in layers], title="effective rank per layer", ylabel="effective rank", hlines=_rank_lines(layers)),
            "effective_rank", "exp(entropy of the normalised singular values)",
        )
    def size(layer) -> tuple[bool, float]:  # broken (NaN, infinite) layers first: a NaN key scrambled the whole order
        v = layer.relative_norm if layer.relative_norm is not None else layer.delta_norm
        return (math.isfinite(v), -v if math.isfinite(v) else 0.0)

    top = sorted(layers, key=size)[:10]
    report.table(
        ["layer", "relative norm", "norm", "effective rank", "stable rank", "flags"],
        [[layer.module, layer.relative_norm, layer.delta_norm, layer.effective_rank, layer.stable_rank, ", ".join(layer.flags)] for layer in top],
        "the ten largest updates",
    )
    if diag.token_embeddings:
        report.table(["encoder", *next(iter(diag.token_embeddings.values()))], [[enc, *stats.values()] for enc, stats in diag.token_embeddings.items()], "new token embeddings")


def _rank_lines(layers) -> dict[str, float]:
    """The LoRA rank as a reference level; imported adapters can hold another rank per layer, so the largest is drawn then."""
    ranks = {layer.rank for layer in layers}
    top = max(ranks)
    return {f"LoRA rank {top}" if len(ranks) == 1 else f"largest LoRA rank {top} (ranks {min(ranks)}-{top})": top}


def _training_section(report: HtmlReport, ev: AdapterEvaluation) -> None:
    loss = _loss_curve(ev.record)
    if ev.record is None and not ev.curve:
        return
    report.heading("Training")
    if ev.record is not None:
        config = ev.record.get("training_config") or {}
        keys = ("preset", "profile", "rank", "alpha", "steps", "lr", "batch_size", "prior_preservation", "text_encoder_lora", "new_token", "seed")
        shown = {k: config[k] for k in keys if k in config}
        if shown:
            report.key_values(shown | {"training photos": len(ev.record.get("data_fingerprints") or ())}, "training configuration (from the registry record)")
        else:
            report.paragraph("The registry record holds no training configuration (an imported adapter?).", "note")
    if loss is not None:
        report.plot(line_chart({"loss": loss}, title="training loss", xlabel="step", ylabel="loss", legend=False, markers=False), "loss_curve", "loss per step, window means")
    if ev.curve:
        steps = [point["step"] for point in ev.curve]
        series = {k: (steps, [point.get(k, float("nan")) for point in ev.curve]) for k in ("subject_fidelity", "prompt_fidelity", "prior_drift_identity", "memorization_copy_rate", "diversity") if k in ev.curve[0]}
        report.plot(line_chart(series, title="metrics over training steps", xlabel="step", ylabel="value"), "metric_curve", "the benchmark at each checkpoint")
        keys = list(series)
        report.table(["step", *keys], [[point["step"], *[point.get(k) for k in keys]] for point in ev.curve])


def _composition_section(report: HtmlReport, comp: CompositionRun) -> None:
    report.heading(f"Composition with {comp.names[1]}")
    if comp.overlap.layers:
        ok = f"the two adapters' updates share little (mean overlap {comp.overlap.mean_column_overlap:.2f}, chance {comp.overlap.summary()['mean_chance']:.2f})"
    else:  # the mean over no layers is NaN
        ok = "the two adapters update no layer in common"
    report.warnings(comp.overlap.warnings, ok=ok)
    header = ["concept", "joint fidelity", "solo fidelity", "composed fidelity", "interference", "leakage", "real cross-similarity"]
    rows = [[name, *[comp.metrics.get(f"{name}/{k}") for k in ("joint_fidelity", "solo_fidelity", "composed_fidelity", "interference", "leakage", "real_cross_similarity")]] for name in comp.names]
    report.table(header, rows, "joint: a prompt naming both; composed: the concept's own prompt with the other adapter's weights on too; leakage: how much more composed images resemble the other's photos than solo ones")
    report.image(_grid(comp.joint_images, comp.joint_texts, "both concepts in one prompt"), "composition_joint")
    n = max(1, len(comp.solo[comp.names[0]]))
    rows_img = [comp.solo[comp.names[0]][:8], comp.composed[comp.names[0]][:8], comp.solo[comp.names[1]][:8], comp.composed[comp.names[1]][:8]]
    report.image(_grid(rows_img, [f"{comp.names[0]} solo", f"{comp.names[0]} + other's weights", f"{comp.names[1]} solo", f"{comp.names[1]} + other's weights"]), "composition_leakage", f"up to 8 of {n} images per row")
    overlap = comp.overlap
    if overlap.layers:
        report.plot(
            bar_chart([short_name(layer.module) for layer in overlap.layers], [layer.column_overlap for layer in overlap.layers], title="subspace overlap per shared layer", ylabel="mean cos^2 of principal angles",
                      hlines={"warning": overlap.threshold, "chance": float(np.mean([layer.chance for layer in overlap.layers]))}),
            "overlap", "1 = both write the same output directions, 0 = orthogonal",
        )


def report_data(ev: AdapterEvaluation, files: Sequence[str] = ()) -> dict[str, Any]:
    """Everything in the report as JSON-ready data."""
    run = ev.run
    comp = ev.composition
    return {
        "adapter": {
            "label": ev.label, "user": ev.adapter.user, "concept": ev.adapter.concept, "version": ev.adapter.version, "trigger": ev.adapter.trigger,
            "class_word": ev.adapter.class_word, "rank": ev.adapter.rank, "alpha": ev.adapter.alpha, "new_tokens": list(ev.adapter.new_tokens),
        },
        "base": ev.base,
        "subject": {"name": ev.subject.name, "photos": len(ev.subject.references), "instance": asdict(ev.subject.instance) if ev.subject.instance else None,
                    "references_are_training_data": ev.references_are_training_data},
        "judge": ev.judge,
        "settings": asdict(ev.settings),
        "metrics": run.metrics,
        "warnings": ev.alarms(),  # the composition's too (the JSON once left them out)
        "per_prompt": run.per_prompt,
        "attribute_accuracy": run.attribute_accuracy,
        "diagnostics": ev.diagnostics.to_dict(),
        "composition": None if comp is None else {"names": list(comp.names), "metrics": comp.metrics, "overlap": comp.overlap.to_dict(), "joint_prompts": comp.joint_texts},
        "curve": ev.curve,
        "record": ev.record,
        "files": list(files),
        "seconds": ev.seconds,
    }


SUMMARY_KEYS = ("subject_fidelity", "prompt_fidelity", "diversity", "prior_drift_identity", "prior_drift_class_accuracy", "memorization_copy_rate")


def _mean_of(values: Sequence[float | None]) -> float:
    """The mean of the measured values; NaN (a dash) when none was (np.nanmean warned "Mean of empty slice" then)."""
    measured = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(measured)) if measured else float("nan")


def write_config_report(evaluations: Sequence[AdapterEvaluation], folder: str | Path, title: str) -> Path:
    """One report per subject in a subfolder, and an index page with the table over subjects and their mean."""
    folder = Path(folder)
    report = HtmlReport(folder, title)
    rows, data = [], []
    for ev in evaluations:
        sub = folder / ev.subject.name
        write_report(ev, sub)
        rows.append([ev.subject.name, *[ev.run.metrics.get(k) for k in SUMMARY_KEYS], ev.seconds])
        data.append({"subject": ev.subject.name, "report": f"{ev.subject.name}/report.html", "metrics": ev.run.metrics, "curve": ev.curve, "seconds": ev.seconds})
    means = [_mean_of([r[i] for r in rows]) for i in range(1, len(SUMMARY_KEYS) + 2)]
    report.table(["subject", *[k.replace("_", " ") for k in SUMMARY_KEYS], "seconds"], rows + [["mean", *means]])
    curves = [ev for ev in evaluations if ev.curve]
    if curves:
        series = {}
        for ev in curves:
            steps = [p["step"] for p in ev.curve]
            series[f"{ev.subject.name} subject"] = (steps, [p.get("subject_fidelity", float("nan")) for p in ev.curve])
            series[f"{ev.subject.name} prompt"] = (steps, [p.get("prompt_fidelity", float("nan")) for p in ev.curve])
        report.plot(line_chart(series, title="subject and prompt fidelity over training steps", xlabel="step", ylabel="value"), "metric_curve")
    for ev in evaluations:
        report.link(f"{ev.subject.name}/report.html", f"{ev.label}: full report")
    if evaluations and evaluations[0].record and "resolved_config" in evaluations[0].record:
        report.key_values(evaluations[0].record["resolved_config"], "training configuration")
    path = report.write()
    write_json(folder / "report.json", {"title": title, "subjects": data, "mean": dict(zip([*SUMMARY_KEYS, "seconds"], means)), "files": report.files})
    return path

"""``personalize``: a user's photos in, a registered adapter out.

The Python entry point behind ``bespoke train`` and ``accelerate launch scripts/train_lora.py``:
resolve the options against the base's presets, train (:func:`~adapters.train.loop.train_adapters`)
and put each adapter into the registry with its training config, data fingerprints and metrics
(loss curve, timing, and whatever the job's ``evaluate`` hook measured). Under several processes
the main one writes the registry and every process returns the same records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapters.data import ImageSource
from adapters.registry import AdapterRecord, Registry
from adapters.train.config import profile_of, resolve_config
from adapters.train.data import EvaluateFn, Progress, TrainJob
from adapters.train.loop import TrainResult, ValidationFn, on_main_process, train_adapters
from gen.base import Base


def personalize(
    base: Base,
    user: str,
    concept: str,
    images: ImageSource | Sequence[ImageSource],
    class_word: str,
    *,
    captions: Sequence[str] | Mapping[str, str] | None = None,
    registry: Registry | None = None,
    progress: Progress | None = None,
    evaluate: EvaluateFn | None = None,
    on_validation: ValidationFn | None = None,
    preset: str = "balanced",
    **options: Any,
) -> AdapterRecord:
    """Train ``user``'s adapter for ``concept`` from ``images`` (files, folders or PIL images) and register it.

    ``options`` are :class:`~adapters.train.config.TrainConfig` fields overriding the preset
    (``rank=16``, ``steps=500``, ``new_token=True``, ...). ``progress(step, total, info)`` is called
    as work advances (``info["phase"]``: "class images", "train", "evaluate"). ``evaluate(sampler,
    adapter)`` runs after training with the adapter live; its numbers join the record's metrics.
    The adapter goes into ``registry`` (default: ``Registry()`` at its default root).
    """
    job = TrainJob(user, concept, images, class_word, captions, evaluate=evaluate)
    return personalize_many(base, [job], registry=registry, progress=progress, on_validation=on_validation, preset=preset, **options)[0]


def personalize_many(
    base: Base,
    jobs: Sequence[TrainJob],
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    on_validation: ValidationFn | None = None,
    preset: str = "balanced",
    **options: Any,
) -> list[AdapterRecord]:
    """Train several users' adapters in one job (each row routed to its own user's LoRA) and register them all."""
    cfg = resolve_config(base, preset, **options)
    results = train_adapters(base, jobs, cfg, progress=progress, on_validation=on_validation)
    config = {"preset": preset, "profile": profile_of(base), **cfg.to_record()}
    return on_main_process(lambda: register(results, base, config, registry))


def register(results: Sequence[TrainResult], base: Base, training_config: dict, registry: Registry | None = None) -> list[AdapterRecord]:
    """Put trained adapters into ``registry`` (default: one opened at the default root, then closed)."""
    reg = registry if registry is not None else Registry()
    try:
        return [
            reg.for_user(r.job.user).put(
                r.adapter, base, r.job.concept, training_config={**training_config, "seed": r.seed},  # the job's seed, not the config's
                data_fingerprints=r.data_fingerprints, metrics=r.metrics,
            )
            for r in results
        ]
    finally:
        if registry is None:
            reg.close()

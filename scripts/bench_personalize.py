"""Personalization benchmark on the built-in base (DreamBench-style, scored by the world's evaluator).

    python scripts/bench_personalize.py                        # full run on the built-in base
    python scripts/bench_personalize.py --quick --out /tmp/q.json   # smoke run: seconds, numbers meaningless
    python scripts/bench_personalize.py --parts subjects ablation     # skip the several-users part
    python scripts/bench_personalize.py --parts subjects --subjects robot-5 mug-5 car-5 house-5 cat-5  # the development set, 3 seeds each

Three parts, all written to one JSON file and printed as tables:

1. **Subjects**: 5 held-out subjects (one per class) with 4 photos each, trained with the default
   preset, once per training seed (``--seeds``, default 0 1 2). Per subject, averaged over the seeds: training
   wall time, subject fidelity (identity similarity to the photos relative to real-vs-real), prompt fidelity
   over 8 prompts (new backgrounds, positions, accessories, a colour change) and prior drift of the plain
   class prompt against the base alone; and the seeds' lowest and highest subject fidelity. One seed's figure
   can be far from the subject's typical adapter (car-0: 0.705 / 0.846 / 0.831 for seeds 2 / 0 / 1), so a single
   run per subject says little about the adapter a user gets.
2. **Ablation**: rank 4 vs 16, prior preservation (and its target: the class images' noise, the
   base's own prediction, or that plus the photos' captions without the trigger), text-encoder LoRA
   and the new token, each flipped from the default, on the first ``--ablation-subjects`` subjects
   (the preset's seed).
3. **Several users in one job**: K subjects trained together (each row routed to its own user's
   LoRA) against the same K trained one after another: training throughput (images/s) and quality
   (the preset's seed).

Class images are generated (and cached) before any timing, so wall times are those of a user whose
class prior is already on disk; the one-time cost is reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.fidelity import FidelitySettings, world_captions, world_fidelity_hook  # noqa: E402
from adapters.registry import Registry  # noqa: E402
from adapters.samples import sample_subject_images, subject_instance  # noqa: E402
from adapters.train import TrainJob, class_images, personalize_many, resolve_config  # noqa: E402
from adapters.train.config import add_config_arguments, overrides_from_args  # noqa: E402
from gen import world  # noqa: E402
from gen.base import Base, load_base  # noqa: E402
from gen.errors import InvalidRequest  # noqa: E402
from gen.lora_targets import UNET_TARGETS  # noqa: E402

TARGETS = {
    "train_seconds_max": 180.0,
    "subject_fidelity_min": 0.85,
    "prompt_fidelity_min": 0.80,
    "prior_class_accuracy_drift_max": 0.05,
    "prior_identity_drift_max": 0.05,
    "multi_user_throughput_ratio_min": 2.0,
}
QUALITY_KEYS = ("subject_fidelity", "prompt_fidelity", "prior_drift_class_accuracy", "prior_drift_identity")
SUBJECT_KEYS = ("train_seconds", *QUALITY_KEYS, "autoencoder_ceiling", "scene_ceiling")  # the subjects table: a row per subject and their mean


@dataclass(frozen=True)
class BenchSettings:
    subjects: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)  # training seeds per subject in the subjects part; the other parts use the preset's
    photos: int = 4
    preset: str = "balanced"
    overrides: dict = field(default_factory=dict)  # applied to every run (quick mode shortens training)
    fidelity: FidelitySettings = FidelitySettings()
    ablation_subjects: int = 2
    users_in_job: int = 4
    parts: tuple[str, ...] = ("subjects", "ablation", "multi_user")  # which of the three parts run
    auto_captions: bool = True  # caption photos with the evaluator's reading, as the CLI does


# 48 class-prompt images per drift measurement: with 24, three seeds of one adapter's class prompt put its identity
# similarity at 0.39 / 0.35 / 0.35, noise of the size of the 0.05 bar.
FULL = BenchSettings(subjects=tuple(f"{cls}-0" for cls in world.CLASSES[:5]), seeds=(0, 1, 2), fidelity=FidelitySettings(prior_images=48))
QUICK = BenchSettings(
    subjects=("robot-0", "mug-0"),
    overrides={"steps": 3, "num_class_images": 2, "class_image_steps": 2, "batch_size": 1},
    fidelity=FidelitySettings(prompts=4, images_per_prompt=1, prior_images=1, steps=1),
    ablation_subjects=1,
    users_in_job=2,
)


def train(base: Base, subjects: list[str], settings: BenchSettings, registry: Registry, bar: tqdm, **options) -> list[dict]:
    """Train ``subjects`` in one job; one row per subject: its metrics and the job's timing."""
    jobs = []
    for name in subjects:
        photos, cls = sample_subject_images(name, settings.photos), subject_instance(name).cls
        hook = world_fidelity_hook(base, cls, photos, settings.fidelity, instance=subject_instance(name))
        captions = world_captions(photos, cls) if settings.auto_captions else None  # what `bespoke train` does
        jobs.append(TrainJob(user=f"bench-{name}", concept=name, images=photos, class_word=cls, captions=captions, evaluate=hook))
    records = personalize_many(base, jobs, registry=registry, preset=settings.preset, **{**settings.overrides, **options})
    bar.update(1)
    bar.set_postfix(last=",".join(subjects), subject_fid=f"{records[0].metrics.get('subject_fidelity', float('nan')):.2f}")
    return [{"subject": name, **record.metrics} for name, record in zip(subjects, records)]


def train_subjects(base: Base, settings: BenchSettings, registry: Registry, bar: tqdm) -> list[dict]:
    """Each subject trained alone once per seed: one row per (subject, seed)."""
    return [
        {**row, "seed": seed}
        for name in settings.subjects
        for seed in settings.seeds
        for row in train(base, [name], settings, registry, bar, seed=seed)
    ]


def per_subject(rows: list[dict]) -> list[dict]:
    """Per subject: each key's mean over its seeds, the seeds' lowest and highest subject fidelity, the longest training."""
    out = []
    for name in dict.fromkeys(r["subject"] for r in rows):
        mine = [r for r in rows if r["subject"] == name]
        fidelity = [r["subject_fidelity"] for r in mine]
        out.append({
            "subject": name, "seeds": [r["seed"] for r in mine], **{key: mean_of(mine, key) for key in SUBJECT_KEYS},
            "subject_fidelity_min": min(fidelity), "subject_fidelity_max": max(fidelity), "train_seconds_max": max(r["train_seconds"] for r in mine),
        })
    return out


def images_per_step(base: Base, settings: BenchSettings, users: int, **options) -> int:
    cfg = resolve_config(base, settings.preset, **{**settings.overrides, **options})
    return users * cfg.batch_size * (2 if cfg.prior_preservation else 1) * cfg.grad_accum


def warm_class_images(base: Base, settings: BenchSettings) -> float:
    """Generate every subject's class images once (they are cached); returns the seconds it took."""
    cfg = resolve_config(base, settings.preset, **settings.overrides)
    started = time.perf_counter()
    for name in settings.subjects:
        prompt = (cfg.class_prompt or "a {class_word}").format(class_word=subject_instance(name).cls)
        class_images(base, prompt, cfg.num_class_images, cfg.resolution, cfg.class_image_steps)
    return time.perf_counter() - started


LORA_LAYERS = {  # where the UNet's LoRA goes: the studied choices (diffusers' attn1 is self-, attn2 cross-attention)
    "all attention": UNET_TARGETS,
    "cross-attention": tuple(f"attn2.{t}" for t in UNET_TARGETS),
    "transformer blocks": (*UNET_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),  # + feed-forward and the blocks' in/out projections
}
PRIOR_TARGETS = {  # how class rows are held: the studied kinds of prior preservation
    "class images' noise": {"prior_distill": False, "prior_context": False},
    "base's prediction": {"prior_distill": True, "prior_context": False},
    "base's prediction + photo contexts": {"prior_distill": True, "prior_context": True},
}


def ablation_variants(base: Base, settings: BenchSettings) -> list[tuple[str, dict]]:
    """The default, then each studied option flipped (rank: both 4 and 16; the prior: off and each other target)."""
    d = resolve_config(base, settings.preset, **settings.overrides)
    onoff = lambda flag: "on" if flag else "off"  # noqa: E731
    target = next(name for name, o in PRIOR_TARGETS.items() if all(getattr(d, k) == v for k, v in o.items()))
    layers = next((name for name, t in LORA_LAYERS.items() if t == d.unet_targets), ",".join(d.unet_targets))
    return [
        (
            f"default (rank {d.rank}, LoRA on {layers}, prior {f'on the {target}' if d.prior_preservation else 'off'}, "
            f"text LoRA {onoff(d.text_encoder_lora)}, new token {onoff(d.new_token)})",
            {},
        ),
        *[(f"rank {r}", {"rank": r}) for r in (4, 16) if r != d.rank],
        *[(f"LoRA on {name}", {"unet_targets": t}) for name, t in LORA_LAYERS.items() if name != layers],
        (f"prior {onoff(not d.prior_preservation)}", {"prior_preservation": not d.prior_preservation}),
        *[(f"prior on the {name}", options) for name, options in PRIOR_TARGETS.items() if name != target],
        (f"text LoRA {onoff(not d.text_encoder_lora)}", {"text_encoder_lora": not d.text_encoder_lora}),
        (f"new token {onoff(not d.new_token)}", {"new_token": not d.new_token}),
    ]


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.fmean(values) if values else float("nan")


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


def run(base: Base, settings: BenchSettings, registry: Registry) -> dict:
    class_image_seconds = warm_class_images(base, settings)
    variants = ablation_variants(base, settings) if "ablation" in settings.parts else []
    k = min(settings.users_in_job, len(settings.subjects)) if "multi_user" in settings.parts else 0
    total = len(settings.subjects) * len(settings.seeds) * ("subjects" in settings.parts) + len(variants) * settings.ablation_subjects + (1 + k if k else 0)
    bar = tqdm(total=total, desc="training runs", unit="run")
    results: dict = {"class_image_seconds": class_image_seconds}
    if "subjects" in settings.parts:
        runs = train_subjects(base, settings, registry, bar)
        subjects = per_subject(runs)
        results.update(runs=runs, subjects=subjects, summary={key: mean_of(subjects, key) for key in SUBJECT_KEYS})

    if variants:
        ablation = []
        for label, options in variants:
            rows = [row for name in settings.subjects[: settings.ablation_subjects] for row in train(base, [name], settings, registry, bar, **options)]
            ablation.append({
                "variant": label, "options": options, **{k: mean_of(rows, k) for k in ("train_seconds", *QUALITY_KEYS)},
                "subject_fidelity_by_subject": {row["subject"]: row["subject_fidelity"] for row in rows},  # two subjects' mean hides a lot
            })
        results["ablation"] = ablation
    if k:
        results["multi_user"] = multi_user(base, settings, registry, bar, k)
    bar.close()
    return results


def multi_user(base: Base, settings: BenchSettings, registry: Registry, bar: tqdm, k: int) -> dict:
    """K subjects in one job against the same K trained one after another."""
    names = list(settings.subjects[:k])
    together = train(base, names, settings, registry, bar)
    alone = [row for name in names for row in train(base, [name], settings, registry, bar)]
    per_step = images_per_step(base, settings, 1)
    steps = together[0]["steps"]
    joint_rate = k * per_step * steps / together[0]["loop_seconds"]
    sequential_rate = k * per_step * steps / sum(r["loop_seconds"] for r in alone)
    return {
        "users": k,
        "images_per_s_one_job": joint_rate,
        "images_per_s_sequential": sequential_rate,
        "throughput_ratio": joint_rate / sequential_rate,
        "train_seconds_one_job": together[0]["train_seconds"],
        "train_seconds_sequential": sum(r["train_seconds"] for r in alone),
        "quality_one_job": {key: mean_of(together, key) for key in QUALITY_KEYS},
        "quality_sequential": {key: mean_of(alone, key) for key in QUALITY_KEYS},
    }


def report(results: dict) -> str:
    cols = ["train s", "subject fid", "prompt fid", "drift class acc", "drift identity"]
    tables = []
    if "subjects" in results:
        seeds = len(results["subjects"][0]["seeds"])
        tables.append(table(
            f"Subjects, mean over {seeds} training seed(s) (targets: train <= 180 s, subject >= 0.85x, prompt >= 80%, |drift| <= 0.05)",
            ["subject", *cols, "VAE ceiling", "scene ceiling", "subject fid, seeds' range", "train s, longest"],
            [[r["subject"], *[r[k] for k in SUBJECT_KEYS], f"{r['subject_fidelity_min']:.3f}-{r['subject_fidelity_max']:.3f}", r["train_seconds_max"]] for r in results["subjects"]]
            + [["mean", *[results["summary"][k] for k in SUBJECT_KEYS], "", ""]],
        ))
    if "ablation" in results:
        tables.append(table(
            "Ablation (mean over the ablation subjects)",
            ["variant", *cols, "subject fid by subject"],
            [
                [r["variant"], r["train_seconds"], *[r[k] for k in QUALITY_KEYS], " / ".join(f"{v:.3f}" for v in r["subject_fidelity_by_subject"].values())]
                for r in results["ablation"]
            ],
        ))
    if "multi_user" in results:
        m = results["multi_user"]
        tables.append(table(
            f"{m['users']} users in one job vs one after another (target: throughput ratio >= 2 at equal quality)",
            ["mode", "images/s", "train s", "subject fid", "prompt fid"],
            [
                ["one job", m["images_per_s_one_job"], m["train_seconds_one_job"], m["quality_one_job"]["subject_fidelity"], m["quality_one_job"]["prompt_fidelity"]],
                ["sequential", m["images_per_s_sequential"], m["train_seconds_sequential"], m["quality_sequential"]["subject_fidelity"], m["quality_sequential"]["prompt_fidelity"]],
            ],
        ))
        tables.append(f"throughput ratio: {m['throughput_ratio']:.2f}x")
    return "\n\n".join([*tables, f"class images (once): {results['class_image_seconds']:.1f} s"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin", help="'builtin' or a diffusers folder of a base trained on the world")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 subjects, 3 steps, tiny evaluation")
    parser.add_argument("--subjects", nargs="+", default=None, help="held-out subjects to train (default: robot-0 mug-0 car-0 house-0 cat-0); e.g. the development set robot-5 mug-5 car-5 house-5 cat-5")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds per subject in the subjects part (default: 0 1 2, quick: 0)")
    parser.add_argument("--preset", default=None, help="training preset for every run (default: balanced)")
    parser.add_argument("--ablation-subjects", type=int, default=None, help="subjects per ablation variant (default: 2, quick: 1)")
    parser.add_argument("--users-in-job", type=int, default=None, help="K for the several-users comparison (default: 4, quick: 2)")
    parser.add_argument("--bare-captions", action="store_true", help="train on 'a {trigger} {class}' instead of the evaluator's captions")
    parser.add_argument("--parts", nargs="+", choices=BenchSettings.parts, default=None, help="run only these parts (default: all three)")
    parser.add_argument("--registry", default=None, help="registry folder (default: a temporary one)")
    parser.add_argument("--out", default="runs/bench_personalize.json")
    add_config_arguments(parser)  # any training option, for every run (--seeds still sets the subjects part's seeds)
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.subjects:
        for name in args.subjects:
            try:
                subject_instance(name)
            except ValueError as err:
                parser.error(str(err))
        settings = replace(settings, subjects=tuple(args.subjects))
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.ablation_subjects is not None:
        settings = replace(settings, ablation_subjects=args.ablation_subjects)
    if args.users_in_job is not None:
        settings = replace(settings, users_in_job=args.users_in_job)
    if args.preset is not None:
        settings = replace(settings, preset=args.preset)
    if overrides := overrides_from_args(args):
        settings = replace(settings, overrides={**settings.overrides, **overrides})
    if args.bare_captions:
        settings = replace(settings, auto_captions=False)
    if args.parts:
        settings = replace(settings, parts=tuple(args.parts))
    base = load_base(args.base)
    for seed in settings.seeds:  # every run's options, checked before the first of many minutes of training
        try:
            resolve_config(base, settings.preset, **{**settings.overrides, "seed": seed})
        except InvalidRequest as err:
            parser.error(str(err))
    if base.defaults.stand_in:
        print("note: the base is an untrained stand-in; fidelity numbers are meaningless until the trained base ships")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Registry(args.registry or tmp) as registry:
        results = run(base, settings, registry)
    results.update(
        targets=TARGETS,
        settings={"quick": args.quick, "parts": list(settings.parts), "subjects": list(settings.subjects), "seeds": list(settings.seeds), "photos": settings.photos, "preset": settings.preset, "auto_captions": settings.auto_captions,
                  "overrides": settings.overrides, "fidelity": settings.fidelity.__dict__, "config": resolve_config(base, settings.preset, **settings.overrides).to_record()},
        environment={"base": args.base, "base_fingerprint": base.fingerprint, "stand_in": base.defaults.stand_in, "device": str(base.device),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "total_seconds": time.perf_counter() - started},
    )
    print(report(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

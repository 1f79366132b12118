"""DreamBooth's qualitative findings, reproduced on the built-in world (the README's benchmark table).

    python scripts/bench_dreambooth.py                              # full run on the built-in base (~25 min on 2 CPU cores)
    python scripts/bench_dreambooth.py --quick --out /tmp/db.json   # smoke run: a minute, numbers meaningless

Ruiz et al. (2023) report, on DreamBench with Stable Diffusion: DreamBooth beats Textual Inversion
on subject fidelity (DINO 0.668 vs 0.569, CLIP-I 0.803 vs 0.780) and prompt fidelity (CLIP-T 0.305
vs 0.255); prior preservation keeps the class from collapsing onto the subject (lower PRES); and
training longer fits the subject better while following prompts worse. This
script runs the same comparisons on held-out world subjects, every number from the benchmark of
:mod:`gen.benchmark` judged by the world's evaluator:

1. **Methods**, on each subject: DreamBooth-LoRA (rare-token trigger ``sks``, UNet LoRA) with and
   without prior preservation, and textual inversion (a new token embedding only). The trainer
   always attaches a LoRA, so textual inversion runs with the LoRA's learning rate at 1e-10: its
   ``B`` starts at zero and stays there (the table's "LoRA norm" column shows it, ~1e-7 of the weights).
2. **Overtraining curve**: DreamBooth-LoRA benchmarked at increasing step counts (one run,
   resumed from checkpoint to checkpoint); subject fidelity, prompt fidelity and prior drift per
   step, plotted to a PNG.

Prints a table (and, with ``--markdown``, the README's), writes JSON and the plot, and says for
each finding whether it reproduced.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.evaluation import AdapterEvaluation, evaluate_config  # noqa: E402
from demo.cli_train import ProgressBars  # noqa: E402
from gen.base import load_base  # noqa: E402
from gen.benchmark import BenchmarkSettings  # noqa: E402
from gen.lora_targets import UNET_TARGETS  # noqa: E402
from gen.report import line_chart, write_json  # noqa: E402

DREAMBENCH_PAPER = {  # Ruiz et al. 2023, DreamBench on Stable Diffusion
    "dreambooth": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
    "textual_inversion": {"DINO": 0.569, "CLIP-I": 0.780, "CLIP-T": 0.255},
    "real_images": {"DINO": 0.774, "CLIP-I": 0.885},
}
# The paper's recipe: class rows regress on the class images' noise under the plain class prompt (our
# presets may hold the prior differently; see adapters.train.config).
PAPER_PRIOR = {"prior_preservation": True, "prior_distill": False, "class_prompt": "a {class_word}"}
# diffusers' DreamBooth-LoRA puts LoRA on every attention projection; pinned, so this stays the recipe whatever the presets do.
DREAMBOOTH_LORA = {"new_token": False, "trigger": "sks", "unet_targets": UNET_TARGETS}
METHODS: dict[str, tuple[str, dict]] = {
    "dreambooth_lora": ("DreamBooth-LoRA, prior preservation", {**DREAMBOOTH_LORA, **PAPER_PRIOR}),
    "dreambooth_lora_no_prior": ("DreamBooth-LoRA, no prior preservation", {**DREAMBOOTH_LORA, "prior_preservation": False}),
    "textual_inversion": (
        "Textual inversion (new token only)",
        {"new_token": True, "prior_preservation": False, "lr": 1e-10, "weight_decay": 0.0, "warmup_steps": 0, "rank": 1, "text_encoder_lora": False},
    ),
}
COLUMNS = (
    ("subject_fidelity", "subject fid."), ("identity_similarity", "identity sim."), ("prompt_fidelity", "prompt fid."),
    ("prior_identity_similarity", "PRES"), ("prior_drift_identity", "PRES drift"), ("prior_drift_class_accuracy", "class acc. drift"),
    ("diversity", "diversity"), ("memorization_copy_rate", "copies"), ("lora_relative_norm", "LoRA norm"), ("train_seconds", "train s"),
)


@dataclass(frozen=True)
class Settings:
    subjects: tuple[str, ...] = ("robot-0", "mug-0", "car-0")
    preset: str = "balanced"
    overrides: dict = field(default_factory=dict)  # applied to every run (quick mode shortens training)
    benchmark: BenchmarkSettings = BenchmarkSettings()
    curve_subjects: tuple[str, ...] = ("robot-0",)
    curve_steps: tuple[int, ...] = (100, 200, 400, 800, 1600)


FULL = Settings()
QUICK = Settings(
    subjects=("robot-0",),
    overrides={"steps": 3, "num_class_images": 2, "class_image_steps": 2, "batch_size": 1},
    benchmark=BenchmarkSettings(prompts=4, images_per_prompt=2, prior_images=2, steps=2),
    curve_subjects=("robot-0",),
    curve_steps=(2, 4),
)


def row(ev: AdapterEvaluation) -> dict:
    """One subject's numbers for the table."""
    metrics = dict(ev.run.metrics)
    metrics["train_seconds"] = (ev.record or {}).get("metrics", {}).get("train_seconds", float("nan"))
    metrics["lora_relative_norm"] = ev.diagnostics.summary().get("mean_relative_norm", float("nan"))
    return {"subject": ev.subject.name, **metrics}


def mean_row(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r if k != "subject"}
    return {k: statistics.fmean([r[k] for r in rows if k in r and isinstance(r[k], float) and math.isfinite(r[k])] or [float("nan")]) for k in sorted(keys)}


def run_methods(base, settings: Settings, progress=None) -> dict:
    out = {}
    for key, (label, options) in METHODS.items():
        started = time.perf_counter()
        evaluations = evaluate_config(
            base, settings.subjects, preset=settings.preset, options={**settings.overrides, **options}, settings=settings.benchmark, progress=progress,
        )
        rows = [row(ev) for ev in evaluations]
        out[key] = {"label": label, "options": options, "subjects": rows, "mean": mean_row(rows), "seconds": time.perf_counter() - started}
        print(f"{label}: done in {out[key]['seconds']:.0f} s", flush=True)
    return out


def run_curve(base, settings: Settings, progress=None) -> dict:
    options = {**settings.overrides, **METHODS["dreambooth_lora"][1]}
    options.pop("steps", None)  # the curve sets the steps
    evaluations = evaluate_config(
        base, settings.curve_subjects, preset=settings.preset, options=options, settings=settings.benchmark,
        curve_steps=settings.curve_steps, progress=progress,
    )
    per_subject = {ev.subject.name: ev.curve for ev in evaluations}
    steps = [p["step"] for p in evaluations[0].curve]
    keys = ("subject_fidelity", "prompt_fidelity", "prior_drift_identity", "memorization_copy_rate", "diversity")
    mean = [{"step": s, **{k: statistics.fmean([c[i][k] for c in per_subject.values() if k in c[i]] or [float("nan")]) for k in keys}} for i, s in enumerate(steps)]
    return {"options": options, "steps": steps, "per_subject": per_subject, "mean": mean}


def findings(methods: dict, curve: dict) -> dict:
    """Each of DreamBooth's findings and whether it reproduced here (the curve's alone without ``methods``)."""
    first, last = curve["mean"][0], curve["mean"][-1]
    overtraining = {
        "steps": [first["step"], last["step"]],
        "subject_fidelity": [first["subject_fidelity"], last["subject_fidelity"]],
        "prompt_fidelity": [first["prompt_fidelity"], last["prompt_fidelity"]],
        "reproduced": bool(last["subject_fidelity"] > first["subject_fidelity"] and last["prompt_fidelity"] < first["prompt_fidelity"]),
    }
    if not methods:
        return {"overtraining_raises_subject_lowers_prompt_fidelity": overtraining}
    db, ti = methods["dreambooth_lora"]["mean"], methods["textual_inversion"]["mean"]
    no_prior = methods["dreambooth_lora_no_prior"]["mean"]
    return {
        "lora_beats_textual_inversion_on_subject_fidelity": {
            "dreambooth_lora": db.get("subject_fidelity"), "textual_inversion": ti.get("subject_fidelity"),
            "reproduced": bool(db.get("subject_fidelity", 0) > ti.get("subject_fidelity", 0)),
        },
        "prior_preservation_lowers_class_drift": {
            "with": db.get("prior_drift_identity"), "without": no_prior.get("prior_drift_identity"),
            "reproduced": bool(db.get("prior_drift_identity", 0) < no_prior.get("prior_drift_identity", 0)),
        },
        "overtraining_raises_subject_lowers_prompt_fidelity": overtraining,
    }


def _fmt(value) -> str:
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return "–"
    return f"{value:.1e}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"


def table(methods: dict, markdown: bool = False) -> str:
    header = ["method", *[label for _, label in COLUMNS]]
    rows = [[m["label"], *[_fmt(m["mean"].get(k, float("nan"))) for k, _ in COLUMNS]] for m in methods.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def curve_table(curve: dict, markdown: bool = False) -> str:
    keys = ("subject_fidelity", "prompt_fidelity", "prior_drift_identity", "memorization_copy_rate")
    header = ["steps", *keys]
    rows = [[str(int(p["step"])), *[_fmt(p[k]) for k in keys]] for p in curve["mean"]]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def plot_curve(curve: dict, path: Path) -> Path:
    steps = [p["step"] for p in curve["mean"]]
    series = {k.replace("_", " "): (steps, [p[k] for p in curve["mean"]]) for k in ("subject_fidelity", "prompt_fidelity", "prior_drift_identity", "memorization_copy_rate")}
    fig = line_chart(series, title="DreamBooth-LoRA on the built-in world: metrics over training steps", xlabel="training steps", ylabel="value")
    fig.axes[0].set_xscale("log")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin", help="'builtin' or a diffusers folder of a base trained on the world")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 subject, a few steps, tiny benchmark")
    parser.add_argument("--subjects", nargs="+", default=None, help="sample subjects for the methods (default: robot-0 mug-0 car-0)")
    parser.add_argument("--curve-subjects", nargs="+", default=None, help="sample subjects for the overtraining curve (default: robot-0)")
    parser.add_argument("--curve-steps", default=None, help="comma-separated step counts (default: 100,200,400,800,1600)")
    parser.add_argument("--preset", default=None, help="training preset (default: balanced)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of the methods (default: the preset's)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown (for the README)")
    parser.add_argument("--curve-only", action="store_true", help="skip the methods; only the overtraining curve")
    parser.add_argument("--out", default="runs/bench_dreambooth.json")
    parser.add_argument("--plot", default=None, help="curve PNG (default: beside --out, <name>_curve.png)")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.subjects:
        settings = replace(settings, subjects=tuple(args.subjects))
    if args.curve_subjects:
        settings = replace(settings, curve_subjects=tuple(args.curve_subjects))
    if args.curve_steps:
        settings = replace(settings, curve_steps=tuple(int(s) for s in args.curve_steps.split(",")))
    if args.preset:
        settings = replace(settings, preset=args.preset)
    if args.steps:
        settings = replace(settings, overrides={**settings.overrides, "steps": args.steps})
    base = load_base(args.base)
    if base.defaults.stand_in:
        print("note: the base is an untrained stand-in; the numbers are meaningless until the trained base ships")
    started = time.perf_counter()
    bars = ProgressBars()  # class images, training, evaluation: one bar per phase
    try:
        methods = {} if args.curve_only else run_methods(base, settings, bars)
        curve = run_curve(base, settings, bars)
    finally:
        bars.close()
    results = {
        "methods": methods,
        "curve": curve,
        "findings": findings(methods, curve),
        "dreambench_paper": DREAMBENCH_PAPER,
        "settings": {"quick": args.quick, **{k: v for k, v in asdict(settings).items()}},
        "environment": {
            "base": args.base, "base_fingerprint": base.fingerprint, "stand_in": base.defaults.stand_in, "device": str(base.device),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "total_seconds": time.perf_counter() - started,
        },
    }
    out = Path(args.out)
    plot = plot_curve(curve, Path(args.plot) if args.plot else out.with_name(out.stem + "_curve.png"))
    results["plot"] = str(plot)
    if methods:
        print("\nMethods (mean over subjects: " + ", ".join(settings.subjects) + ")")
        print(table(methods))
    print("\nOvertraining curve (DreamBooth-LoRA, mean over " + ", ".join(settings.curve_subjects) + ")")
    print(curve_table(curve))
    print()
    for name, finding in results["findings"].items():
        print(f"{'reproduced' if finding['reproduced'] else 'NOT reproduced'}: {name.replace('_', ' ')}")
    if args.markdown:
        print("\n" + (table(methods, markdown=True) + "\n\n" if methods else "") + curve_table(curve, markdown=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"\nwrote {out} and {plot}")
    return results


if __name__ == "__main__":
    main()

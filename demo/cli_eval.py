"""``bespoke eval``: the personalization benchmark for one registered adapter, or for a training configuration.

    bespoke eval --user alice --concept robo --subject robot-3 --out outputs/eval/robo
    bespoke eval --user alice --concept robo --version prod --references photos/ --compose mia --compose-subject mug-0
    bespoke eval --train --subjects robot-0 mug-0 --preset quick --curve-steps 100,200,300 --out outputs/eval/quick

Each writes ``report.html`` (sample grids, tables, plots), ``report.json`` and PNGs into ``--out``.
A thin layer over :mod:`adapters.evaluation`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Each mode's own flags: given to the other mode they would be parsed and silently ignored
# (``--train --subject robot-3`` once trained robot-0 without a word), so they are refused.
ADAPTER_FLAGS = ("user", "concept", "version", "class_word", "subject", "references", "compose", "compose_version", "compose_subject", "compose_references")
TRAIN_FLAGS = ("subjects", "preset", "curve_steps")
CURVE_OWNS = ("steps", "checkpoint_every", "output_dir", "resume")  # --curve-steps sets these for every stage


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step counts") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError("curve steps must be positive integers, e.g. 100,200,400")
    return steps


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from adapters.train.config import PRESET_NAMES, add_config_arguments
    from demo.cli import _add_base_args, seed_arg

    what = parser.add_argument_group("what to evaluate: a registered adapter (--user, --concept) or a training configuration (--train)")
    what.add_argument("--user", default=None, help="the adapter's owner")
    what.add_argument("--concept", default=None, help="the adapter's concept name")
    what.add_argument("--version", default="latest", help="version number or alias (default: latest)")
    what.add_argument("--class-word", default=None, help="the subject's class (default: the adapter's own)")
    what.add_argument("--subject", default=None, help="judge against this sample subject's photos (e.g. robot-3)")
    what.add_argument("--references", nargs="+", default=None, metavar="DIR_OR_FILE", help="judge against these photos (ideally the training photos)")
    what.add_argument("--compose", default=None, metavar="CONCEPT", help="also score composition with this concept of the same user")
    what.add_argument("--compose-version", default="latest")
    what.add_argument("--compose-subject", default=None, help="sample subject the composed concept was trained on")
    what.add_argument("--compose-references", nargs="+", default=None, metavar="DIR_OR_FILE", help="photos of the composed concept")
    what.add_argument("--train", action="store_true", help="train and evaluate a configuration (preset + training options) on sample subjects")
    what.add_argument("--subjects", nargs="+", default=["robot-0"], help="sample subjects for --train (default: robot-0)")
    what.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="training preset for --train (default: quick)")
    what.add_argument("--curve-steps", type=_steps_list, default=None, metavar="S1,S2,...", help="with --train: benchmark at these step counts (one run, resumed; the largest is the run's length, so not with --steps)")

    bench = parser.add_argument_group("benchmark size")
    bench.add_argument("--prompts", type=int, default=8, help="benchmark prompts, cycling through DreamBench's kinds (default: 8)")
    bench.add_argument("--images-per-prompt", type=int, default=2, help="(default: 2; diversity needs 2 or more)")
    bench.add_argument("--prior-images", type=int, default=8, help="plain class images, with and without the adapter (default: 8)")
    bench.add_argument("--sample-steps", type=int, default=None, help="denoising steps (default: the base's)")
    bench.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the base's)")
    bench.add_argument("--eval-seed", type=seed_arg, default=0, help="sampling seed (default: 0)")
    bench.add_argument("--composition-prompts", type=int, default=4)
    bench.add_argument("--clip", default=None, metavar="DIR", help="a local CLIP model folder: CLIP-I and CLIP-T instead of the world's evaluator")
    bench.add_argument("--dino", default=None, metavar="DIR", help="a local DINO/ViT model folder for subject fidelity")

    _add_base_args(parser)
    parser.add_argument("--registry", default=None, help="registry folder (default: $BESPOKE_REGISTRY, else <cache dir>/registry; --train: a temporary one)")
    parser.add_argument("--out", default=None, help="report folder (default: outputs/eval/<user>-<concept>-v<version>, or outputs/eval/train-<preset>)")
    add_config_arguments(parser)


def _defaults() -> dict[str, Any]:
    """Every ``eval`` flag's default, to tell what the user set from what argparse filled in."""
    parser = argparse.ArgumentParser(add_help=False)
    add_eval_arguments(parser)
    return vars(parser.parse_args([]))


def _flags(dests: list[str]) -> str:
    return ", ".join("--" + d.replace("_", "-") for d in dests)


def _are(dests: list[str]) -> str:
    return "is" if len(dests) == 1 else "are"


def check_mode(args: argparse.Namespace) -> None:
    """Refuse, in one line, any flag the chosen mode would ignore (see ADAPTER_FLAGS), before anything loads."""
    from adapters.train.config import overrides_from_args
    from gen.errors import InvalidRequest

    defaults = _defaults()
    changed = lambda dests: [d for d in dests if getattr(args, d) != defaults[d]]  # noqa: E731
    training = overrides_from_args(args)
    if args.train:
        stray = changed(ADAPTER_FLAGS)
        if stray:
            hint = "; pick sample subjects with --subjects" if "subject" in stray else ""
            raise InvalidRequest(f"{_flags(stray)} {_are(stray)} for evaluating a registered adapter, not for --train{hint}")
        clash = [d for d in CURVE_OWNS if d in training]
        if args.curve_steps and clash:
            raise InvalidRequest(f"--curve-steps sets {_flags(clash)} (each stage trains to its count, resuming): drop {_flags(clash)}")
    else:
        stray = changed(TRAIN_FLAGS) + list(training)
        if stray:
            raise InvalidRequest(f"{_flags(stray)} {_are(stray)} for --train (a training configuration), not for evaluating a registered adapter")


def _subject(name: str | None, files: list[str] | None, resolution: int, flag: str):
    from adapters.evaluation import Subject
    from gen.errors import InvalidRequest

    if (name is None) == (files is None):
        raise InvalidRequest(f"give the photos to judge against: exactly one of --{flag}subject or --{flag}references")
    return Subject.sample(name) if name is not None else Subject.from_files(files, resolution)


def cmd_eval(args: argparse.Namespace) -> int:
    from adapters.evaluation import evaluate_adapter, evaluate_config, write_config_report, write_report
    from adapters.registry import Registry
    from adapters.train.config import overrides_from_args
    from demo.cli import output_folder
    from demo.cli_train import ProgressBars
    from gen.base import load_base
    from gen.benchmark import BenchmarkSettings
    from gen.embedders import load_judge
    from gen.errors import InvalidRequest

    check_mode(args)
    settings = BenchmarkSettings(
        prompts=args.prompts, images_per_prompt=args.images_per_prompt, prior_images=args.prior_images,
        steps=args.sample_steps, guidance_scale=args.guidance, seed=args.eval_seed,
    )
    for name in ("prompts", "images_per_prompt", "prior_images"):
        if getattr(args, name) < 1:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be at least 1")
    default_out = f"outputs/eval/train-{args.preset}" if args.train else None
    if args.out or default_out:
        output_folder(args.out or default_out)  # before the evaluation: a bad --out once failed with a traceback after it
    base = load_base(args.base, device=args.device, dtype=args.dtype, allow_network=args.allow_network)
    bars = ProgressBars()
    try:
        if args.train:
            judge = load_judge(base, args.class_word or "", clip=args.clip, dino=args.dino) if (args.clip or args.dino) else None
            registry = Registry(args.registry) if args.registry else None
            try:
                evaluations = evaluate_config(
                    base, args.subjects, preset=args.preset, options=overrides_from_args(args), settings=settings, registry=registry,
                    curve_steps=args.curve_steps, judge=judge, progress=bars,
                )
            finally:
                if registry is not None:
                    registry.close()
            bars.close()
            out = Path(args.out or f"outputs/eval/train-{args.preset}")
            path = write_config_report(evaluations, out, f"Training configuration: preset {args.preset} on {', '.join(args.subjects)}")
            for ev in evaluations:
                _print_metrics(ev.subject.name, ev.run.metrics)
        else:
            if not (args.user and args.concept):
                raise InvalidRequest("give --user and --concept of a registered adapter, or --train to evaluate a training configuration")
            with Registry(args.registry) as registry:
                handle = registry.for_user(args.user)
                record = handle.record(args.concept, args.version)
                out = output_folder(args.out or f"outputs/eval/{args.user}-{args.concept}-v{record.version}")  # before the evaluation
                adapter = handle.get(args.concept, record.version)
                subject = _subject(args.subject, args.references, base.default_size, "")
                partner = None
                if args.compose:
                    other = handle.get(args.compose, args.compose_version)
                    partner = (other, _subject(args.compose_subject, args.compose_references, base.default_size, "compose-"))
            class_word = args.class_word or adapter.class_word
            judge = load_judge(base, class_word or "", clip=args.clip, dino=args.dino)
            evaluation = evaluate_adapter(
                base, adapter, subject, class_word=class_word, judge=judge, settings=settings, partner=partner,
                composition_prompts=args.composition_prompts, record=record.to_dict(), progress=bars,
            )
            bars.close()
            path = write_report(evaluation, out)
            _print_metrics(evaluation.label, evaluation.run.metrics)
            for warning in evaluation.diagnostics.warnings + (evaluation.composition.overlap.warnings if evaluation.composition else []):
                print(f"warning: {warning}")
    finally:
        bars.close()
    print(path)
    return 0


def _print_metrics(label: str, m: dict[str, float]) -> None:
    parts = [f"subject fidelity {m['subject_fidelity']:.2f}x real-vs-real"]
    if "prompt_fidelity" in m:
        parts.append(f"prompt fidelity {m['prompt_fidelity']:.2f}")
    if "diversity" in m:
        parts.append(f"diversity {m['diversity']:.3f}")
    parts.append(f"prior drift {m['prior_drift_identity']:+.3f}")
    parts.append(f"copies {m['memorization_copy_rate']:.0%}")
    print(f"{label}: " + ", ".join(parts))


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "eval", help="benchmark an adapter (or a training configuration) and write an HTML report with plots",
        description="DreamBench-style benchmark (recontextualization, accessorization, property change): subject fidelity, prompt "
        "fidelity, diversity, prior drift, memorization, weight diagnostics and composition; writes report.html + report.json.",
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)

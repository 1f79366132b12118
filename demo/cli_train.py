"""``bespoke train`` and ``bespoke sample-subject``: personalization from the command line.

The flags are defined once, in :func:`add_train_arguments` (the training options themselves come
from :class:`adapters.train.TrainConfig`), and shared with ``accelerate launch
scripts/train_lora.py``, which runs the same :func:`run_train` in every process.

    bespoke sample-subject robot-3 --out photos/robot-3
    bespoke train --user alice --concept robo --class-word robot --images photos/robot-3 --preset quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from adapters.train.config import PRESET_NAMES, add_config_arguments, overrides_from_args


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``bespoke train`` (and of ``scripts/train_lora.py``)."""
    from demo.cli import _add_base_args

    parser.add_argument("--user", required=True, help="whose adapter this is")
    parser.add_argument("--concept", required=True, help="concept name, used in prompts as <concept>")
    parser.add_argument("--class-word", required=True, help="what the subject is, e.g. dog, mug, robot")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE", help="photos (JPEG, PNG, WebP) or folders of them")
    parser.add_argument("--captions", default=None, metavar="JSON", help="JSON file mapping image file names to captions containing {trigger}")
    _add_base_args(parser)
    parser.add_argument("--registry", default=None, help="registry folder (default: $BESPOKE_REGISTRY, else <cache dir>/registry)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="balanced", help="quick, balanced or best (default: balanced)")
    parser.add_argument(
        "--evaluate", action=argparse.BooleanOptionalAction, default=None,
        help="measure subject and prompt fidelity with the world's evaluator (default: when it applies to the base and class word)",
    )
    parser.add_argument(
        "--auto-captions", action=argparse.BooleanOptionalAction, default=None,
        help="caption each photo with what the world's evaluator reads in it (default: when it applies and no --captions)",
    )
    parser.add_argument("--samples-out", default=None, metavar="DIR", help="where validation grids go (with --validation-every; default: outputs/train/<user>-<concept>)")
    add_config_arguments(parser)


def build_train_parser(prog: str = "train_lora.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a user's LoRA adapter (DreamBooth-LoRA) and put it in the registry.")
    add_train_arguments(parser)
    return parser


class ProgressBars:
    """One tqdm bar per phase (class images, train, evaluate), fed by the trainer's progress callback."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def __call__(self, step: int, total: int, info: dict) -> None:
        phase = info.get("phase", "working")
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="step" if phase == "train" else "item", leave=phase == "train")
        self.bar.total = total
        self.bar.update(step - self.bar.n)
        if "loss" in info:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _read_captions(path: str | None) -> dict[str, str] | None:
    from gen.errors import InvalidRequest

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"cannot read captions from {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InvalidRequest(f"{path} must hold a JSON object mapping image file names to captions")
    return data


def process_state(device: str | None):
    """This process's place among ``accelerate launch``'s processes (gloo among CPU processes).

    Without a GPU, ``accelerate launch --multi_gpu --num_processes N`` starts N processes with
    torchrun; they must ask for the CPU explicitly to join as a gloo group (``--cpu`` alone starts one).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = (device or "").startswith("cpu") or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def check_request(base, user: str, concept: str, preset: str, options: dict) -> None:
    """Refuse bad names and options now: the fidelity hook and captions sample the base for a minute before
    :func:`~adapters.train.personalize` would check them. Its own check warns, so this one stays quiet."""
    import warnings

    from adapters.registry.names import validate_name
    from adapters.train.config import resolve_config

    validate_name("user", user)
    validate_name("concept", concept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolve_config(base, preset, **options)


def run_train(args: argparse.Namespace):
    """Load the base, train, register; returns the registry record (in every process)."""
    from adapters.data import load_images
    from adapters.fidelity import world_captions, world_fidelity_hook
    from adapters.registry import Registry
    from adapters.train import personalize
    from gen.base import load_base
    from gen.errors import InvalidRequest
    from gen.evaluate import world_evaluator_applies
    from gen.grid import make_grid

    state = process_state(args.device)
    base = load_base(args.base, device=args.device or state.device, dtype=args.dtype, allow_network=args.allow_network)
    check_request(base, args.user, args.concept, args.preset, overrides_from_args(args))
    captions = _read_captions(args.captions)
    world_applies = world_evaluator_applies(base, args.class_word)
    for flag in ("evaluate", "auto_captions"):
        if getattr(args, flag) and not world_applies:
            raise InvalidRequest(f"the world's evaluator cannot read this base's images of {args.class_word!r}; drop --{flag.replace('_', '-')}")
    photos = [im.image for im in load_images(args.images)] if world_applies else []
    if captions is None and world_applies and args.auto_captions is not False:
        captions = world_captions(photos, args.class_word)  # deterministic, so every process gets the same
    evaluate = None
    if world_applies and args.evaluate is not False and state.is_main_process:
        evaluate = world_fidelity_hook(base, args.class_word, photos)

    samples_out = Path(args.samples_out or f"outputs/train/{args.user}-{args.concept}")

    def save_validation(v) -> None:
        samples_out.mkdir(parents=True, exist_ok=True)
        make_grid([v.images], row_labels=[v.prompt], title=f"{v.user}/{v.concept} step {v.step}").save(samples_out / f"step_{v.step:06d}.png")

    bars = ProgressBars() if state.is_main_process else None
    # Only the main process writes records (the others receive them), so only it opens the index. With every
    # process holding a connection, the main one's write once waited out the lock timeout in CI (RegistryBusy;
    # the holder was not pinned down); with one connection there is nothing to wait for.
    registry = Registry(args.registry) if state.is_main_process else None
    try:
        record = personalize(
            base, args.user, args.concept, args.images, args.class_word, captions=captions, registry=registry,
            progress=bars, evaluate=evaluate, on_validation=save_validation, preset=args.preset, **overrides_from_args(args),
        )
    finally:
        if registry is not None:
            registry.close()
        if bars is not None:
            bars.close()
    if state.is_main_process:
        print_summary(record)
    return record


def print_summary(record) -> None:
    """What a user reads after training (the quickstart prints it too): version, steps, time, fidelity, usage."""
    m = record.metrics
    print(
        f"trained {record.user}/{record.concept} v{record.version}: rank {record.rank}, {m.get('steps', 0):.0f} steps "
        f"in {m.get('train_seconds', 0):.0f}s, final loss {m.get('final_loss', float('nan')):.4f}; trigger {record.trigger!r}"
    )
    if "subject_fidelity" in m:
        print(
            f"fidelity: subject {m['subject_fidelity']:.2f}x real-vs-real"
            + (f" (the base's autoencoder allows about {m['autoencoder_ceiling']:.2f})" if "autoencoder_ceiling" in m else "")
            + f", prompt {m['prompt_fidelity']:.0%}, "
            f"prior drift: class accuracy {m['prior_drift_class_accuracy']:+.2f}, identity {m['prior_drift_identity']:+.3f}"
        )
    print(f"use it in a prompt as <{record.concept}> (user {record.user})")


def cmd_train(args: argparse.Namespace) -> int:
    run_train(args)
    return 0


MAX_SAMPLE_PHOTOS = 100  # far more photos than personalization takes (4 to 20)


def cmd_sample_subject(args: argparse.Namespace) -> int:
    from adapters.samples import save_sample_subject
    from demo.cli import output_folder
    from gen.errors import InvalidRequest

    if not 1 <= args.num_images <= MAX_SAMPLE_PHOTOS:  # 0 wrote nothing and succeeded; 100000 ran for minutes without a word
        raise InvalidRequest(f"-n/--num-images must be between 1 and {MAX_SAMPLE_PHOTOS}, got {args.num_images}")
    output_folder(args.out)
    try:
        paths = save_sample_subject(args.subject, args.out, n=args.num_images, seed=args.seed)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    for path in paths:
        print(path)
    return 0


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``sample-subject`` to the main CLI's subparsers."""
    from demo.cli import seed_arg

    train = subparsers.add_parser(
        "train", help="train a user's LoRA adapter from their photos and register it",
        description="Train a user's LoRA adapter (DreamBooth-LoRA) from a few photos and put it in the registry.",
    )
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    sample = subparsers.add_parser("sample-subject", help="write photos of a held-out world subject (e.g. robot-3) to try training")
    sample.add_argument("subject", help="a held-out subject: <class>-<0..9>, e.g. robot-3, mug-0, cat-7")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("-n", "--num-images", type=int, default=4)
    sample.add_argument("--seed", type=seed_arg, default=0)
    sample.set_defaults(func=cmd_sample_subject)

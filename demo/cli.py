"""The ``bespoke`` command line: a thin layer over the Python API.

User errors (:class:`gen.errors.BespokeError`) print one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from gen.seeds import SEED_LIMIT


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="builtin", help="'builtin', a local diffusers folder, or a hub id (default: builtin)")
    p.add_argument("--allow-network", action="store_true", help="allow downloading a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: by device)")


def seed_arg(text: str) -> int:
    """A ``--seed`` value: a whole number below :data:`gen.seeds.SEED_LIMIT`, refused by argparse (a usage error, exit 2) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and {SEED_LIMIT - 1} (2**63 - 1), got {value}")
    return value


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder this run can write into, checked before any work (a bad one once failed with a traceback after it).

    Nothing is created here: a run refused later for another reason leaves no empty folder behind.
    """
    from gen.errors import InvalidRequest

    folder = Path(path)
    probe = folder
    while not probe.exists():  # the nearest existing ancestor is where the folder would be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InvalidRequest(f"{flag} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidRequest(f"{flag} {folder}: {probe} is not writable")
    return folder


def make_output_folder(folder: Path, flag: str = "--out") -> Path:
    """Create ``folder`` (checked by :func:`output_folder`); a failure still names the flag instead of raising a traceback."""
    from gen.errors import InvalidRequest

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequest(f"cannot create {flag} folder {folder}: {e.strerror or e}") from None
    return folder


def cmd_generate(args: argparse.Namespace) -> int:
    from gen import Sampler, load_base, save_png

    out = output_folder(args.out)
    base = load_base(args.base, device=args.device, dtype=args.dtype, allow_network=args.allow_network)
    sampler = Sampler(base)
    with tqdm(total=args.steps or base.defaults.steps, desc="denoising", unit="step", leave=False) as bar:
        result = sampler.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            height=args.height,
            width=args.width,
            progress=lambda i, total: bar.update(i - bar.n),
        )
    make_output_folder(out)
    records = []
    for image, prov in zip(result.images, result.provenance):
        path = out / f"{prov.seed:010d}.png"
        if path.exists():
            warnings.warn(f"replaced {path} (same seed in the same --out)", stacklevel=1)
        save_png(image, prov, path)
        records.append({"file": path.name, **prov.to_dict()})
        print(path)
    _write_sidecar(out / "provenance.json", records)
    return 0


def _write_sidecar(path: Path, records: list[dict]) -> None:
    """Add ``records`` to the folder's ``provenance.json``, atomically.

    Earlier runs' entries for other files stay (rewriting the file with this run's alone left the
    PNGs of earlier runs into the same ``--out``, the default ``outputs`` among them, undescribed).
    """
    new = {r["file"] for r in records}
    kept: list[dict] = []
    try:
        old = json.loads(path.read_text())
        if isinstance(old, list):
            kept = [r for r in old if isinstance(r, dict) and r.get("file") not in new]
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        warnings.warn(f"{path} could not be read as a list of records; it now holds this run's alone", stacklevel=1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(kept + records, indent=2))
    os.replace(tmp, path)


QUICKSTART_CONTEXTS = (
    "a photo of {} on a blue background",
    "{} wearing a hat on green grass",
    "{} on the left, purple water background",
    "a red {}, white background",
)


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The README's main job: personalize a sample subject from 4 photos, then save a before/after grid.

    Before = the base prompted with the class word; after = the same prompt and seed with the
    subject's ``<concept>`` mention, so every difference in a row is the adapter's doing.
    """
    from adapters.samples import sample_subject_images, subject_instance
    from gen.errors import InvalidRequest

    out = output_folder(args.out)  # before minutes of training, not after
    try:
        instance = subject_instance(args.subject)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    # the heavy imports (torch, diffusers: seconds) only once the subject is known to exist
    from adapters.fidelity import world_captions, world_fidelity_hook
    from adapters.registry import Registry
    from adapters.train import personalize
    from demo.cli_train import ProgressBars, check_request, print_summary
    from gen import Sampler, load_base
    from gen.grid import make_grid

    base = load_base(args.base, device=args.device, dtype=args.dtype, allow_network=args.allow_network)
    concept = args.subject.replace("-", "_")
    options = {"steps": args.train_steps} if args.train_steps is not None else {}  # 0 is refused, not the preset's
    check_request(base, args.user, concept, args.preset, options)
    photos = sample_subject_images(instance, n=4, seed=args.seed)
    evaluate = world_fidelity_hook(base, instance.cls, photos, instance=instance)
    # as `bespoke train` does on a world base: per-photo captions (background, position, size) keep the
    # photos' contexts out of the concept (measured on robot-3: subject fidelity 0.22x bare, 0.73x captioned)
    captions = world_captions(photos, instance.cls) if evaluate is not None else None
    bars = ProgressBars()
    try:
        with Registry(args.registry) as registry:
            record = personalize(
                base, args.user, concept, photos, instance.cls, captions=captions, registry=registry, progress=bars, evaluate=evaluate,
                preset=args.preset, **options,
            )
            print_summary(record)
            sampler = Sampler(base, adapters=registry)
            rows, labels = [photos], ["training photos"]
            for context in tqdm(QUICKSTART_CONTEXTS, desc="before/after", unit="prompt"):
                before = sampler.generate(context.format(f"a {instance.cls}"), num_images=2, seed=args.seed).images
                prompt = context.format(f"<{concept}>")
                after = sampler.generate(prompt, num_images=2, seed=args.seed, user=args.user).images
                rows.append([*before, *after])
                labels.append(prompt)
    finally:
        bars.close()
    make_output_folder(out)
    seeds = [f"seed {args.seed + i}" for i in range(2)]
    grid = make_grid(
        rows, row_labels=labels, col_labels=[f"before: base, {s}" for s in seeds] + [f"after: <{concept}>, {s}" for s in seeds],
        title=f"{args.user}/{concept} v{record.version} on {base.source} ({base.fingerprint})",
    )
    path = out / "before_after.png"
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)  # an interrupted save leaves the previous grid, not half of a new one
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bespoke",
        description="Personalized text-to-image generation with per-user LoRA adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands listed below")

    gen = sub.add_parser("generate", help="generate images from a prompt; each PNG carries its provenance")
    _add_base_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("-n", "--num-images", type=int, default=1)
    gen.add_argument("--seed", type=seed_arg, default=None, help="image i uses seed+i (default: random)")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--scheduler", default=None, help="ddim, euler, euler_a, dpm++, unipc")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    gen.set_defaults(func=cmd_generate)

    from adapters.train.config import PRESET_NAMES

    quick = sub.add_parser("quickstart", help="personalize a sample subject from 4 photos and save a before/after grid")
    _add_base_args(quick)
    quick.add_argument("--subject", default="robot-3", help="a held-out world subject: <class>-<0..9> (default: robot-3)")
    quick.add_argument("--user", default="quickstart", help="whose registry entry the adapter becomes (default: quickstart)")
    quick.add_argument("--registry", default=None, help="registry folder (default: $BESPOKE_REGISTRY, else <cache dir>/registry)")
    quick.add_argument("--preset", choices=PRESET_NAMES, default="balanced", help="quick, balanced or best (default: balanced)")
    quick.add_argument("--train-steps", type=int, default=None, help="training steps (default: the preset's)")
    quick.add_argument("--seed", type=seed_arg, default=0)
    quick.add_argument("--out", default="outputs/quickstart")
    quick.set_defaults(func=cmd_quickstart)

    from demo.cli_registry import add_registry_commands
    from demo.cli_train import add_train_commands

    add_train_commands(sub)
    from demo.cli_eval import add_eval_commands
    add_eval_commands(sub)
    from demo.cli_demo import add_demo_commands
    add_demo_commands(sub)
    add_registry_commands(sub)

    # argparse sizes its help columns before subcommands exist and wraps badly; list them ourselves.
    width = max(len(a.dest) for a in sub._choices_actions) + 2
    parser.epilog = "commands:\n" + "\n".join(f"  {a.dest:<{width}}{a.help}" for a in sub._choices_actions)
    sub._choices_actions.clear()
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported
    from gen.errors import BespokeError

    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except BespokeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback from deep in torch
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

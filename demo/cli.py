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


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="builtin", help="'builtin', a local diffusers folder, or a hub id (default: builtin)")
    p.add_argument("--allow-network", action="store_true", help="allow downloading a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: by device)")


def cmd_generate(args: argparse.Namespace) -> int:
    from gen import Sampler, load_base, save_png

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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image, prov in zip(result.images, result.provenance):
        path = save_png(image, prov, out / f"{prov.seed:010d}.png")
        records.append({"file": path.name, **prov.to_dict()})
        print(path)
    (out / "provenance.json").write_text(json.dumps(records, indent=2))
    return 0


QUICKSTART_PROMPTS = (
    "a photo of a red mug on green grass",
    "a blue toy car on the left, white background",
    "two yellow birds under a blue sky",
    "a small house on the right, purple water background",
)


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The README's main job: sample the built-in base for a few prompts and save a labelled grid."""
    from gen import Sampler, load_base
    from gen.grid import make_grid

    base = load_base(args.base, device=args.device, dtype=args.dtype, allow_network=args.allow_network)
    if base.defaults.stand_in:
        print("note: this base is an untrained stand-in (random weights); its images are noise until the trained built-in model ships")
    sampler = Sampler(base)
    rows = []
    for prompt in tqdm(QUICKSTART_PROMPTS, desc="prompts", unit="prompt"):
        rows.append(sampler.generate(prompt, num_images=4, seed=args.seed).images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(rows, row_labels=QUICKSTART_PROMPTS, col_labels=[f"seed {args.seed + i}" for i in range(4)], title=f"base: {base.source} ({base.fingerprint})")
    path = out / "quickstart_grid.png"
    grid.save(path)
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
    gen.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--scheduler", default=None, help="ddim, euler, euler_a, dpm++, unipc")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    gen.set_defaults(func=cmd_generate)

    quick = sub.add_parser("quickstart", help="sample the built-in base for a few prompts and save a labelled grid")
    _add_base_args(quick)
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--out", default="outputs/quickstart")
    quick.set_defaults(func=cmd_quickstart)

    from demo.cli_registry import add_registry_commands
    from demo.cli_train import add_train_commands

    add_train_commands(sub)
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


if __name__ == "__main__":
    sys.exit(main())

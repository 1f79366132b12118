"""Measure the built-in base against its quality bars, with the evaluator, and write JSON + a grid.

    python scripts/eval_base.py --base builtin --n 200 --out runs/eval_base

Prompts come from (class, background colour, position) combinations held out of pretraining,
so the numbers measure composition, not memory. For each prompt one image is generated and the
evaluator reads back class, background, position (when the prompt states one) and count; the
chance level of each is printed beside it. Diversity: two seeds of the same plain class prompt
should give different instances, so their identity similarity is compared with the similarity
of two real renders of one instance (same-instance level) and of two different instances.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gen import Sampler, load_base, world  # noqa: E402
from gen.evaluator import DEFAULT_DIR, identity_embeddings, load_evaluator, read_attributes  # noqa: E402
from gen.grid import make_grid  # noqa: E402

BARS = {"class": 0.90, "background": 0.90, "position": 0.80, "count": 0.85}
CHANCE = {"class": 1 / len(world.CLASSES), "background": 1 / len(world.COLOURS), "position": 1 / len(world.POSITIONS), "count": 1 / len(world.COUNTS)}


def prompt_fidelity(sampler: Sampler, evaluator, n: int, seed: int, **gen_kwargs) -> tuple[dict, list]:
    """Generate one image per held-out-combination prompt; fraction of stated attributes read back."""
    rng = np.random.default_rng([seed, 31])
    hits = {k: [] for k in [*BARS, "scene", "accessory", "size", "object_colour"]}
    examples = []
    for i in tqdm(range(n), desc="prompts", unit="prompt"):
        spec = world.sample_spec(rng, instances="pretrain", combos="held_out")
        prompt = world.caption(spec, rng)
        stated = world.parse_caption(prompt)
        image = sampler.generate(prompt, seed=seed + i, **gen_kwargs).images[0]
        read = read_attributes(evaluator, [image])[0]
        truth = world.spec_attributes(spec)
        for name in hits:
            key = "colour" if name == "object_colour" else name
            if key in stated and stated[key] is None:
                continue  # the prompt does not say it, so nothing to check
            hits[name].append(read[name] == truth[name])
        if len(examples) < 12:
            examples.append((prompt, image))
    return {k: float(np.mean(v)) for k, v in hits.items() if v}, examples


def diversity(sampler: Sampler, evaluator, seed: int, per_class: int, **gen_kwargs) -> dict:
    """Identity similarity of two seeds of one class prompt vs same- and different-instance real pairs."""
    generated = []
    for cls in world.CLASSES:
        images = sampler.generate(world.class_prompt(cls), num_images=2 * per_class, seed=seed, **gen_kwargs).images
        emb = identity_embeddings(evaluator, images)
        generated += [float(emb[2 * k] @ emb[2 * k + 1]) for k in range(per_class)]
    rng = np.random.default_rng([seed, 77])
    same, different = [], []
    for inst in world.HELD_OUT_INSTANCES:
        specs = [world.sample_spec(rng, instances=[inst], colour_override_prob=0.0) for _ in range(2)]
        other = world.sample_spec(rng, instances=[i for i in world.HELD_OUT_INSTANCES if i.cls == inst.cls and i != inst], colour_override_prob=0.0)
        emb = identity_embeddings(evaluator, world.render_batch([*specs, other], rng.integers(0, 2**62, 3)))
        same.append(float(emb[0] @ emb[1]))
        different.append(float(emb[0] @ emb[2]))
    return {
        "two_seeds_same_class_prompt": float(np.mean(generated)),
        "real_same_instance": float(np.mean(same)),
        "real_different_instance_same_class": float(np.mean(different)),
    }


def evaluator_metrics(folder: Path = DEFAULT_DIR) -> dict:
    """The accuracy table ``scripts/train_evaluator.py`` stored with the evaluator (its ``metrics``), to print beside the results."""
    return json.loads((folder / "config.json").read_text()).get("metrics", {})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin", help="'builtin' or a diffusers pipeline folder")
    parser.add_argument("--n", type=int, default=200, help="held-out-combination prompts, one image each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=8, help="seed pairs per class for diversity")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the base's own)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the base's own)")
    parser.add_argument("--out", default="runs/eval_base", help="folder for eval_base.json and eval_base_examples.png")
    args = parser.parse_args(argv)
    # Refused before loading anything: with none, the run ends in a raw error after all the sampling.
    for flag, value in (("--n", args.n), ("--per-class", args.per_class), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, not {args.seed}")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_base(args.base)
    sampler = Sampler(base)
    evaluator = load_evaluator()
    evaluator_accuracy = evaluator_metrics()
    gen_kwargs = {"steps": args.steps, "guidance_scale": args.guidance}
    t0 = time.time()
    fidelity, examples = prompt_fidelity(sampler, evaluator, args.n, args.seed, **gen_kwargs)
    div = diversity(sampler, evaluator, args.seed + 10_000, args.per_class, **gen_kwargs)
    elapsed = time.time() - t0

    print(f"\nbase {base.source} ({base.fingerprint}), {args.n} held-out-combination prompts, {elapsed:.0f}s")
    print(f"{'attribute':<14}{'read back':>10}{'bar':>8}{'chance':>8}  pass")
    for name, acc in fidelity.items():
        bar, chance = BARS.get(name), CHANCE.get(name)
        verdict = "" if bar is None else ("yes" if acc >= bar else "NO")
        print(f"{name:<14}{acc:>10.3f}{(f'{bar:.2f}' if bar else '-'):>8}{(f'{chance:.3f}' if chance else '-'):>8}  {verdict}")
    print("\nidentity similarity (evaluator cosine):")
    for k, v in div.items():
        print(f"  {k:<36}{v:.3f}")
    result = {
        "base": base.source,
        "fingerprint": base.fingerprint,
        "n_prompts": args.n,
        "prompt_fidelity": fidelity,
        "bars": BARS,
        "chance": CHANCE,
        "diversity": div,
        "evaluator_accuracy": evaluator_accuracy,
        "seconds": elapsed,
    }
    (out / "eval_base.json").write_text(json.dumps(result, indent=2))
    grid = make_grid([[im] for _, im in examples], row_labels=[p for p, _ in examples], cell=96, title="held-out combinations")
    grid.save(out / "eval_base_examples.png")
    print(f"\nwrote {out / 'eval_base.json'} and {out / 'eval_base_examples.png'}")


if __name__ == "__main__":
    main()

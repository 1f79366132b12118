"""Sample subjects for the built-in base: held-out instances of the world, "photographed" a few times.

A user personalizing the built-in base needs photos of one individual the base has never seen.
The world's held-out instances (``idx`` 0..9 of every class) are exactly that: pretraining and the
evaluator never saw them. Each subject has a friendly name (``"robot-3"``) and renders as a handful
of photos of it alone, on varied backgrounds and positions, without accessories or recolouring, so
that hats, bows and colour changes in prompts later test generalisation rather than memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gen import world

SAMPLE_SUBJECTS: tuple[str, ...] = tuple(f"{inst.cls}-{inst.idx}" for inst in world.HELD_OUT_INSTANCES)


def subject_instance(subject: str | world.Instance) -> world.Instance:
    """The held-out instance a friendly name (``"robot-3"``) stands for."""
    if isinstance(subject, world.Instance):
        instance = subject
    else:
        cls, _, idx = str(subject).rpartition("-")
        if not (idx.isascii() and idx.isdigit()) or cls not in world.CLASSES:  # str.isdigit takes "²", int() does not
            raise ValueError(f"unknown sample subject {subject!r}; names look like 'robot-3' (one of: {', '.join(SAMPLE_SUBJECTS[:3])}, ...)")
        instance = world.Instance(cls, int(idx))
    if not world.is_held_out(instance):
        raise ValueError(
            f"{instance.cls}-{instance.idx} is not a held-out subject (the base was pretrained on it); "
            f"held-out subjects are {instance.cls}-0 to {instance.cls}-{world.N_HELD_OUT_PER_CLASS - 1}"
        )
    return instance


def subject_specs(subject: str | world.Instance, n: int = 4, seed: int = 0) -> list[world.SceneSpec]:
    """``n`` scenes of the subject alone: distinct backgrounds (never its own colour), positions cycling."""
    instance = subject_instance(subject)
    rng = np.random.default_rng([seed, world.CLASSES.index(instance.cls), instance.idx])
    own = world.instance_traits(instance).primary
    colours = [c for c in world.COLOURS if c != own]
    order = rng.permutation(len(colours))
    offset = int(rng.integers(len(world.POSITIONS)))
    return [
        world.SceneSpec(
            instance=instance,
            background=colours[order[i % len(colours)]],
            scene=world.SCENES[int(rng.integers(len(world.SCENES)))],
            position=world.POSITIONS[(offset + i) % len(world.POSITIONS)],
            size="small" if i % 4 == 3 else "large",
            count=1,
            accessory="none",
        )
        for i in range(n)
    ]


def sample_subject_images(subject: str | world.Instance, n: int = 4, seed: int = 0) -> list[Image.Image]:
    """``n`` 64x64 photos of a held-out subject, deterministic given ``seed``."""
    specs = subject_specs(subject, n, seed)
    render_seeds = np.random.default_rng([seed, 1]).integers(0, 2**40, size=n)
    return [world.render(spec, int(s)) for spec, s in zip(specs, render_seeds)]


def save_sample_subject(subject: str | world.Instance, folder: str | Path, n: int = 4, seed: int = 0) -> list[Path]:
    """Write the photos as PNGs (``<name>-<i>.png``) into ``folder``; returns their paths."""
    instance = subject_instance(subject)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(sample_subject_images(instance, n, seed)):
        path = folder / f"{instance.cls}-{instance.idx}-{i}.png"
        image.save(path)
        paths.append(path)
    return paths

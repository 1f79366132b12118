"""The evaluator: a small CNN trained on the world that stands in for DINO/CLIP.

It embeds subject identity (like DINO for subject fidelity) and reads every captioned attribute
back (like CLIP-T for prompt fidelity), so a generated image can be checked against the spec its
prompt came from. A metric is only as good as the evaluator's own accuracy, so
:func:`measure_accuracy` measures it on fresh renders (seeds from ``EVAL_SEED_BASE`` up, which
training never uses) and the shipped ``config.json`` records the numbers.

Input: RGB images, 64x64, as floats in [0, 1] (NCHW); PIL images and uint8 arrays are converted
by the helpers. Inside, pixels are mapped to [-1, 1] and two coordinate channels are appended so
that position survives global pooling; a 2x2 space-to-depth step keeps every pixel's detail while
the convolutions run at 32x32 and below (cheap enough to train on two CPU cores).

Weights load from safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from gen import world
from gen.paths import BUILTIN_DIR

DEFAULT_DIR = BUILTIN_DIR / "evaluator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Render seeds at or above this are reserved for measuring; training draws seeds below it.
EVAL_SEED_BASE = 2**40

ATTRIBUTES: dict[str, tuple] = {
    "class": world.CLASSES,
    "background": world.COLOURS,
    "scene": world.SCENES,
    "position": world.POSITIONS,
    "size": world.SIZES,
    "count": world.COUNTS,
    "accessory": world.ACCESSORIES,
    "object_colour": world.COLOURS,
}


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture hyperparameters; stored in ``config.json`` beside the weights."""

    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    hidden: int = 256
    embed_dim: int = 96
    attributes: dict[str, int] = field(default_factory=lambda: {k: len(v) for k, v in ATTRIBUTES.items()})


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Evaluator(nn.Module):
    """CNN trunk, pooled features, an L2-normalised identity embedding and one head per attribute."""

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.PixelUnshuffle(2)]
        c_in = 4 * 5  # RGB + 2 coordinate channels, space-to-depth by 2
        for i, width in enumerate(config.widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for j in range(config.convs_per_stage):
                layers += _conv_bn_relu(c_in if j == 0 else width, width)
            c_in = width
        self.trunk = nn.Sequential(*layers)
        pooled = 2 * config.widths[-1]  # average and max pooling
        self.embed = nn.Sequential(nn.Linear(pooled, config.hidden), nn.ReLU(inplace=True), nn.Linear(config.hidden, config.embed_dim))
        self.shared = nn.Sequential(nn.Linear(pooled, config.hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(config.hidden, k) for name, k in config.attributes.items()})
        ramp = torch.linspace(-1.0, 1.0, world.IMAGE_SIZE)
        coords = torch.stack([ramp[None, :].expand(world.IMAGE_SIZE, -1), ramp[:, None].expand(-1, world.IMAGE_SIZE)])
        self.register_buffer("coords", coords[None], persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: (N, 3, 64, 64) in [0, 1]. Returns ``embedding`` (N, D, unit norm) and logits per attribute."""
        x = torch.cat([x * 2.0 - 1.0, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        h = self.trunk(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        out = {"embedding": F.normalize(self.embed(pooled), dim=1)}
        shared = self.shared(pooled)
        out.update({name: head(shared) for name, head in self.heads.items()})
        return out


def save_evaluator(evaluator: Evaluator, folder: Path, extra: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` (architecture plus ``extra``, e.g. accuracies)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in evaluator.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    config = {"architecture": asdict(evaluator.config), **extra}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """Load an evaluator folder (default: the shipped one) in eval mode, from safetensors only."""
    folder = Path(path) if path is not None else DEFAULT_DIR
    arch = json.loads((folder / CONFIG_FILE).read_text())["architecture"]
    config = EvaluatorConfig(
        widths=tuple(arch["widths"]), convs_per_stage=arch["convs_per_stage"], hidden=arch["hidden"],
        embed_dim=arch["embed_dim"], attributes=dict(arch["attributes"]),
    )
    evaluator = Evaluator(config)
    evaluator.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return evaluator.to(device).eval()


@functools.lru_cache(maxsize=1)
def _default_evaluator() -> Evaluator:
    return load_evaluator()


ImageBatch = Sequence[Image.Image] | np.ndarray | torch.Tensor


def to_tensor(images: ImageBatch) -> torch.Tensor:
    """PIL images, a uint8 (N, H, W, 3) array or a float (N, 3, H, W) tensor in [0, 1] -> float tensor."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"arrays must be uint8 (N, H, W, 3), not {images.dtype}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    else:
        array = np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2, Image.BICUBIC)) for im in images])
        x = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, world.IMAGE_SIZE, world.IMAGE_SIZE):
        raise ValueError(f"expected images of 3x{world.IMAGE_SIZE}x{world.IMAGE_SIZE}, got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def _outputs(evaluator: Evaluator, images: ImageBatch, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Run in eval mode (batch-norm running statistics), restoring the caller's mode after."""
    x = to_tensor(images)
    device = next(evaluator.parameters()).device
    was_training = evaluator.training
    evaluator.eval()
    parts = [evaluator(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    evaluator.train(was_training)
    return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}


@torch.no_grad()
def read_attributes(evaluator: Evaluator, images: ImageBatch) -> list[dict[str, object]]:
    """The attributes the evaluator sees in each image, by name (``count`` as an int)."""
    out = _outputs(evaluator, images)
    picks = {name: out[name].argmax(dim=1).tolist() for name in ATTRIBUTES}
    return [{name: ATTRIBUTES[name][picks[name][i]] for name in ATTRIBUTES} for i in range(len(out["embedding"]))]


@torch.no_grad()
def identity_embeddings(evaluator: Evaluator, images: ImageBatch) -> torch.Tensor:
    """Unit-norm identity embeddings, (N, D)."""
    return _outputs(evaluator, images)["embedding"]


@torch.no_grad()
def identity_similarity(a_images: ImageBatch, b_images: ImageBatch, evaluator: Evaluator | None = None) -> float:
    """Mean cosine similarity of identity embeddings over all (a, b) pairs (like DINO score)."""
    evaluator = evaluator or _default_evaluator()
    a, b = identity_embeddings(evaluator, a_images), identity_embeddings(evaluator, b_images)
    return float((a @ b.T).mean())


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _eval_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    return EVAL_SEED_BASE + rng.integers(0, EVAL_SEED_BASE, size=n)


def _attribute_accuracy(evaluator: Evaluator, specs: list[world.SceneSpec], rng: np.random.Generator) -> dict[str, float]:
    images = world.render_batch(specs, _eval_seeds(rng, len(specs)))
    read = read_attributes(evaluator, images)
    truth = [world.spec_attributes(s) for s in specs]
    return {name: float(np.mean([r[name] == t[name] for r, t in zip(read, truth)])) for name in ATTRIBUTES}


def _chance(specs: list[world.SceneSpec]) -> dict[str, float]:
    """Accuracy of always answering the most frequent value."""
    truth = [world.spec_attributes(s) for s in specs]
    chance = {}
    for name in ATTRIBUTES:
        _, counts = np.unique([str(t[name]) for t in truth], return_counts=True)
        chance[name] = float(counts.max() / len(truth))
    return chance


def _identity_auc(evaluator: Evaluator, views: int, rng: np.random.Generator) -> tuple[float, float]:
    """ROC AUC of cosine similarity for same-instance pairs vs different instances (same class, any class)."""
    specs = [world.sample_spec(rng, instances=[inst], colour_override_prob=0.0)
             for inst in world.HELD_OUT_INSTANCES for _ in range(views)]
    emb = identity_embeddings(evaluator, world.render_batch(specs, _eval_seeds(rng, len(specs)))).numpy()
    ids = np.array([world.HELD_OUT_INSTANCES.index(s.instance) for s in specs])
    classes = np.array([world.CLASSES.index(s.instance.cls) for s in specs])
    i, j = np.triu_indices(len(specs), k=1)
    scores = np.einsum("nd,nd->n", emb[i], emb[j])
    same = ids[i] == ids[j]
    same_class = classes[i] == classes[j]
    keep = same | same_class
    return roc_auc(scores[keep], same[keep]), roc_auc(scores, same)


def measure_accuracy(evaluator: Evaluator, n: int, seed: int) -> dict:
    """Accuracy on fresh renders (seeds never used in training).

    * ``attributes``: per-head accuracy on ``n`` specs drawn from all instances, 25% recoloured;
    * ``attributes_held_out``: the same on ``n`` specs of the held-out instances only;
    * ``chance``: the majority-value rate of each attribute on the first set;
    * ``identity_auc_same_class`` / ``identity_auc_any_class``: ROC AUC of embedding cosine for
      same-instance pairs vs different-instance pairs (of the same class / of any class), over
      about ``n`` renders of the held-out instances, which evaluator training never sees.
    """
    rng = np.random.default_rng([seed, 0xE7A1])
    specs = [world.sample_spec(rng, instances="any") for _ in range(n)]
    held = [world.sample_spec(rng, instances="held_out") for _ in range(n)]
    views = max(2, n // len(world.HELD_OUT_INSTANCES))
    auc_same, auc_any = _identity_auc(evaluator, views, rng)
    return {
        "n": n,
        "seed": seed,
        "attributes": _attribute_accuracy(evaluator, specs, rng),
        "attributes_held_out": _attribute_accuracy(evaluator, held, rng),
        "chance": _chance(specs),
        "identity_auc_same_class": auc_same,
        "identity_auc_any_class": auc_any,
    }

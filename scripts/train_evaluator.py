"""Train the evaluator on the world and ship it to ``gen/builtin/evaluator/``.

    python scripts/train_evaluator.py            # the shipped run (about 9 minutes on 2 idle CPU cores)
    python scripts/train_evaluator.py --epochs 1 --out /tmp/evaluator   # a quick look

Deterministic for a given seed: a pool of renders is drawn once (render seeds below
``EVAL_SEED_BASE``; held-out instances excluded), then batches of P instances x K views train the
identity embedding with a supervised contrastive loss while every image trains the attribute
heads. Recoloured renders join each batch for the attribute heads only, since a recolour changes
identity. The final table is measured on fresh renders by ``gen.evaluator.measure_accuracy``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gen import world  # noqa: E402
from gen.paths import replace_folder  # noqa: E402
from gen.evaluator import ATTRIBUTES, DEFAULT_DIR, EVAL_SEED_BASE, Evaluator, EvaluatorConfig, measure_accuracy, save_evaluator  # noqa: E402

TARGET_ACCURACY = 0.97
TARGET_AUC = 0.98


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the shipped weights."""

    seed: int = 0
    views_per_instance: int = 8  # renders per training instance in the pool
    recoloured: int = 8000  # extra renders with a colour override (attribute heads only)
    instances_per_batch: int = 32
    views_per_step: int = 4
    recoloured_per_batch: int = 32
    epochs: int = 8
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 40
    temperature: float = 0.1
    eval_n: int = 2000
    threads: int = 2


@dataclass
class Pool:
    """Pre-rendered training images and their labels; identity views first, grouped by instance."""

    images: np.ndarray  # uint8 (N, 64, 64, 3)
    labels: dict[str, np.ndarray]  # attribute name -> class index per image
    n_instances: int


def _render_chunk(args: tuple[list[world.SceneSpec], np.ndarray]) -> np.ndarray:
    return world.render_batch(*args)


def build_pool(cfg: TrainConfig) -> Pool:
    """Draw the pool's specs and render them on ``cfg.threads`` processes."""
    rng = np.random.default_rng([cfg.seed, 1])
    instances = world.PRETRAIN_INSTANCES
    specs = [world.sample_spec(rng, instances=[inst], colour_override_prob=0.0)
             for inst in instances for _ in range(cfg.views_per_instance)]
    specs += [world.sample_spec(rng, instances="pretrain", colour_override_prob=1.0) for _ in range(cfg.recoloured)]
    seeds = rng.integers(0, EVAL_SEED_BASE, size=len(specs))
    chunks = [(specs[i:i + 500], seeds[i:i + 500]) for i in range(0, len(specs), 500)]
    with multiprocessing.get_context("fork").Pool(cfg.threads) as workers:
        parts = list(tqdm(workers.imap(_render_chunk, chunks), total=len(chunks), desc="rendering pool", unit="chunk"))
    truth = [world.spec_attributes(s) for s in specs]
    labels = {name: np.array([values.index(t[name]) for t in truth], np.int64) for name, values in ATTRIBUTES.items()}
    return Pool(np.concatenate(parts), labels, len(instances))


def supcon_loss(embedding: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit-norm embeddings."""
    logits = embedding @ embedding.T / temperature
    eye = torch.eye(len(labels), dtype=torch.bool)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


def batches(cfg: TrainConfig, pool: Pool, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, int]]:
    """One epoch of (image indices, number of identity views): P instances x K views, then recoloured extras."""
    n_identity = pool.n_instances * cfg.views_per_instance
    n_recoloured = len(pool.images) - n_identity
    order = rng.permutation(pool.n_instances)
    for start in range(0, pool.n_instances - cfg.instances_per_batch + 1, cfg.instances_per_batch):
        chosen = order[start:start + cfg.instances_per_batch]
        views = np.stack([rng.choice(cfg.views_per_instance, cfg.views_per_step, replace=False) for _ in chosen])
        identity = (chosen[:, None] * cfg.views_per_instance + views).ravel()
        recoloured = n_identity + rng.integers(0, n_recoloured, size=cfg.recoloured_per_batch)
        yield np.concatenate([identity, recoloured]), len(identity)


def train(cfg: TrainConfig, pool: Pool) -> Evaluator:
    """AdamW with warmup and cosine decay on the sum of attribute cross-entropies and SupCon."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])
    model = Evaluator(EvaluatorConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = pool.n_instances // cfg.instances_per_batch
    total = steps_per_epoch * cfg.epochs

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    progress = tqdm(total=total, desc="training", unit="step")
    for _ in range(cfg.epochs):
        for index, n_identity in batches(cfg, pool, rng):
            x = torch.from_numpy(pool.images[index]).permute(0, 3, 1, 2).float() / 255.0
            out = model(x)
            attr_loss = sum(F.cross_entropy(out[name], torch.from_numpy(pool.labels[name][index])) for name in ATTRIBUTES)
            ids = torch.from_numpy(index[:n_identity] // cfg.views_per_instance)
            id_loss = supcon_loss(out["embedding"][:n_identity], ids, cfg.temperature)
            loss = attr_loss + id_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
            progress.set_postfix(attr=f"{attr_loss.item():.3f}", id=f"{id_loss.item():.3f}")
    progress.close()
    return model.eval()


def format_table(metrics: dict) -> str:
    """The accuracy table: per attribute on all instances, on held-out instances, and chance."""
    lines = [f"{'attribute':<15}{'accuracy':>10}{'held-out':>10}{'chance':>9}"]
    for name in ATTRIBUTES:
        lines.append(f"{name:<15}{metrics['attributes'][name]:>10.4f}{metrics['attributes_held_out'][name]:>10.4f}"
                     f"{metrics['chance'][name]:>9.3f}")
    lines.append(f"identity ROC AUC, held-out instances: same class {metrics['identity_auc_same_class']:.4f}, "
                 f"any class {metrics['identity_auc_any_class']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder to write (default: the shipped evaluator, replaced)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--views-per-instance", type=int, default=TrainConfig.views_per_instance)
    parser.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, epochs=args.epochs, views_per_instance=args.views_per_instance, eval_n=args.eval_n)
    # Refused now: otherwise numpy fails (or an untrained model is saved) only after minutes of rendering and training.
    for flag, value, least in (("--seed", cfg.seed, 0), ("--epochs", cfg.epochs, 1), ("--eval-n", cfg.eval_n, 1),
                               ("--views-per-instance", cfg.views_per_instance, cfg.views_per_step)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, not {value}")
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    pool = build_pool(cfg)
    model = train(cfg, pool)
    train_time = time.perf_counter() - start
    cpu_time = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    metrics = measure_accuracy(model, n=cfg.eval_n, seed=cfg.seed + 1)
    print(format_table(metrics))
    passed = (min(metrics["attributes"].values()) >= TARGET_ACCURACY
              and min(metrics["attributes_held_out"].values()) >= TARGET_ACCURACY
              and metrics["identity_auc_same_class"] >= TARGET_AUC)
    print(f"targets (accuracy >= {TARGET_ACCURACY}, AUC >= {TARGET_AUC}): {'met' if passed else 'NOT met'}")
    command = "python scripts/train_evaluator.py" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    replace_folder(args.out, lambda folder: save_evaluator(model, folder, {
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": "RGB 64x64, float NCHW in [0, 1]",
        "metrics": metrics,
        "training": asdict(cfg),
        "training_wall_time_s": round(train_time, 1),  # grows when other jobs share the cores
        "training_cpu_time_s": round(cpu_time, 1),
        "command": command,
        "torch": torch.__version__,
    }))
    print(f"wrote {args.out} (pool + training: {train_time:.0f} s wall, {cpu_time:.0f} s CPU)")


if __name__ == "__main__":
    main()

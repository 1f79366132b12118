"""Training options: one dataclass, presets per base profile, and the command-line flags made from it.

A user gives images, a concept name and a class word; everything else comes from a preset
(``quick``, ``balanced``, ``best``) chosen for the base's *profile*:

* ``builtin``: small latent models at 64-128 px like the built-in base (and the tiny test
  pipelines). Few parameters, so a higher learning rate and a few hundred steps; CPU-friendly.
* ``sd``: Stable Diffusion 1.x/2.x at 512-768 px (diffusers' DreamBooth-LoRA recipe: lr 1e-4).
* ``sdxl``: SDXL at 1024 px; gradient checkpointing on, since activations dominate memory.

The profile follows from the base itself (family and resolution), never from where it was loaded.
Any field can be overridden; :class:`TrainConfig` is also the single definition of the command-line
flags shared by ``bespoke train`` and ``scripts/train_lora.py`` (see :func:`add_config_arguments`).
"""

from __future__ import annotations

import argparse
import math
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from gen.errors import InvalidRequest
from gen.lora_targets import TEXT_TARGETS, UNET_TARGETS, matches_target
from gen.seeds import SEED_LIMIT

PRESET_NAMES = ("quick", "balanced", "best")
MIXED_PRECISION = ("no", "fp16", "bf16")
TIMESTEP_BIASES = ("none", "earlier", "later")
SMALL_BASE_MAX_SIZE = 128  # bases at or below this resolution use the "builtin" profile


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """How one training job runs. ``None`` fields are filled from the base by :func:`resolve_config`."""

    # what is learned
    rank: int = _opt(8, "LoRA rank")
    alpha: float | None = _opt(None, "LoRA alpha; the update is scaled by alpha/rank (default: the rank)")
    dropout: float = _opt(0.0, "dropout on the LoRA input (masks seeded by the job's seeds; users trained together share the draws)")
    unet_targets: tuple[str, ...] = _opt(UNET_TARGETS, "UNet modules that get LoRA (comma-separated name suffixes)")
    text_encoder_lora: bool = _opt(False, "also train LoRA on the text encoder(s)")
    text_targets: tuple[str, ...] = _opt(TEXT_TARGETS, "text-encoder modules that get LoRA (comma-separated)")
    new_token: bool = _opt(False, "learn a new token embedding for the trigger (pivotal tuning)")
    num_new_tokens: int = _opt(1, "how many new tokens the trigger spans")
    trigger: str | None = _opt(None, "the word that names the subject (default: the new token(s), else 'sks')")
    # data
    resolution: int | None = _opt(None, "training resolution in pixels (default: the base's)")
    flip: bool = _opt(False, "random horizontal flips (off: in the built-in world left/right are prompt attributes)")
    # prior preservation
    prior_preservation: bool = _opt(True, "regularize with images the base generates for the plain class prompt")
    prior_weight: float = _opt(1.0, "weight of the prior-preservation loss")
    prior_distill: bool = _opt(
        False, "class rows regress on the base's own prediction (LoRA off) instead of the class image's noise: "
        "the class prompt is held to what the base does, not to a few samples of it"
    )
    prior_context: bool = _opt(
        False, "with prior_distill, about half the class rows are captioned like the photos minus the trigger "
        "('a large house on the left'): the contexts the photos share stay the base's and only the trigger carries the subject"
    )
    num_class_images: int = _opt(50, "class images to generate (once per base and class word; cached)")
    class_prompt: str | None = _opt(None, "prompt for class images (default: 'a {class_word}')")
    class_image_steps: int | None = _opt(None, "denoising steps for class images (default: the base's)")
    # optimisation
    steps: int = _opt(400, "optimizer steps")
    batch_size: int = _opt(1, "instance images per user per step (plus as many class images)")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    lr: float = _opt(1e-4, "learning rate of the LoRA weights")
    text_lr: float | None = _opt(None, "learning rate of text-encoder LoRA (default: lr)")
    token_lr: float = _opt(5e-3, "learning rate of new token embeddings")
    loraplus_lr_ratio: float = _opt(
        1.0, "LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer, kohya's loraplus_lr_ratio): the B matrices "
        "learn at this many times the A matrices' rate, e.g. 16 (1: plain LoRA)"
    )
    token_retract: float = _opt(
        0.1, "after each step scale each user's new token embeddings by (the vocabulary's std / theirs) ** this, as "
        "diffusers' pivotal tuning does (retract_embeddings): the token stays near the vocabulary's scale (0: off)"
    )
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps, then constant")
    weight_decay: float = _opt(1e-2, "AdamW weight decay on LoRA weights (never on token embeddings)")
    max_grad_norm: float = _opt(1.0, "gradient clipping, per user's adapter")
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting with this gamma, e.g. 5 (0: off)")
    timestep_bias: str = _opt(
        "none", "draw some training timesteps more often, as diffusers' --timestep_bias_strategy: 'later' (the noisiest, "
        "where layout and colour are decided), 'earlier' (the cleanest: fine detail) or 'none' (uniform)"
    )
    timestep_bias_multiplier: float = _opt(2.0, "with timestep_bias, how many times as often the biased timesteps are drawn")
    timestep_bias_portion: float = _opt(0.25, "with timestep_bias, the fraction of all timesteps that is biased")
    ema_decay: float = _opt(0.0, "save an exponential moving average of the trained weights with at most this decay, e.g. 0.99 (0: off; diffusers' EMAModel, its warmup included)")
    mixed_precision: str | None = _opt(None, "no, fp16 or bf16 (default: the base's dtype)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    seed: int = _opt(0, "seed of LoRA init, batches and noise; equal seeds give equal adapters")
    # bookkeeping
    validation_every: int = _opt(0, "generate validation images every N steps (0: never)")
    validation_prompt: str | None = _opt(None, "validation prompt; {trigger} and {class_word} are filled in (default: the instance caption)")
    num_validation_images: int = _opt(4, "validation images per user")
    checkpoint_every: int = _opt(0, "save LoRA weights and optimizer state every N steps (0: never)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep while training")
    output_dir: str | None = _opt(None, "checkpoint folder (default: <cache dir>/train/<job hash>; removed after success)")
    resume: bool = _opt(True, "resume from the latest checkpoint in the output folder, if any")

    def to_record(self) -> dict[str, Any]:
        """JSON-ready, for the registry's training config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _small(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-3, "warmup_steps": 20, "batch_size": 2, "num_class_images": 32, "token_lr": 1e-2, **kw})


def _sd(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-4, "batch_size": 1, "num_class_images": 100, **kw})


def _sdxl(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-4, "batch_size": 1, "num_class_images": 50, "gradient_checkpointing": True, **kw})


# Prior held to the base's own prediction, for the class prompt and for the photos' captions minus the
# trigger. Measured on five held-out development subjects (robot-5 ... cat-5; the benchmark's subjects
# are the *-0 ones; `bench_personalize.py --parts subjects --seeds 0 --subjects robot-5 mug-5 car-5 house-5 cat-5`):
# identity drift of the class prompt 0.144 / -0.034 / 0.052 / 0.033 / -0.008 against 0.077 / 0.068 / -0.031 /
# 0.376 / 0.182 with class images as targets, subject fidelity 0.911 against 0.880 on average; on four other
# class phrasings house-5 / cat-5 drift 0.06 / -0.02 against 0.42 / 0.32.
_HELD_PRIOR = {"prior_distill": True, "prior_context": True, "class_prompt": "a photo of a {class_word}"}

PRESETS: dict[str, dict[str, TrainConfig]] = {
    # Measured on the built-in base (robot-0, 4 photos, evaluator captions, 2 CPU cores): 300 steps gave
    # subject fidelity 0.30 and prompt fidelity 54% in 36 s; 800 steps 0.51 and 61% in 100 s.
    "builtin": {
        "quick": _small(rank=4, steps=300, num_class_images=16),
        "balanced": _small(rank=8, steps=800, new_token=True, **_HELD_PRIOR),
        "best": _small(rank=16, steps=1500, new_token=True, **_HELD_PRIOR),
    },
    "sd": {
        "quick": _sd(rank=4, steps=400, num_class_images=50),
        "balanced": _sd(rank=8, steps=800),
        "best": _sd(rank=16, steps=1200, new_token=True, text_encoder_lora=True, min_snr_gamma=5.0),
    },
    "sdxl": {
        "quick": _sdxl(rank=4, steps=400),
        "balanced": _sdxl(rank=8, steps=800),
        "best": _sdxl(rank=16, steps=1200, num_class_images=100, new_token=True, text_encoder_lora=True, min_snr_gamma=5.0),
    },
}


def profile_of(base) -> str:
    """Which preset table fits ``base``: by family, then by resolution (never by where it came from)."""
    if base.family == "sdxl":
        return "sdxl"
    return "builtin" if base.default_size <= SMALL_BASE_MAX_SIZE else "sd"


def resolve_config(base, preset: str = "balanced", **overrides: Any) -> TrainConfig:
    """The preset for ``base``'s profile with ``overrides`` applied (``None`` values ignored), checked."""
    if preset not in PRESET_NAMES:
        raise InvalidRequest(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidRequest(f"unknown training option {unknown[0]!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("trigger") and "new_token" not in overrides:
        overrides["new_token"] = False  # a trigger the user chose replaces the preset's new token
    if (overrides.get("prior_preservation") is False or overrides.get("prior_distill") is False) and "prior_context" not in overrides:
        overrides["prior_context"] = False  # the preset's context captions go with the prior the user switched off
    cfg = replace(PRESETS[profile_of(base)][preset], **overrides)
    cfg = replace(
        cfg,
        alpha=float(cfg.rank if cfg.alpha is None else cfg.alpha),
        resolution=cfg.resolution or base.default_size,
        mixed_precision=cfg.mixed_precision or _precision_of(base),
        text_lr=cfg.lr if cfg.text_lr is None else cfg.text_lr,
        unet_targets=_names(cfg.unet_targets),
        text_targets=_names(cfg.text_targets),
    )
    _check(cfg, base)
    _warn_if_ignored(cfg, overrides, preset)
    _warn_if_not_served(cfg, base)
    return cfg


# Options that only act through a switch: set while it is off, they would be ignored without a word.
NEEDS_SWITCH = {
    "num_new_tokens": "new_token", "token_lr": "new_token", "token_retract": "new_token",
    "text_targets": "text_encoder_lora", "text_lr": "text_encoder_lora",
    "prior_weight": "prior_preservation", "prior_distill": "prior_preservation", "num_class_images": "prior_preservation",
    "class_prompt": "prior_preservation", "class_image_steps": "prior_preservation",
}


def _warn_if_ignored(cfg: TrainConfig, overrides: dict[str, Any], preset: str) -> None:
    for name, switch in NEEDS_SWITCH.items():
        if name in overrides and not getattr(cfg, switch):
            flag = switch.replace("_", "-")
            warnings.warn(f"{name} has no effect: {switch} is off (in the {preset!r} preset or as set); turn it on with --{flag} / {switch}=True", stacklevel=3)


def max_seed(cfg: TrainConfig) -> int:
    """The largest job seed whose validation images all have seeds the sampler takes."""
    return SEED_LIMIT - cfg.num_validation_images


def _warn_if_not_served(cfg: TrainConfig, base) -> None:
    """Training can put LoRA on any layer peft wraps, but the sampler preallocates slots for its default
    targets (those of ``RuntimeConfig()``) only and refuses an adapter outside them; say so before the training
    rather than at the first request."""
    pipe = getattr(base, "pipe", None)
    wanted = [("unet", cfg.unet_targets, UNET_TARGETS)]
    if cfg.text_encoder_lora:
        wanted += [(name, cfg.text_targets, TEXT_TARGETS) for name in ("text_encoder", "text_encoder_2")]
    outside = []
    for component, targets, served in wanted:
        model = getattr(pipe, component, None)
        names = [name for name, _ in model.named_modules()] if model is not None else []
        outside += [f"{component}.{name}" for name in names if matches_target(name, targets) and not matches_target(name, served)]
    if outside:
        warnings.warn(
            f"LoRA on {len(outside)} layers outside the sampler's default slots (e.g. {outside[0]}): serve these adapters with "
            "Sampler(base, adapters, ServingConfig(runtime=RuntimeConfig(unet_targets=..., text_targets=...))) naming them, or export them",
            stacklevel=3,
        )


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """Module names as a tuple; a string is read as a comma-separated list."""
    return tuple(p.strip() for p in value.split(",") if p.strip()) if isinstance(value, str) else tuple(value)


def _precision_of(base) -> str:
    return {"float16": "fp16", "bfloat16": "bf16"}.get(str(base.dtype).removeprefix("torch."), "no")


def _check(cfg: TrainConfig, base) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InvalidRequest(message)

    for f in fields(cfg):  # NaN slips through every comparison below, and inf makes NaN one step later
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f"{f.name} must be a finite number, got {value}")
    need(1 <= cfg.rank <= 1024, f"rank must be between 1 and 1024, got {cfg.rank}")
    need(cfg.alpha > 0, f"alpha must be positive, got {cfg.alpha}")
    need(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(bool(cfg.unet_targets), "unet_targets is empty")
    need(not cfg.text_encoder_lora or bool(cfg.text_targets), "text_targets is empty")
    need(1 <= cfg.num_new_tokens <= 8, f"num_new_tokens must be between 1 and 8, got {cfg.num_new_tokens}")
    need(cfg.trigger is None or bool(cfg.trigger.strip()), "the trigger is empty")
    need(not (cfg.new_token and cfg.trigger), "give either a trigger or new_token, not both: a new token is its own trigger")
    f = base.vae_scale_factor
    need(f <= cfg.resolution <= 4096 and cfg.resolution % f == 0, f"resolution must be a multiple of {f} up to 4096, got {cfg.resolution}")
    need(cfg.prior_weight >= 0, f"prior_weight must be >= 0, got {cfg.prior_weight}")
    need(0 <= cfg.token_retract <= 1, f"token_retract must be between 0 and 1, got {cfg.token_retract}")
    need(not cfg.prior_preservation or cfg.num_class_images >= 1, "prior preservation needs num_class_images >= 1")
    need(
        not cfg.prior_context or (cfg.prior_preservation and cfg.prior_distill),
        "prior_context needs prior_preservation and prior_distill: the class images do not show the photos' contexts, "
        "so only the base's own prediction is a fair target for those captions",
    )
    need(cfg.class_image_steps is None or cfg.class_image_steps >= 1, "class_image_steps must be >= 1")
    for name in ("steps", "batch_size", "grad_accum", "num_validation_images", "keep_checkpoints"):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "validation_every", "checkpoint_every", "seed"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.seed <= max_seed(cfg), f"seed must be at most {max_seed(cfg)} (validation image i uses seed + i), got {cfg.seed}")
    for name in ("lr", "text_lr", "token_lr", "loraplus_lr_ratio", "max_grad_norm"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.min_snr_gamma >= 0, f"min_snr_gamma must be >= 0, got {cfg.min_snr_gamma}")
    need(cfg.timestep_bias in TIMESTEP_BIASES, f"timestep_bias must be one of {', '.join(TIMESTEP_BIASES)}, got {cfg.timestep_bias!r}")
    need(cfg.timestep_bias_multiplier > 0, f"timestep_bias_multiplier must be positive, got {cfg.timestep_bias_multiplier}")
    need(0 < cfg.timestep_bias_portion <= 1, f"timestep_bias_portion must be in (0, 1], got {cfg.timestep_bias_portion}")
    need(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    need(cfg.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {cfg.mixed_precision!r}")
    if _precision_of(base) == "fp16":
        need(cfg.mixed_precision == "fp16", "the base is loaded in float16, so training needs mixed_precision fp16 (or load the base in float32)")
    if cfg.mixed_precision == "fp16":
        need(base.device.type == "cuda", "mixed_precision fp16 needs a CUDA device; use bf16 or no on the cpu")


# --- command-line flags -------------------------------------------------------------------------


def _flag_type(annotation) -> tuple[type, bool]:
    """(scalar type, is a comma-separated tuple) of a field annotation like ``int | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(annotation, types.UnionType) else [annotation]
    (kind,) = args
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0], True
    return kind, False


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--rank``, ``--text-encoder-lora/--no-text-encoder-lora``, ...).

    Every flag defaults to None, meaning "the preset's value", so only what the user typed overrides.
    """
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training options (defaults come from --preset and the base)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, is_tuple = _flag_type(hints[f.name])
        defaults = _preset_defaults(f.name, is_tuple)
        help_text = f"{f.metadata['help']} [{defaults}]" if defaults else f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif is_tuple:
            group.add_argument(flag, type=_names, default=None, metavar="A,B,...", help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help_text)


def _preset_defaults(name: str, is_tuple: bool) -> str:
    """What runs when the flag is not given: one value, or each base profile's quick/balanced/best values.

    Empty when that is None: the field's help says what stands in for it (the rank, the base's size).
    """

    def show(value) -> str:
        return ",".join(value) if is_tuple and value is not None else str(value)

    table = {profile: [show(getattr(cfg, name)) for cfg in presets.values()] for profile, presets in PRESETS.items()}
    values = {v for row in table.values() for v in row}
    if len(values) == 1:
        value = values.pop()
        return "" if value == "None" else f"default: {value}"
    return "default per base and preset (quick/balanced/best): " + ", ".join(f"{p} {'/'.join(row)}" for p, row in table.items())


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}

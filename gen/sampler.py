"""Sampling from a warm base: prompts, seeds, schedulers, guidance, batches, provenance.

The diffusers pipeline does the denoising; this layer adds what a service needs around it:
validated requests, one seed per image (so an image reproduces alone, whatever its batch),
a scheduler chosen per call, a progress callback shared by the CLI and the demo, and a
provenance record for every image.
"""

from __future__ import annotations

import re
import secrets
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from gen.base import Base
from gen.errors import InvalidRequest
from gen.provenance import Provenance

# name -> (scheduler class, config overrides). All are diffusers' own.
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}
MAX_IMAGES = 64
MAX_STEPS = 1000
MAX_SIDE = 4096

ProgressFn = Callable[[int, int], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder accepts; the named words were dropped."""


@dataclass
class Generation:
    """Images and, for each, the record that reproduces it."""

    images: list[Image.Image]
    provenance: list[Provenance]


def make_scheduler(name: str, config) -> object:
    """A fresh diffusers scheduler of the named kind, from the base's scheduler config."""
    if name not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def image_seeds(seed: int | None, num_images: int) -> list[int]:
    """One seed per image: ``seed + i``; a random base seed when none is given."""
    base_seed = secrets.randbits(31) if seed is None else int(seed)
    return [base_seed + i for i in range(num_images)]


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Noise drawn per image on the CPU from its own seed: independent of batch and device."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def fit_prompt(tokenizer, prompt: str) -> str:
    """Return ``prompt`` cut at a word boundary to the text encoder's limit, warning with the dropped words."""
    limit = tokenizer.model_max_length - 2  # start and end tokens
    n_tokens = len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)
    if n_tokens <= limit:
        return prompt
    words = re.findall(r"\S+", prompt)
    lo, hi = 0, len(words)
    while lo < hi:  # longest word prefix that fits
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]), add_special_tokens=False, verbose=False).input_ids) <= limit:
            lo = mid
        else:
            hi = mid - 1
    dropped = " ".join(words[lo:])
    warnings.warn(
        f"prompt is {n_tokens} tokens, over the text encoder's limit of {limit}; dropped: {dropped!r}",
        PromptTruncatedWarning,
        stacklevel=3,
    )
    return " ".join(words[:lo])


class Sampler:
    """Generates images from one warm base. Thread-safe: calls on one sampler run one at a time."""

    def __init__(self, base: Base):
        self.base = base
        self._lock = threading.Lock()
        base.pipe.set_progress_bar_config(disable=True)  # progress goes through the ``progress`` callback

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_images: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: ProgressFn | None = None,
    ) -> Generation:
        """Generate ``num_images`` images for ``prompt``; image ``i`` uses seed ``seed + i``."""
        defaults = self.base.defaults
        steps = defaults.steps if steps is None else steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
        scheduler = scheduler or defaults.scheduler
        height = self.base.default_size if height is None else height
        width = self.base.default_size if width is None else width
        self._validate(prompt, num_images, steps, guidance_scale, height, width)
        pipe = self.base.pipe
        prompt = fit_prompt(pipe.tokenizer, prompt)
        if negative_prompt:
            negative_prompt = fit_prompt(pipe.tokenizer, negative_prompt)
        seeds = image_seeds(seed, num_images)
        f = self.base.vae_scale_factor
        latents = initial_noise(seeds, (pipe.unet.config.in_channels, height // f, width // f))

        def on_step_end(_pipe, i, _t, kwargs):
            if progress is not None:
                progress(i + 1, steps)
            return kwargs

        with self._lock:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
            out = pipe(
                prompt=[prompt] * num_images,
                negative_prompt=[negative_prompt] * num_images if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                latents=latents.to(self.base.device, self.base.dtype),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        records = [
            Provenance(
                base=self.base.source,
                base_fingerprint=self.base.fingerprint,
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=s,
                scheduler=scheduler,
                steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
            )
            for s in seeds
        ]
        return Generation(images=list(out.images), provenance=records)

    def _validate(self, prompt, num_images, steps, guidance_scale, height, width) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest("the prompt is empty")
        if not 1 <= num_images <= MAX_IMAGES:
            raise InvalidRequest(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        if not guidance_scale >= 0:
            raise InvalidRequest(f"guidance_scale must be >= 0, got {guidance_scale}")
        f = self.base.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            if not f <= side <= MAX_SIDE:
                raise InvalidRequest(f"{name} must be between {f} and {MAX_SIDE}, got {side}")
            if side % f:
                raise InvalidRequest(f"{name} {side} is not a multiple of the VAE factor {f}")

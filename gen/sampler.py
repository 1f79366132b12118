"""Sampling from a warm base: prompts, seeds, schedulers, guidance, batches, provenance.

The diffusers pipeline does the denoising; this layer adds what a service needs around it:
validated requests, one seed per image (so an image reproduces alone, whatever its batch),
a scheduler chosen per call, a progress callback shared by the CLI and the demo, and a
provenance record for every image.

Given an :class:`~gen.adapter.AdapterSource`, a sampler also serves users' adapters: prompts
may mention the user's concepts (``<rex>``, ``<rex:0.8>``; see :mod:`gen.concepts` and
:mod:`gen.serving`). Requests from any number of threads are queued; whichever thread holds the
run lock takes the oldest waiting request and every compatible one (same steps, size,
scheduler, guidance and use of a negative prompt, within the batch limits), mixing users in
one batch, and runs them as one pipeline call. Adapters are loaded in the caller's thread before
queueing, so loading overlaps the batch running meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import re
import secrets
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from gen.adapter import AdapterSource
from gen.base import Base
from gen.concepts import parse_mentions, parse_style, refuse_placeholders
from gen.cuda_graph import GraphedUNet
from gen.errors import InvalidRequest
from gen.provenance import Provenance, arithmetic, read_provenance, replay_differences
from gen.seeds import SEED_LIMIT
from gen.serving import NO_ADAPTERS, AdapterServing, Resolved, ServingConfig

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
MAX_PROMPT_CHARS = 2000  # text encoders read ~77 tokens (~300 characters); far longer text is refused, not fitted

ProgressFn = Callable[[int, int], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder accepts; the named words were dropped."""


class ReplayWarning(UserWarning):
    """A replayed image was made in another precision or on another device: its pixels may differ by a few levels."""


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


def fit_prompt(tokenizer, prompt: str, expand: Callable[[str], str] = str) -> str:
    """Return ``prompt`` cut to the text encoder's limit, warning with what was dropped.

    The cut falls after a word or a comma ("lowres,bad hands,..." tag lists have no spaces), or
    between characters when not even the first piece fits (CJK). Tokens are counted on
    ``expand(prompt)`` (concept mentions replaced by their text), so the prompt keeps its mentions
    and replays to the same cut.
    """
    limit = tokenizer.model_max_length - 2  # start and end tokens

    def tokens(text: str) -> int:
        return len(tokenizer(expand(text), add_special_tokens=False, verbose=False).input_ids)

    def fits(text: str) -> bool:
        return tokens(text) <= limit

    n_tokens = tokens(prompt)
    if n_tokens <= limit:
        return prompt
    cuts = [m.end() for m in re.finditer(r"[^\s,;]*[,;]+|[^\s,;]+", prompt)]
    if not fits(prompt[: cuts[0]]):
        cuts = list(range(1, len(prompt) + 1))
    lo, hi = 0, len(cuts)  # how many cuts' worth of prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(prompt[: cuts[mid - 1]]):
            lo = mid
        else:
            hi = mid - 1
    kept = prompt[: cuts[lo - 1]].rstrip(" ,;") if lo else ""
    warnings.warn(
        f"prompt is {n_tokens} tokens, over the text encoder's limit of {limit}; dropped: {prompt[len(kept):].strip(' ,;')!r}",
        PromptTruncatedWarning,
        stacklevel=3,
    )
    return kept


@dataclass(frozen=True)
class Request:
    """One ``generate`` call's arguments; ``None`` settings take the base's defaults."""

    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    user: str | None = None
    style: str | None = None  # a style adapter of the user's, "name" or "name:weight"
    progress: ProgressFn | None = None
    versions: Mapping[str, int] | None = None  # concept or style name -> version to use instead of latest


@dataclass
class _Job:
    """A validated request waiting in the queue for its batch."""

    request: Request  # settings filled in, prompts fitted
    text: str  # what the text encoder reads (new tokens as local placeholders)
    seeds: list[int]
    resolved: Resolved
    done: bool = False
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a pipeline call."""
        r = self.request
        return (r.steps, r.guidance_scale, r.scheduler, r.height, r.width, r.negative_prompt is None)


class Sampler:
    """Generates images from one warm base, for any number of users and threads.

    ``adapters`` (optional) is where users' concepts come from; without it prompts are plain text.
    """

    def __init__(self, base: Base, adapters: AdapterSource | None = None, config: ServingConfig = ServingConfig()):
        self.base = base
        self.config = config
        self.serving = AdapterServing(base, adapters, config) if adapters is not None else None
        # Fast tokenizers keep padding/truncation settings as mutable state, so the pipeline's calls
        # (under the run lock) and prompt fitting in callers' threads must not share one tokenizer.
        self._fit_tokenizer = copy.deepcopy(base.pipe.tokenizer)
        self._lock = threading.Lock()  # held while a batch runs
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()
        base.pipe.set_progress_bar_config(disable=True)  # progress goes through the ``progress`` callback
        self.graphs: GraphedUNet | None = None  # the UNet's CUDA graphs, used inside this sampler's pipeline calls
        if config.cuda_graphs and base.device.type == "cuda":
            runtime = self.serving.runtime if self.serving is not None else None
            self.graphs = GraphedUNet(base.pipe.unet, runtime.graph_key if runtime is not None else tuple)

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
        user: str | None = None,
        style: str | None = None,
        progress: ProgressFn | None = None,
        versions: Mapping[str, int] | None = None,
    ) -> Generation:
        """Generate ``num_images`` images for ``prompt``; image ``i`` uses seed ``seed + i``.

        With ``user``, the prompt may mention that user's concepts (``<rex>``, ``<rex:0.8>``) and
        ``style`` may add one of their adapters by name (``"watercolor"`` or ``"watercolor:0.6"``).
        ``versions`` pins named adapters to a version (``{"rex": 2}``); the rest use ``latest``.
        """
        request = Request(
            prompt, negative_prompt, num_images, seed, steps, guidance_scale, scheduler, height, width, user, style, progress,
            versions,
        )
        return self.generate_many([request])[0]

    def replay(self, source: Provenance | str | os.PathLike, *, progress: ProgressFn | None = None) -> Generation:
        """Make again the image that ``source`` (a PNG we wrote, or its record) describes.

        Refused on another base: the same seed there is another image. Warns with
        :class:`ReplayWarning` when the image was made in another dtype or on another device.
        """
        provenance = source if isinstance(source, Provenance) else read_provenance(source)
        if provenance.base_fingerprint != self.base.fingerprint:
            raise InvalidRequest(
                f"the image was made on base {provenance.base_fingerprint} ({provenance.base}); this sampler serves {self.base.fingerprint}"
            )
        differences = replay_differences(provenance, self.base)
        if differences:
            warnings.warn(f"the image was made in {', '.join(differences)}: pixels may differ by a few levels", ReplayWarning, stacklevel=2)
        return self.generate(**provenance.generate_kwargs(), progress=progress)

    def generate_many(self, requests: Sequence[Request], *, return_exceptions: bool = False) -> list[Generation] | list[Generation | Exception]:
        """Serve several requests (any users), batched with each other and with other threads' requests.

        By default the first failure is raised, and a request that fails before it is queued (an
        unknown concept, a damaged adapter) stops the whole call before anything runs. With
        ``return_exceptions`` every request is served on its own merits: a failed one gets its
        exception in its place in the list, and the others their images, as with ``asyncio.gather``.
        """
        planned: list[_Job | Exception] = []
        for request in requests:
            try:
                planned.append(self._plan(request))
            except Exception as e:
                if not return_exceptions:
                    raise
                planned.append(e)
        jobs = [job for job in planned if isinstance(job, _Job)]
        with self._pending_lock:
            self._pending += jobs
        with self._lock:
            while not all(job.done for job in jobs):
                self._run_batch(self._next_batch())
        if return_exceptions:
            return [job if isinstance(job, Exception) else job.error or job.result for job in planned]
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [job.result for job in jobs]

    def _plan(self, request: Request) -> _Job:
        """Validate, fill in defaults, resolve adapters and fit the prompt: everything before the queue."""
        defaults = self.base.defaults
        r = replace(
            request,
            steps=defaults.steps if request.steps is None else request.steps,
            guidance_scale=defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            scheduler=request.scheduler or defaults.scheduler,
            height=self.base.default_size if request.height is None else request.height,
            width=self.base.default_size if request.width is None else request.width,
        )
        self._validate(r.prompt, r.num_images, r.steps, r.guidance_scale, r.height, r.width, r.negative_prompt, r.seed)
        r = replace(r, guidance_scale=float(r.guidance_scale))
        make_scheduler(r.scheduler, self.base.pipe.scheduler.config)  # refuse an unknown name before queueing
        tokenizer = self._fit_tokenizer
        if self.serving is not None:
            refuse_placeholders(r.negative_prompt)
            prompt, resolved = self._fit_and_resolve(r)
        elif r.style is not None:
            raise InvalidRequest("a style needs a sampler with an adapter source")
        elif r.versions:
            raise InvalidRequest("pinned versions need a sampler with an adapter source")
        else:
            prompt, resolved = fit_prompt(tokenizer, r.prompt), NO_ADAPTERS
        negative = fit_prompt(tokenizer, r.negative_prompt) if r.negative_prompt else None
        for name, fitted in (("prompt", prompt), ("negative prompt", negative)):
            if fitted == "":  # only separators fit (",,,,..."): nothing the text encoder reads is left
                raise InvalidRequest(f"nothing of the {name} fits the text encoder")
        r = replace(r, prompt=prompt, negative_prompt=negative)
        return _Job(r, resolved.expand(prompt), image_seeds(r.seed, r.num_images), resolved)

    def _fit_and_resolve(self, r: Request) -> tuple[str, Resolved]:
        """The prompt fitted to the text encoder, and the adapters of the mentions that are left.

        Tokens are counted on the text the mentions become, so the adapters are resolved once to
        fit; mentions the cut drops take their adapters (and pins) with them, so the recorded
        prompt names exactly the adapters applied and replays to the same image.
        """
        resolved = self.serving.resolve(r.user, r.prompt, r.style, r.versions)
        prompt = fit_prompt(self._fit_tokenizer, r.prompt, resolved.expand)
        kept = parse_mentions(prompt)
        if kept == parse_mentions(r.prompt):
            return prompt, resolved
        named = {m.name for m in kept} | ({parse_style(r.style).name} if r.style is not None else set())
        pins = {name: v for name, v in (r.versions or {}).items() if name in named}
        return prompt, self.serving.resolve(r.user, prompt, r.style, pins)

    def _next_batch(self) -> list[_Job]:
        """The oldest waiting job and every later compatible one that fits the batch limits."""
        with self._pending_lock:
            batch, rest = [self._pending[0]], []
            images = batch[0].request.num_images
            for job in self._pending[1:]:
                fits = job.key == batch[0].key and images + job.request.num_images <= self.config.max_batch_images
                if fits and self.serving is not None:
                    fits = self.serving.fits([j.resolved for j in batch] + [job.resolved])
                if fits:
                    batch.append(job)
                    images += job.request.num_images
                else:
                    rest.append(job)
            self._pending = rest
        return batch

    def _run_batch(self, jobs: list[_Job]) -> None:
        """One pipeline call for ``jobs``; each job gets its images or the error."""
        try:
            images = self._denoise(jobs)
        except BaseException as e:  # the batch failed: every job in it reports the error (or its own)
            for job in jobs:
                job.error, job.done = job.error or e, True
            if not isinstance(e, Exception):
                raise
            return
        start = 0
        for job in jobs:
            n = job.request.num_images
            if job.error is None:  # else its progress callback failed: the caller gets that error
                job.result = Generation(images=images[start : start + n], provenance=self._provenance(job))
            job.done = True
            start += n

    def _provenance(self, job: _Job) -> list[Provenance]:
        r = job.request
        return [
            Provenance(
                base=self.base.source,
                base_fingerprint=self.base.fingerprint,
                prompt=r.prompt,
                negative_prompt=r.negative_prompt,
                seed=s,
                scheduler=r.scheduler,
                steps=r.steps,
                guidance_scale=r.guidance_scale,
                height=r.height,
                width=r.width,
                adapters=job.resolved.provenance(),
                user=r.user,
                **arithmetic(self.base),
            )
            for s in job.seeds
        ]

    def _denoise(self, jobs: list[_Job]) -> list[Image.Image]:
        if self.serving is None:
            return self._call_pipeline(jobs, [job.text for job in jobs])
        try:
            return self._call_pipeline(jobs, self.serving.activate([(job.resolved, job.request.num_images, job.text) for job in jobs]))
        finally:
            self.serving.deactivate()

    def _call_pipeline(self, jobs: list[_Job], texts: list[str]) -> list[Image.Image]:
        pipe, first = self.base.pipe, jobs[0].request
        rows = [(job, text) for job, text in zip(jobs, texts) for _ in range(job.request.num_images)]
        seeds = [s for job in jobs for s in job.seeds]
        f = self.base.vae_scale_factor
        latents = initial_noise(seeds, (pipe.unet.config.in_channels, first.height // f, first.width // f))

        def on_step_end(_pipe, i, _t, kwargs):
            for job in jobs:
                if job.request.progress is not None and job.error is None:
                    try:
                        job.request.progress(i + 1, first.steps)
                    except Exception as e:  # fails its own request only (a client gone away); the batch runs on
                        job.error = e
            return kwargs

        pipe.scheduler = make_scheduler(first.scheduler, pipe.scheduler.config)
        with self.graphs.installed() if self.graphs is not None else contextlib.nullcontext():
            out = pipe(
                prompt=[text for _, text in rows],
                negative_prompt=[job.request.negative_prompt for job, _ in rows] if first.negative_prompt else None,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                height=first.height,
                width=first.width,
                latents=latents.to(self.base.device, self.base.dtype),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        return list(out.images)

    def _validate(self, prompt, num_images, steps, guidance_scale, height, width, negative_prompt=None, seed=None) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest("the prompt is empty")
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if text is not None and (not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS):
                size = f"{len(text)} characters" if isinstance(text, str) else f"a {type(text).__name__}, not text"
                raise InvalidRequest(f"the {name} is {size}; the limit is {MAX_PROMPT_CHARS} (the text encoder reads about 300)")
        _check_int("num_images", num_images, 1, MAX_IMAGES)
        _check_int("steps", steps, 1, MAX_STEPS)
        if seed is not None:  # every image's seed (seed + i) must be one the generator takes as it is
            _check_int("seed", seed, 0, SEED_LIMIT - num_images)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not 0 <= guidance_scale < math.inf:
            raise InvalidRequest(f"guidance_scale must be >= 0 and finite, got {guidance_scale!r}")
        f = self.base.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            _check_int(name, side, f, MAX_SIDE)
            if side % f:
                raise InvalidRequest(f"{name} {side} is not a multiple of the VAE factor {f}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    """Refuse a setting that is not a whole number in [lo, hi] (a bool or float is not one: casting would hide the mistake)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequest(f"{name} must be a whole number between {lo} and {hi}, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}")

"""The training loop: DreamBooth-LoRA for one or many users at once on a borrowed base, with accelerate.

:func:`train_adapters` reads top to bottom: prepare the jobs (photos, triggers), generate or load
class images while the base is still untouched, borrow the base (:func:`~adapters.train.lora.attach`),
cache latents and prompt conditioning, then run ``cfg.steps`` optimizer steps. A step draws each
user's rows (instance photos, and as many class images for prior preservation), noises them at
random timesteps, and regresses the UNet's output on the scheduler's target (epsilon, v or x0, as
the base was trained), each row routed through its own user's LoRA. With ``prior_distill`` class rows
regress on the base's own prediction instead (the LoRA switched off for one no-grad forward), which
also lets them carry captions their images do not show (``prior_context``). The loss is a sum of per-user
means, and gradients are clipped per user, so each adapter trains as it would alone. With ``ema_decay`` the
weights saved are a moving average over the steps (diffusers' ``EMAModel``) rather than the last step's.

Several processes (``accelerate launch``) train data-parallel: each draws its own rows and DDP
averages the gradients. Only the main process generates class images, validation images and
evaluations, writes checkpoints' metadata and reports progress.

A non-finite loss (seen by every process, since losses are gathered) stops training with
:class:`TrainingDiverged`, naming the last good checkpoint; checkpoints hold only what trains
(LoRA weights, token rows) plus the optimizer state, never the base.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters.data import ImageLimits, fill
from adapters.train.config import TrainConfig
from adapters.train.data import Batch, PreparedJob, Progress, PromptEncoder, TrainingData, TrainJob, cached, class_images, prepare_jobs
from adapters.train.lora import Attachment, LoraSpec, attach
from gen.adapter import LoraAdapter
from gen.base import Base
from gen.errors import BespokeError
from gen.paths import cache_dir
from gen.sampler import Sampler, fit_prompt

STATE_FILE = "train_state.json"  # written last: a checkpoint folder without it is incomplete
LORA_FILE = "lora.safetensors"
EMA_FILE = "ema.safetensors"  # the moving average of the weights, with ``--ema-decay``
LOSS_POINTS = 20  # loss-curve points kept in a record's metrics


class TrainingDiverged(BespokeError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""


@dataclass
class Validation:
    """Images sampled with one user's adapter during training."""

    step: int
    user: str
    concept: str
    prompt: str
    images: list[Image.Image]


ValidationFn = Callable[[Validation], None]


@dataclass
class TrainResult:
    """One user's trained adapter and how it was made."""

    adapter: LoraAdapter
    job: TrainJob
    loss_curve: list[float]  # per optimizer step, averaged over processes and micro-steps
    metrics: dict[str, float]  # timing, loss summary and curve, and the job's evaluate() numbers
    data_fingerprints: tuple[str, ...]
    seed: int  # the job's own seed (a job may override the config's)


def train_adapters(
    base: Base,
    jobs: Sequence[TrainJob],
    cfg: TrainConfig,
    *,
    progress: Progress | None = None,
    on_validation: ValidationFn | None = None,
    limits: ImageLimits = ImageLimits(),
) -> list[TrainResult]:
    """Train every job's adapter in one run; ``cfg`` must be resolved (:func:`~adapters.train.config.resolve_config`)."""
    started = time.perf_counter()
    prepared = prepare_jobs(jobs, cfg, limits)
    # accelerate keeps one AcceleratorState per process and refuses a later Accelerator with another precision ("has
    # already been initialized"); a library process trains many jobs, so the last job's is dropped. The PartialState
    # (this process's place in an `accelerate launch` group) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=base.device.type == "cpu")
    report = progress if accelerator.is_main_process else None
    with accelerator.main_process_first():  # the main process generates, the others read the cache
        class_sets = [
            class_images(base, job.class_prompt, cfg.num_class_images, cfg.resolution, cfg.class_image_steps, report) if cfg.prior_preservation else None
            for job in prepared
        ]
    identity = run_identity(base, prepared, cfg)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else cache_dir() / "train" / identity  # a rerun of the same job resumes
    spec = LoraSpec(
        rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, unet_targets=cfg.unet_targets,
        text_targets=cfg.text_targets if cfg.text_encoder_lora else None,
        new_tokens=tuple(job.new_tokens for job in prepared), init_words=tuple(job.job.class_word for job in prepared),
        seeds=tuple(job.seed for job in prepared),
    )
    try:
        with attach(base, spec) as lora, _seeded_global_rng(base, prepared):
            curves, loop_seconds = _train(base, lora, prepared, class_sets, cfg, accelerator, run_dir, identity, report, on_validation)
            results = [_result(base, lora, k, job, cfg, curves[k]) for k, job in enumerate(prepared)]
            trained = time.perf_counter()
            on_main_process(lambda: _evaluate(base, lora, prepared, results, accelerator, report))
    finally:
        accelerator.free_memory()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and cfg.output_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # default checkpoints only serve a crashed run
    for result in results:  # train: everything up to the adapters (not evaluation); loop: the steps alone
        result.metrics.update(train_seconds=trained - started, loop_seconds=loop_seconds, users_in_job=float(len(prepared)))
    return results


def on_main_process(work: Callable[[], Any]) -> Any:
    """``work()`` on the main process; every process returns its result, or raises if it failed.

    Without passing the failure on, the other processes would wait in the next collective (a
    broadcast, a barrier) until the process group times out: a caller that catches the error and
    retries, as a busy registry invites, deadlocks.
    """
    state = PartialState()
    result, failure = None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as e:
            if state.num_processes == 1:
                raise
            failure = e
    if state.num_processes > 1:
        result, message = broadcast_object_list([result, None if failure is None else f"{type(failure).__name__}: {failure}"])
        if failure is not None:
            raise failure
        if message is not None:
            raise BespokeError(f"the main process failed: {message}")
    return result


@contextlib.contextmanager
def _seeded_global_rng(base: Base, jobs: Sequence[PreparedJob]) -> Iterator[None]:
    """torch's global generator seeded from the jobs' seeds for the run, the caller's restored after.

    Batches, noise and LoRA init draw from generators of their own; what draws from the global one is
    LoRA dropout (peft's ``nn.Dropout``), so without this equal seeds gave different adapters whenever
    dropout was on. Checkpoints save and restore this state, so a resumed run draws the same masks.
    """
    devices = [base.device.index or 0] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence([job.seed for job in jobs]).generate_state(1, np.uint64)[0]))
        yield


def _train(base, lora: Attachment, jobs, class_sets, cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, identity: str, report, on_validation) -> tuple[list[list[float]], float]:
    """Set up data, optimizer and accelerate, then run the steps; returns each user's loss curve and the steps' seconds."""
    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    fit = functools.partial(fit_prompt, lora.tokenizers["tokenizer"])  # long captions are cut (with a warning)
    data = TrainingData(jobs, class_sets, base.pipe.vae, cfg, accelerator.device, scheduler.config.num_train_timesteps, fit)
    if cfg.gradient_checkpointing:
        lora.enable_gradient_checkpointing()
    trainable = lora.trainable_models()
    if cfg.mixed_precision != "no":
        cast_training_params(list(trainable.values()), dtype=torch.float32)  # LoRA in fp32, the base in half
    groups, user_params = _param_groups(lora, cfg, len(jobs))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    *prepared, optimizer = accelerator.prepare(*trainable.values(), optimizer)
    models = dict(zip(trainable, prepared))
    every_param = [p for params in user_params for p in params]
    ema = EMAModel(every_param, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None
    _register_checkpoint_hooks(accelerator, ema)  # the average resumes with the optimizer, so a resumed run ends on the same one

    encode = PromptEncoder(lora.tokenizers, {n: models.get(n, m) for n, m in lora.text_encoders.items()}, base.family, accelerator.device)
    condition = cached(encode, [c for c in data.captions() if not lora.training_changes(c)])
    unet, dtype = models["unet"], base.dtype
    prediction = scheduler.config.prediction_type

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str], time_ids: torch.Tensor) -> torch.Tensor:
        hidden, pooled = condition(captions)
        extra = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(accelerator.device, dtype)}}
        return unet(noisy.to(dtype), timesteps, hidden.to(dtype), **extra).sample

    def user_losses(batch: Batch) -> torch.Tensor:
        """Each user's loss: mean over their instance rows plus prior_weight times mean over class rows."""
        noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        target = {"epsilon": batch.noise, "v_prediction": scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps), "sample": batch.latents}[prediction]
        pred = predict(noisy, batch.timesteps, batch.captions, batch.time_ids)
        if cfg.prior_distill and batch.prior.any():
            rows = batch.prior.to(noisy.device)
            with torch.no_grad(), lora.base_only():
                held = predict(noisy[rows], batch.timesteps[rows], [c for c, p in zip(batch.captions, batch.prior.tolist()) if p], batch.time_ids[batch.prior])
            target = target.clone()
            target[rows] = held.to(target.dtype)
        per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            per_row = per_row * _min_snr_weights(scheduler, batch.timesteps, cfg.min_snr_gamma, prediction)
        return torch.zeros(len(jobs), device=per_row.device).index_add(0, batch.users.to(per_row.device), per_row * batch.weights.to(per_row.device))

    start, curves = _resume(accelerator, run_dir, identity, cfg, len(jobs))
    view = lora.view(base)
    lora.train(True)
    loop_started = time.perf_counter()
    for step in range(start, cfg.steps):
        lr_scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        step_loss = torch.zeros(len(jobs))
        for micro in range(cfg.grad_accum):
            batch = data.batch(step, micro, accelerator.process_index)
            with accelerator.accumulate(*prepared), lora.rows(batch.users.tolist()):
                losses = user_losses(batch)
                seen = accelerator.gather(losses.detach()[None]).mean(dim=0).cpu()  # every process sees every loss
                if not torch.isfinite(seen).all():
                    raise _diverged(accelerator, step, seen, run_dir, jobs)
                accelerator.backward(losses.sum())
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()
                    for params in user_params:  # per user: one user's large gradient never shrinks another's step
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if cfg.token_retract and accelerator.sync_gradients:
                    lora.retract_tokens(cfg.token_retract)
            step_loss += seen / cfg.grad_accum
        if ema is not None:
            ema.step(every_param)
        for k in range(len(jobs)):
            curves[k].append(float(step_loss[k]))
        done = step + 1
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(accelerator, run_dir, identity, done, curves, cfg.keep_checkpoints)
        if on_validation is not None and cfg.validation_every and done % cfg.validation_every == 0 and accelerator.is_main_process:
            _validate(view, lora, jobs, cfg, done, accelerator, on_validation)
        if report is not None:  # last: a callback that raises (a cancelled job) leaves this step checkpointed
            report(done, cfg.steps, {"phase": "train", "loss": float(step_loss.mean()), "lr": cfg.lr * lr_scale, "users": len(jobs)})
    lora.train(False)
    if ema is not None:  # the average is what gets evaluated and saved
        ema.copy_to(every_param)
    probe = data.batch(cfg.steps, 0, accelerator.process_index)  # the weights to be registered are checked too
    with torch.no_grad(), lora.rows(probe.users.tolist()):
        seen = accelerator.gather(user_losses(probe)[None]).mean(dim=0).cpu()
    if not torch.isfinite(seen).all():
        raise _diverged(accelerator, cfg.steps, seen, run_dir, jobs)
    return curves, time.perf_counter() - loop_started


def _param_groups(lora: Attachment, cfg: TrainConfig, users: int) -> tuple[list[dict], list[list[torch.nn.Parameter]]]:
    """Optimizer groups per user and kind (own learning rate, B's scaled by LoRA+'s ratio; no weight decay on token embeddings)."""
    ratio = cfg.loraplus_lr_ratio
    settings = {
        "unet_A": (cfg.lr, cfg.weight_decay), "unet_B": (cfg.lr * ratio, cfg.weight_decay),
        "text_A": (cfg.text_lr, cfg.weight_decay), "text_B": (cfg.text_lr * ratio, cfg.weight_decay),
        "tokens": (cfg.token_lr, 0.0),
    }
    groups, per_user = [], []
    for k in range(users):
        params = lora.user_parameters(k)
        alike: dict[tuple[float, float], list[torch.nn.Parameter]] = {}  # one group per setting: fewer optimizer launches
        for kind, setting in settings.items():
            alike.setdefault(setting, []).extend(params[kind])
        groups += [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": decay} for (lr, decay), ps in alike.items() if ps]
        per_user.append([p for ps in params.values() for p in ps])
    return groups, per_user


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) relative to what each target's loss already weights.

    Epsilon loss weighs a timestep like SNR, v-prediction like SNR + 1 and x0 like 1; with a
    zero-terminal-SNR schedule the last timestep has SNR 0, hence the guard for epsilon.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr.clamp(min=1e-8)
    if prediction == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def _diverged(accelerator: Accelerator, step: int, losses: torch.Tensor, run_dir: Path, jobs: Sequence[PreparedJob]) -> TrainingDiverged:
    """The error for a non-finite loss at 0-based ``step``, after removing the checkpoints it makes suspect.

    That loss came from the weights after ``step`` updates, which checkpoint ``step`` holds: the last
    good checkpoint is an earlier one, and a resume must not start from the bad one.
    """
    if accelerator.is_main_process:
        for path, state in _checkpoints(run_dir):
            if state["step"] >= step:
                _remove_checkpoint(path)
    bad = [f"{job.name}: {float(v)}" for job, v in zip(jobs, losses) if not math.isfinite(float(v))]
    last = _latest_checkpoint(run_dir, step - 1)
    kept = f"the last good checkpoint is {last[0]} (step {last[1]['step']})" if last else "no good checkpoint was saved (set checkpoint_every to keep one)"
    return TrainingDiverged(f"training diverged at step {step + 1} (loss {', '.join(bad)}); {kept}; try a lower learning rate")


# --- validation and evaluation ------------------------------------------------------------------


def _validate(view: Base, lora: Attachment, jobs: Sequence[PreparedJob], cfg: TrainConfig, step: int, accelerator: Accelerator, callback: ValidationFn) -> None:
    lora.train(False)
    sampler = Sampler(view)
    for k, job in enumerate(jobs):
        caption = job.examples[0].caption  # already filled: a class word like "{x}" must not be read as a placeholder
        prompt = fill(cfg.validation_prompt, "validation_prompt", trigger=job.trigger, class_word=job.job.class_word) if cfg.validation_prompt else caption
        with lora.using(k), accelerator.autocast():
            images = sampler.generate(prompt, num_images=cfg.num_validation_images, seed=job.seed).images
        callback(Validation(step, job.job.user, job.job.concept, prompt, images))
    lora.train(True)


def _evaluate(base: Base, lora: Attachment, jobs: Sequence[PreparedJob], results: list[TrainResult], accelerator: Accelerator, report) -> None:
    """Run each job's evaluate hook with its adapter live; the finite numbers go into its metrics."""
    todo = [(k, job) for k, job in enumerate(jobs) if job.job.evaluate is not None]
    if not todo:
        return
    sampler = Sampler(lora.view(base))
    if report is not None:  # the phase shows now: each hook samples for a minute before the first count
        report(0, len(todo), {"phase": "evaluate", "job": todo[0][1].name})
    for n, (k, job) in enumerate(todo, 1):
        started = time.perf_counter()
        with lora.using(k), accelerator.autocast():
            numbers = dict(job.job.evaluate(sampler, results[k].adapter))
        results[k].metrics["evaluate_seconds"] = time.perf_counter() - started
        for name, value in numbers.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                results[k].metrics[name] = float(value)
            else:
                warnings.warn(f"evaluation of {job.name}: metric {name!r} = {value!r} is not a finite number and is not recorded", stacklevel=2)
        if report is not None:
            report(n, len(todo), {"phase": "evaluate", "job": job.name})


def _result(base: Base, lora: Attachment, k: int, job: PreparedJob, cfg: TrainConfig, curve: list[float]) -> TrainResult:
    tensors, embeddings = lora.extract(k)
    targets = cfg.unet_targets + (cfg.text_targets if cfg.text_encoder_lora else ())
    adapter = LoraAdapter(
        tensors=tensors, rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(dict.fromkeys(targets)), base_fingerprint=base.fingerprint,
        trigger=job.trigger, class_word=job.job.class_word, new_tokens=job.new_tokens, token_embeddings=embeddings,
        user=job.job.user, concept=job.job.concept,
    )
    tail = curve[-max(1, len(curve) // 10):]
    metrics = {"steps": float(len(curve)), "final_loss": sum(tail) / len(tail)}
    for i in range(LOSS_POINTS):  # the curve, as window means, so a record stays small
        lo, hi = len(curve) * i // LOSS_POINTS, len(curve) * (i + 1) // LOSS_POINTS
        if hi > lo:
            metrics[f"loss/step_{hi:06d}"] = sum(curve[lo:hi]) / (hi - lo)
    return TrainResult(adapter, job.job, curve, metrics, tuple(e.sha256 for e in job.examples), job.seed)


# --- checkpoints --------------------------------------------------------------------------------


def run_identity(base: Base, jobs: Sequence[PreparedJob], cfg: TrainConfig) -> str:
    """A hash of everything that decides the weights except the step count: checkpoints of another identity
    are another run's, never resumed from (an ``output_dir`` may hold one)."""
    settle = {"steps", "validation_every", "validation_prompt", "num_validation_images", "checkpoint_every", "keep_checkpoints", "output_dir", "resume"}
    identity = {
        "base": base.fingerprint,
        "processes": PartialState().num_processes,  # each draws its own rows: another count is another effective batch
        "config": {k: v for k, v in cfg.to_record().items() if k not in settle},
        "jobs": [[j.job.user, j.job.concept, j.seed, [[e.sha256, e.caption] for e in j.examples], j.class_prompt] for j in jobs],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _register_checkpoint_hooks(accelerator: Accelerator, ema: EMAModel | None = None) -> None:
    """accelerate saves and loads the optimizer and RNG state; these hooks make it save only what trains.

    The moving average goes into safetensors here too: ``register_for_checkpointing`` would pickle it
    (``custom_checkpoint_0.pkl``), and accelerate loads those with ``weights_only=False``, so a
    checkpoint folder could run code on resume.
    """

    def trainable(model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save(models, weights, folder) -> None:
        if accelerator.is_main_process:
            state = {f"{i}.{n}": p.detach().float().cpu().contiguous() for i, m in enumerate(models) for n, p in trainable(m).items()}
            save_file(state, str(Path(folder) / LORA_FILE))
            if ema is not None:
                average = {str(i): t.detach().float().cpu().contiguous() for i, t in enumerate(ema.shadow_params)}
                save_file(average, str(Path(folder) / EMA_FILE), metadata={"optimization_step": str(ema.optimization_step)})
        weights.clear()  # the base's weights are never written

    def load(models, folder) -> None:
        state = load_file(str(Path(folder) / LORA_FILE))
        for i, model in enumerate(models):
            for n, p in trainable(model).items():
                if f"{i}.{n}" not in state:
                    raise BespokeError(f"checkpoint {folder} does not match this training job (no {n}); remove it or set resume off")
                with torch.no_grad():
                    p.copy_(state[f"{i}.{n}"])
        if ema is not None:
            _load_average(ema, Path(folder) / EMA_FILE)
        models.clear()  # loaded here; accelerate must not load full models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _load_average(ema: EMAModel, path: Path) -> None:
    """Resume the moving average saved beside the LoRA weights (see :func:`_register_checkpoint_hooks`)."""
    if not path.is_file():  # a checkpoint from before the average was kept here (it was pickled then)
        raise BespokeError(f"checkpoint {path.parent} holds no {EMA_FILE}; remove it or set resume off")
    with safe_open(str(path), framework="pt") as f:
        step, keys = (f.metadata() or {}).get("optimization_step", ""), set(f.keys())
        if not step.isascii() or not step.isdigit() or keys != {str(i) for i in range(len(ema.shadow_params))}:
            raise BespokeError(f"checkpoint file {path} does not hold this job's moving average; remove it or set resume off")
        with torch.no_grad():
            for i, shadow in enumerate(ema.shadow_params):
                shadow.copy_(f.get_tensor(str(i)))
    ema.optimization_step = int(step)


def _read_state(path: Path) -> dict | None:
    """A checkpoint's state, or None while it is incomplete (no state file yet, or one cut short by a kill)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def _checkpoints(run_dir: Path) -> list[tuple[Path, dict]]:
    """Complete checkpoints with their states, oldest first."""
    found = [(path, state) for path in run_dir.glob("checkpoint-*") if (state := _read_state(path)) is not None]
    return sorted(found, key=lambda c: c[1]["step"])


def _remove_checkpoint(path: Path) -> None:
    (path / STATE_FILE).unlink(missing_ok=True)  # first: a half-removed folder must never look complete
    shutil.rmtree(path, ignore_errors=True)


def _latest_checkpoint(run_dir: Path, max_step: float) -> tuple[Path, dict] | None:
    usable = [c for c in _checkpoints(run_dir) if c[1]["step"] <= max_step]
    return usable[-1] if usable else None


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, identity: str, step: int, curves: list[list[float]], keep: int) -> None:
    path = run_dir / f"checkpoint-{step:06d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path / f".{STATE_FILE}.tmp"  # written whole, then renamed: a kill mid-write leaves no half state
        tmp.write_text(json.dumps({"step": step, "run": identity, "loss_curves": curves}))
        os.replace(tmp, path / STATE_FILE)
        for old, _ in _checkpoints(run_dir)[:-keep]:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, run_dir: Path, identity: str, cfg: TrainConfig, users: int) -> tuple[int, list[list[float]]]:
    """(first step, loss curves so far): from the latest checkpoint of this run when resuming, else (0, empty).

    A folder holding another run's checkpoints is refused either way: resuming would mix the two
    runs, and starting over would delete or overwrite the other's (their folders share names).
    Without resume this run's own earlier checkpoints are removed, so they cannot outrank the new ones.
    """
    if not run_dir.is_dir():
        return 0, [[] for _ in range(users)]
    found = _checkpoints(run_dir)
    other = next((path for path, state in found if state.get("run") != identity), None)
    if other is not None:
        raise BespokeError(
            f"{other} is a checkpoint of another training run (other photos, options, users or process count, or an "
            "earlier version of bespoke); give another output folder or remove it"
        )
    if not cfg.resume:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path, _ in found:
                _remove_checkpoint(path)
        accelerator.wait_for_everyone()
        return 0, [[] for _ in range(users)]
    latest = _latest_checkpoint(run_dir, cfg.steps)
    if latest is None:
        return 0, [[] for _ in range(users)]
    path, state = latest
    accelerator.load_state(str(path))
    return state["step"], [list(c) for c in state["loss_curves"]]

"""Pretrain the built-in base on the procedural world: VAE, then CLIP text encoder + UNet together.

    python scripts/pretrain_base.py --out runs/pretrain                    # plain python, one process
    accelerate launch scripts/pretrain_base.py --out runs/pretrain         # any accelerate config
    python scripts/pretrain_base.py --out runs/pretrain --ship             # also copy into gen/builtin/base
    python scripts/pretrain_base.py --out runs/more --init-from gen/builtin/base --steps 4000   # train further
    python scripts/pretrain_base.py --out runs/gpu --init-from gen/builtin/base --batch 1024 --lr 1e-3 \
        --mixed-precision bf16 --render-workers 14 --loader-workers 6 --max-minutes 5   # a GPU lease (stage 3)

Recipe (why): the model works in a 4x-downsampled latent space (16x16x4 for 64x64 images) so a
CPU can afford thousands of steps; v-prediction on a zero-terminal-SNR schedule, because epsilon
prediction leaves global colour wrong at high noise (measured, see DESIGN.md); an EMA of the
weights for sampling; 10% empty captions for classifier-free guidance. Every component is a
standard diffusers/transformers class saved in standard pipeline layout, so the result loads
through ``gen.load_base`` like any checkpoint.

Deterministic given the seed and world size; resumable (``accelerate`` state in
``OUT/checkpoint``), with progress bars and a sample grid every ``--sample-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gen import world  # noqa: E402
from gen.base import BUILTIN_BASE_DIR, Base  # noqa: E402
from gen.grid import make_grid  # noqa: E402
from gen.paths import replace_folder  # noqa: E402
from gen.sampler import Sampler  # noqa: E402
from gen.tokenizer import build_clip_tokenizer  # noqa: E402


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    seed: int = 0
    pool_size: int = 40_000  # pre-rendered images (rendering on the fly would cost as much as training)
    # VAE
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_decoder_steps: int = 0  # with --init-from: fine-tune only the decoder (latents, hence the UNet, stay valid)
    object_weight: float = 4.0  # loss weight of object pixels is 1 + this (objects cover ~13% of an image)
    # text encoder + UNet
    steps: int = 4000
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    unet_channels: tuple[int, ...] = (64, 128, 128)
    vae_channels: tuple[int, ...] = (16, 32, 64)
    max_tokens: int = 40  # world captions fit; shorter contexts make cross-attention cheaper
    text_hidden: int = 128
    text_layers: int = 4
    init_from: str = ""  # continue from a saved pipeline folder (e.g. gen/builtin/base) instead of from scratch
    # bookkeeping
    sample_every: int = 500
    sample_steps: int = 25  # denoising steps of the sample grids (the built-in base's default)
    checkpoint_every: int = 250
    threads: int = 0  # torch threads per process; 0 = torch's default
    mixed_precision: str = "no"  # "bf16" on a GPU: autocast for the UNet and text encoder, fp32 master weights
    render_workers: int = 1  # processes rendering the pool (the result does not depend on it)
    loader_workers: int = 0  # processes preparing step batches (captions, tokens, noise) ahead of a GPU
    max_minutes: float = 0.0  # stop the UNet stage after this much wall time (0 = run all steps) and save what there is


# --------------------------------------------------------------------------- models


def build_vae(cfg: PretrainConfig) -> AutoencoderKL:
    """64x64x3 <-> 16x16x4: three blocks, two downsamples."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    )


def build_text_encoder(cfg: PretrainConfig, vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_tokens,
            projection_dim=cfg.text_hidden,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def build_unet(cfg: PretrainConfig) -> UNet2DConditionModel:
    """Lean UNet: convolution only at 16x16, attention at 8x8 and 4x4."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=32,
        norm_num_groups=32,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
    )


# --------------------------------------------------------------------------- data


@dataclass
class Pool:
    """Pre-rendered training images (uint8, N x 3 x 64 x 64), their specs and object masks (bool, N x 64 x 64)."""

    images: torch.Tensor
    specs: list[world.SceneSpec]
    masks: torch.Tensor

    def loss_weights(self, idx: np.ndarray, cfg: PretrainConfig, size: int) -> torch.Tensor:
        """Per-pixel loss weights at ``size`` x ``size``: 1 on background, 1 + object_weight on objects.

        Objects are small, so an unweighted loss is mostly about backgrounds; weighting them is
        what makes class and identity learnable in a CPU budget (measured, see the model card).
        """
        m = self.masks[idx].float().unsqueeze(1)
        m = F.adaptive_max_pool2d(m, size) if size != m.shape[-1] else m
        return 1.0 + cfg.object_weight * m


def render_pool(cfg: PretrainConfig) -> Pool:
    """Pretraining instances in training combinations only.

    Chunks are seeded by their position, so any number of ``render_workers`` gives the same pool:
    the chunk at ``start`` holds what ``world.sample_dataset(n, seed * 1_000_003 + start,
    instances="pretrain", combos="train")`` draws.
    """
    chunk = 2000
    starts = list(range(0, cfg.pool_size, chunk))
    jobs = [(cfg.seed, start, min(chunk, cfg.pool_size - start)) for start in starts]
    images, specs, masks = [], [], []
    with ProcessPoolExecutor(max(1, cfg.render_workers)) as workers:
        for im, sp, m in tqdm(workers.map(_render_chunk, jobs), total=len(jobs), desc="rendering world", unit="chunk"):
            images.append(torch.from_numpy(im).permute(0, 3, 1, 2).contiguous())
            masks.append(torch.from_numpy(m))
            specs += sp
    return Pool(torch.cat(images), specs, torch.cat(masks))


def _render_chunk(job: tuple[int, int, int]) -> tuple[np.ndarray, list[world.SceneSpec], np.ndarray]:
    seed, start, n = job
    rng = np.random.default_rng(seed * 1_000_003 + start)
    specs = [world.sample_spec(rng, instances="pretrain", combos="train") for _ in range(n)]
    images, masks = world.render_batch_with_masks(specs, rng.integers(0, 2**62, size=n))
    return images, specs, masks


def weighted_mean(err: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.expand_as(err)
    return (err * weights).sum() / weights.sum()


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


class StepBatches(torch.utils.data.Dataset):
    """Everything a UNet step needs but the model: a pure function of (seed, step, process).

    Indexed by step, so resuming replays exactly, and DataLoader workers can prepare batches
    (captions, tokens, noise, loss weights) ahead of a GPU without changing them.
    """

    def __init__(self, cfg: PretrainConfig, pool: Pool, tokenizer, means: torch.Tensor, stds: torch.Tensor, process: int, timesteps: int):
        self.cfg, self.pool, self.tokenizer, self.means, self.stds = cfg, pool, tokenizer, means, stds
        self.process, self.timesteps = process, timesteps

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        idx = np.random.default_rng([cfg.seed, step, self.process]).integers(0, len(self.means), size=cfg.batch)
        rng = np.random.default_rng([cfg.seed, step, self.process, 1])
        captions = ["" if rng.random() < cfg.caption_dropout else world.caption(self.pool.specs[i], rng) for i in idx]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        mean = self.means[idx]
        x0 = mean + self.stds[idx] * torch.randn(mean.shape, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.timesteps, (len(idx),), generator=gen)
        return {"ids": ids, "x0": x0, "eps": eps, "t": t, "weights": self.pool.loss_weights(idx, cfg, x0.shape[-1])}


# --------------------------------------------------------------------------- stages


def lr_lambda(cfg: PretrainConfig, total):
    """Warm-up, then cosine to 10%; ``total()`` is read every step, so a time-capped run can shorten it."""

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, total() - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_vae(cfg: PretrainConfig, accel: Accelerator, pool: Pool, out: Path) -> AutoencoderKL:
    """Reconstruction (object-weighted MSE + L1) with a tiny KL term; the latent scale is measured and stored.

    The VAE is small and quick, so the main process trains it alone and the others load it.
    Asking for more ``--vae-steps`` than a saved VAE has seen continues training it. With
    ``--init-from``, the given VAE is kept, and ``--vae-decoder-steps`` fine-tunes its decoder only:
    the encoder, hence the latents the UNet was trained on, stay exactly as they were.
    """
    vae_dir = out / "vae"
    done = json.loads((out / "vae_metrics.json").read_text())["steps"] if (out / "vae_metrics.json").is_file() else 0
    if accel.is_main_process:
        if cfg.init_from and not vae_dir.is_dir():
            AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae").float().save_pretrained(vae_dir)
        total = cfg.vae_decoder_steps if cfg.init_from else cfg.vae_steps
        if done < total:
            _fit_vae(cfg, pool, out, accel.device, done, total, decoder_only=bool(cfg.init_from))
    accel.wait_for_everyone()
    return AutoencoderKL.from_pretrained(vae_dir).to(accel.device).eval()


def _fit_vae(cfg: PretrainConfig, pool: Pool, out: Path, device, start: int, total: int, decoder_only: bool) -> None:
    torch.manual_seed(cfg.seed + start)
    vae = (AutoencoderKL.from_pretrained(out / "vae") if (start or decoder_only) else build_vae(cfg)).to(device)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, lambda: total))
    for _ in range(start):
        sched.step()
    rng = np.random.default_rng([cfg.seed, 7, start])
    bar = tqdm(range(start, total), initial=start, total=total, desc="vae decoder" if decoder_only else "vae")
    for _ in bar:
        idx = rng.integers(0, len(pool.images), cfg.vae_batch)
        x = to_unit(pool.images[idx]).to(device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = (recon - x).pow(2) + 0.5 * (recon - x).abs()
        loss = weighted_mean(err, pool.loss_weights(idx, cfg, world.IMAGE_SIZE).to(device))
        if not decoder_only:
            loss = loss + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = to_unit(pool.images[:1024]).to(device)
        latents = torch.cat([vae.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
        recon = torch.cat([vae.decode(latents[i : i + 256]).sample for i in range(0, len(latents), 256)]).clamp(-1, 1)
    if not decoder_only:
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    psnr = float(-10 * torch.log10(F.mse_loss(recon, sample) / 4))
    read_back = reconstruction_read_back(recon, pool.specs[:1024])
    print(f"vae: reconstruction PSNR {psnr:.1f} dB, latent std {latents.std():.3f}, evaluator on reconstructions {read_back}")
    vae.save_pretrained(out / "vae")
    metrics = {"steps": total, "decoder_only": decoder_only, "psnr_db": psnr, "scaling_factor": vae.config.scaling_factor, "read_back": read_back}
    (out / "vae_metrics.json").write_text(json.dumps(metrics))


def reconstruction_read_back(recon: torch.Tensor, specs: list[world.SceneSpec]) -> dict[str, float]:
    """What the evaluator still reads on reconstructions: the ceiling the VAE puts on the whole model."""
    from gen.evaluator import load_evaluator, read_attributes

    images = recon.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    read = read_attributes(load_evaluator(), images)
    truth = [world.spec_attributes(s) for s in specs]
    return {k: round(float(np.mean([r[k] == t[k] for r, t in zip(read, truth)])), 3) for k in ("class", "position", "count", "object_colour", "accessory")}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pool: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, scaled: training then costs no VAE passes."""
    means, stds = [], []
    for i in tqdm(range(0, len(pool), 512), desc="encoding latents", leave=False):
        dist = vae.encode(to_unit(pool[i : i + 512]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


def make_tokenizer(cfg: PretrainConfig, out: Path):
    rng = np.random.default_rng(cfg.seed)
    captions = [world.caption(world.sample_spec(rng), rng) for _ in range(20_000)]
    tokenizer = build_clip_tokenizer(captions + world.VOCABULARY, str(out / "tokenizer"), num_merges=1500, model_max_length=cfg.max_tokens)
    longest = max(len(ids) for ids in tokenizer(captions).input_ids)
    if longest > cfg.max_tokens:
        raise ValueError(f"world captions need {longest} tokens, more than max_tokens={cfg.max_tokens}")
    return tokenizer


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    sampling = DDIMScheduler.from_config(noise_scheduler().config)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampling,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


SAMPLE_PROMPTS = (
    "a photo of a red mug on a green background",
    "a blue car on the left, white background",
    "two yellow birds under a blue sky",
    "a small house on the right, water background",
    "a cat wearing a hat on orange grass",
    "a large purple robot in the center on a black background",
)


def save_samples(pipe: StableDiffusionPipeline, path: Path, step: int, denoising_steps: int) -> None:
    sampler = Sampler(Base.from_pipeline(pipe, source=f"pretrain step {step}"))
    rows = [sampler.generate(p, num_images=4, seed=0, steps=denoising_steps, guidance_scale=4.0).images for p in SAMPLE_PROMPTS]
    make_grid(rows, row_labels=SAMPLE_PROMPTS, title=f"step {step}").save(path)


def train_diffusion(cfg: PretrainConfig, accel: Accelerator, vae: AutoencoderKL, pool: Pool, out: Path) -> StableDiffusionPipeline:
    torch.manual_seed(cfg.seed + 1)
    if cfg.init_from:
        init = Path(cfg.init_from)
        tokenizer = CLIPTokenizer.from_pretrained(init / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder").float()
        unet = UNet2DConditionModel.from_pretrained(init / "unet").float()
    else:
        tokenizer = make_tokenizer(cfg, out)
        text_encoder = build_text_encoder(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        unet = build_unet(cfg)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    accel.print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    plan = {"steps": cfg.steps}  # with --max-minutes: cut to what fits once the step rate is known, so the schedule still anneals
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, lambda: plan["steps"]))
    unet, text_encoder, opt, sched = accel.prepare(unet, text_encoder, opt, sched)
    accel.register_for_checkpointing(ema)
    ema.to(accel.device)

    ckpt = out / "checkpoint"
    start = 0
    if (ckpt / "step.json").is_file():
        accel.load_state(str(ckpt))
        start = json.loads((ckpt / "step.json").read_text())["step"]
        ema.to(accel.device)  # the loaded EMA state arrives on the CPU
        accel.print(f"resumed from step {start}")
    if start >= cfg.steps:  # nothing to train (a decoder-only run: --steps 0): skip encoding the whole pool
        return ema_pipeline(ema, params, vae, accel.unwrap_model(text_encoder), tokenizer, accel.unwrap_model(unet), keep=True)

    means, stds = encode_pool(vae, pool.images, accel.device)
    noise = noise_scheduler()
    alphas = noise.alphas_cumprod.to(accel.device)
    batches = torch.utils.data.DataLoader(
        StepBatches(cfg, pool, tokenizer, means, stds, accel.process_index, noise.config.num_train_timesteps),
        batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.loader_workers,
        pin_memory=accel.device.type == "cuda", prefetch_factor=4 if cfg.loader_workers else None,
    )
    log = []
    bar = tqdm(zip(range(start, cfg.steps), batches), initial=start, total=cfg.steps, desc="unet+text", disable=not accel.is_main_process)
    t0 = time.time()
    for step, b in bar:
        ids, x0, eps, t, weights = (b[k].to(accel.device, non_blocking=True) for k in ("ids", "x0", "eps", "t", "weights"))
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * x0 + s * eps
        target = a * eps - s * x0  # v
        with accel.accumulate(unet):
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, cond).sample
            loss = weighted_mean((pred.float() - target.float()).pow(2), weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}; last good checkpoint is in {ckpt}")
            accel.backward(loss)
            accel.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        ema.step(params)
        log.append((step, loss.item()))
        bar.set_postfix(loss=f"{np.mean([l for _, l in log[-50:]]):.4f}")
        done = step + 1
        elapsed = time.time() - t0
        if cfg.max_minutes and done == start + 50:
            warm = elapsed  # the first steps pay for loader start-up and kernel selection: time the next 50
        if cfg.max_minutes and done == start + 100:
            rate = 50 / (elapsed - warm)
            fits = done + int(0.95 * (60 * cfg.max_minutes - elapsed) * rate)
            plan["steps"] = int(accel.gather(torch.tensor([min(cfg.steps, fits)], device=accel.device)).min())
            accel.print(f"{rate:.1f} steps/s: planning {plan['steps']} of {cfg.steps} steps in {cfg.max_minutes} minutes")
        out_of_time = cfg.max_minutes and bool(accel.gather(torch.tensor([elapsed > 60 * cfg.max_minutes], device=accel.device)).any())
        finished = done >= plan["steps"] or out_of_time
        if done % cfg.checkpoint_every == 0 or finished:
            accel.save_state(str(ckpt))
            if accel.is_main_process:
                (ckpt / "step.json").write_text(json.dumps({"step": done}))
                with open(out / "loss.jsonl", "a") as f:
                    f.writelines(json.dumps({"step": s_, "loss": l_}) + "\n" for s_, l_ in log)
                log.clear()
        if accel.is_main_process and done % cfg.sample_every == 0 and not finished:
            pipe = ema_pipeline(ema, params, vae, accel.unwrap_model(text_encoder), tokenizer, accel.unwrap_model(unet))
            save_samples(pipe, out / f"samples_{done:06d}.png", done, cfg.sample_steps)
            accel.print(f"step {done}: {time.time() - t0:.0f}s, samples in {out}/samples_{done:06d}.png")
        if finished:
            if done < cfg.steps:
                accel.print(f"stopped at step {done} of {cfg.steps} after {elapsed / 60:.1f} minutes (--max-minutes {cfg.max_minutes})")
            break
    accel.wait_for_everyone()
    return ema_pipeline(ema, params, vae, accel.unwrap_model(text_encoder), tokenizer, accel.unwrap_model(unet), keep=True)


def ema_pipeline(ema, params, vae, text_encoder, tokenizer, unet, keep: bool = False) -> StableDiffusionPipeline:
    """A pipeline with the EMA weights; unless ``keep``, the training weights are restored after use."""
    if keep:
        ema.copy_to(params)
        return assemble_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval())
    import copy

    ema.store(params)
    ema.copy_to(params)
    pipe = assemble_pipeline(copy.deepcopy(vae), copy.deepcopy(text_encoder).eval(), tokenizer, copy.deepcopy(unet).eval())
    ema.restore(params)
    return pipe


def save_base(pipe: StableDiffusionPipeline, cfg: PretrainConfig, out: Path, argv: list[str]) -> Path:
    """Save in diffusers layout with float16 weights (half the size; loading upcasts as asked)."""
    final = out / "base"

    def write(folder: Path) -> None:
        try:
            pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        finally:
            pipe.to(torch.float32)
        (folder / "bespoke.json").write_text(
            json.dumps(
                {
                    "sampling": {"steps": 25, "guidance_scale": 4.0, "scheduler": "ddim"},
                    "recipe": {"command": "python scripts/pretrain_base.py " + " ".join(argv), "config": asdict(cfg)},
                },
                indent=2,
            )
        )

    replace_folder(final, write)
    return final


def ship_base(final: Path, dest: Path = BUILTIN_BASE_DIR) -> None:
    """Copy a saved base over the shipped one; a crash midway keeps the shipped one as it was."""
    replace_folder(dest, lambda folder: shutil.copytree(final, folder))


def comma_separated_ints(text: str) -> tuple[int, ...]:
    """``"64,128,128"`` -> ``(64, 128, 128)``; argparse names this function in its error for anything else."""
    return tuple(int(x) for x in text.split(","))


# Settings that must be at least 1 / at least 0: a zero batch, interval or pool otherwise fails with a raw
# IndexError or ZeroDivisionError minutes into a run, and a negative step count silently saves an untrained base.
_AT_LEAST_ONE = ("pool_size", "vae_batch", "batch", "sample_every", "sample_steps", "checkpoint_every", "max_tokens", "text_hidden", "text_layers")
_AT_LEAST_ZERO = ("seed", "vae_steps", "vae_decoder_steps", "steps", "warmup", "threads", "render_workers", "loader_workers", "max_minutes")
# Settings a resumed run may change: how long it trains and how the work is spread, not what it learns from.
RESUMABLE_CHANGES = frozenset({"out", "steps", "vae_steps", "vae_decoder_steps", "sample_every", "sample_steps", "checkpoint_every",
                               "threads", "mixed_precision", "render_workers", "loader_workers", "max_minutes"})


def _config_errors(cfg: PretrainConfig) -> list[str]:
    """What is wrong with ``cfg``, checked before any work (rendering the pool alone takes minutes)."""
    errors = [f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}" for name in _AT_LEAST_ONE if getattr(cfg, name) < 1]
    errors += [f"--{name.replace('_', '-')} must be at least 0, not {getattr(cfg, name)}" for name in _AT_LEAST_ZERO if getattr(cfg, name) < 0]
    for name in ("lr", "vae_lr"):
        if not getattr(cfg, name) > 0:
            errors.append(f"--{name.replace('_', '-')} must be positive, not {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout <= 1:
        errors.append(f"--caption-dropout must be between 0 and 1, not {cfg.caption_dropout}")
    if not 0 <= cfg.ema_decay < 1:
        errors.append(f"--ema-decay must be in [0, 1), not {cfg.ema_decay}")
    for name in ("unet_channels", "vae_channels"):
        if not getattr(cfg, name) or min(getattr(cfg, name)) < 1:
            errors.append(f"--{name.replace('_', '-')} must be positive channel counts, not {getattr(cfg, name)}")
    if cfg.init_from:
        missing = [part for part in ("vae", "text_encoder", "tokenizer", "unet") if not (Path(cfg.init_from) / part).is_dir()]
        if missing:
            errors.append(f"--init-from {cfg.init_from} is not a saved base (no {', '.join(missing)} folder)")
    return errors


def _resume_conflicts(cfg: PretrainConfig, out: Path) -> list[str]:
    """Settings that differ from the run already in ``out``: resuming it would mix two runs (or fail loading its state)."""
    started = (out / "vae_metrics.json").is_file() or (out / "checkpoint" / "step.json").is_file()
    if not started or not (out / "config.json").is_file():
        return []
    saved = json.loads((out / "config.json").read_text())
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as saved
    return [f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]


def parse_args(argv: list[str]) -> tuple[PretrainConfig, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every option is a field of PretrainConfig (see its comments). A run into an --out that already holds a run "
        "resumes it; only " + ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUMABLE_CHANGES - {"out"})) + " may differ then.",
    )
    for f in fields(PretrainConfig):
        kind = type(f.default)
        if kind is tuple:
            parser.add_argument("--" + f.name.replace("_", "-"), type=comma_separated_ints, default=f.default)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    parser.add_argument("--ship", action="store_true", help="copy the result into gen/builtin/base")
    args = parser.parse_args(argv)
    ship = args.__dict__.pop("ship")
    cfg = PretrainConfig(**vars(args))
    errors = _config_errors(cfg)  # refused now rather than at the first sample grid or checkpoint, hours into a run
    if errors:
        parser.error("; ".join(errors))
    conflicts = _resume_conflicts(cfg, Path(cfg.out))
    if conflicts:
        parser.error(f"{cfg.out} holds a run with other settings ({'; '.join(conflicts)}); use another --out, or the same settings to resume it")
    return cfg, ship


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg, ship = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accel = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pool = render_pool(cfg)
    vae = train_vae(cfg, accel, pool, out)
    pipe = train_diffusion(cfg, accel, vae, pool, out)
    if accel.is_main_process:
        final = save_base(pipe, cfg, out, argv)
        print(f"saved {final}")
        done = out / "checkpoint" / "step.json"  # absent after a decoder-only run (--steps 0)
        step = json.loads(done.read_text())["step"] if done.is_file() else 0
        save_samples(pipe, out / f"samples_{step:06d}.png", step, cfg.sample_steps)
        if ship:
            ship_base(final)
            print(f"shipped to {BUILTIN_BASE_DIR}")


if __name__ == "__main__":
    main()

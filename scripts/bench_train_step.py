"""Training-step benchmark: our DreamBooth-LoRA step against the diffusers recipe; prints a table, writes JSON.

    python scripts/bench_train_step.py            # CUDA: SD1.5 UNet at 512 px and SDXL at 1024 px, fp16
    python scripts/bench_train_step.py --quick    # smoke mode: tiny pipelines on the CPU (seconds)

Full-size pipelines are built from their configs with random weights: step time and memory do
not depend on the weights. Both sides train rank-4 LoRA on to_q/to_k/to_v/to_out.0 at batch 1
with fp16 mixed precision (LoRA weights in fp32, the base in fp16), no prior preservation, in
the same process, one after the other, on the same pipeline weights.

* ours: ``adapters.train.train_adapters`` itself, timed per step through its progress callback
  (latents and prompt embeddings are computed once, since the VAE and text side are frozen);
* diffusers: the step of ``train_dreambooth_lora.py`` / ``train_dreambooth_lora_sdxl.py`` with
  their defaults: VAE encode every step (fp16 for SD1.x, fp32 for SDXL as that script does), text
  encoder every step for SD1.x (no ``--pre_compute_text_embeddings``), prompt embeddings computed
  once for SDXL, ``unet.add_adapter`` with gaussian init, accelerate fp16 autocast, clipping, AdamW.

Reported: median seconds per step after warm-up, the ratio, and peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.samples import sample_subject_images  # noqa: E402
from adapters.train import TrainJob, resolve_config, train_adapters  # noqa: E402
from gen.base import Base  # noqa: E402
from gen.lora_targets import UNET_TARGETS  # noqa: E402
from gen.tiny import TinyConfig, build_tiny_pipeline  # noqa: E402
from gen.tokenizer import build_clip_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import SD15_UNET, SDXL_UNET  # noqa: E402

SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    steps: int
    warmup: int


def text_config(tokenizer, sizes: dict) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **sizes)


def full_size_pipeline(family: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """SD1.5 or SDXL at full size with random weights and a small own tokenizer (its vocabulary size hardly matters)."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer("a photo of sks dog toy robot on the beach".split(), str(workdir / "tokenizer"), num_merges=50)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    with torch.device(device):
        vae = AutoencoderKL(sample_size=1024 if family == "sdxl" else 512, **SD_VAE)
        text_encoder = CLIPTextModel(text_config(tokenizer, CLIP_L))
        if family == "sd":
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer, CLIP_BIGG)),
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler,
            )
    return pipe.to(dtype)


def tiny_pipeline(family: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    return build_tiny_pipeline(family, TinyConfig()).to(device, dtype)


def photos(size: int, n: int = 4) -> list:
    return [im.resize((size, size)) for im in sample_subject_images("robot-3", n)]


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.gib = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")


def ours(pipe, case: Case, size: int, mixed: str, workdir: Path) -> dict:
    """Our trainer as users run it; the progress callback stamps each finished step."""
    base = Base.from_pipeline(pipe, f"random {case.name}")
    cfg = resolve_config(
        base, "balanced", rank=4, alpha=4.0, steps=case.steps, batch_size=1, prior_preservation=False, new_token=False,
        text_encoder_lora=False, trigger="sks", lr=1e-4, warmup_steps=0, validation_every=0, checkpoint_every=0,
        mixed_precision=mixed, resolution=size, output_dir=str(workdir / "ours"), unet_targets=UNET_TARGETS,
        gradient_checkpointing=False,  # the SDXL preset turns it on; the diffusers scripts' default is off
    )
    stamps: list[float] = []

    def progress(done: int, total: int, info: dict) -> None:
        if info.get("phase") == "train":
            stamps.append(time.perf_counter())

    with PeakMemory(base.device) as peak:
        train_adapters(base, [TrainJob("bench", "subject", photos(size), "toy")], cfg, progress=progress)
    steps = [b - a for a, b in zip(stamps, stamps[1:])][case.warmup :]
    return {"step_s": statistics.median(steps), "peak_gib": peak.gib, "timed_steps": len(steps)}


def diffusers_recipe(pipe, case: Case, size: int, mixed: str) -> dict:
    """The inner loop of diffusers' DreamBooth-LoRA scripts (defaults), on the same pipeline."""
    device = pipe.unet.device
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    unet, vae = pipe.unet, pipe.vae
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if case.family == "sdxl":
        vae.to(torch.float32)  # the SDXL script keeps the VAE in fp32 against NaNs
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS)))
    if mixed == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in photos(size)]).to(device).float().div(127.5).sub(1)
    ids = pipe.tokenizer(["a photo of sks toy"], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
    extra = {}
    if case.family == "sdxl":  # prompt embeddings once (no text-encoder training, one instance prompt)
        with torch.no_grad():
            first = pipe.text_encoder(ids, output_hidden_states=True)
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
        fixed_hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=pipe.unet.dtype)
        extra = {"added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": time_ids}}
    stamps: list[float] = []
    unet.train()
    with PeakMemory(device) as peak:
        for step in range(case.steps):
            x = pixels[step % len(pixels)][None]
            latents = vae.encode(x.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            noisy = scheduler.add_noise(latents, noise, t).to(pipe.text_encoder.dtype)
            hidden = fixed_hidden if case.family == "sdxl" else pipe.text_encoder(ids)[0]
            pred = unet(noisy, t, hidden, return_dict=False, **extra)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the scripts log the loss every step, which waits for the GPU
            stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])][case.warmup :]
    return {"step_s": statistics.median(steps), "peak_gib": peak.gib, "timed_steps": len(steps)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny pipelines on the CPU")
    parser.add_argument("--out", default="runs/bench_train_step.json")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 30, quick: 4)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    quick = args.quick or not torch.cuda.is_available()
    if quick and not args.quick:
        print("no CUDA GPU: running the smoke mode on the CPU (tiny pipelines); full-size rows need a GPU")
    device, dtype, mixed = (torch.device("cpu"), torch.float32, "no") if quick else (torch.device("cuda"), torch.float16, "fp16")
    steps = args.steps or (4 if quick else 30)
    warmup = 1 if quick else 5
    if steps < warmup + 2:  # the median is over the steps after the warm-up ones
        parser.error(f"--steps must be at least {warmup + 2} here ({warmup} warm-up steps are dropped), got {steps}")
    cases = [Case("sd15", "sd", steps, warmup), Case("sdxl", "sdxl", steps, warmup)]
    build = tiny_pipeline if quick else full_size_pipeline
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": card, "torch": torch.__version__, "rank": 4, "batch": 1, "precision": mixed, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            workdir = Path(tmp) / case.name
            workdir.mkdir()
            pipe = build(case.family, device, dtype, workdir)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            ours_row = ours(pipe, case, size, mixed, workdir)
            del pipe
            free(device)
            pipe = build(case.family, device, dtype, workdir)
            theirs = diffusers_recipe(pipe, case, size, mixed)
            del pipe
            free(device)
            result["models"][case.name] = {"size": size, "ours": ours_row, "diffusers": theirs, "speedup": theirs["step_s"] / ours_row["step_s"]}
            Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\ntraining step, rank 4, batch 1, {mixed}, on {card}")
    print(f"{'model':12s}{'size':>6s}{'ours s/step':>13s}{'diffusers':>11s}{'speedup':>9s}{'ours GiB':>10s}{'diffusers GiB':>15s}")
    for name, r in result["models"].items():
        print(f"{name:12s}{r['size']:>6d}{r['ours']['step_s']:>13.4f}{r['diffusers']['step_s']:>11.4f}{r['speedup']:>8.2f}x{r['ours']['peak_gib']:>10.2f}{r['diffusers']['peak_gib']:>15.2f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Tiny SD1.x- and SDXL-like pipelines, built offline from configs.

Tests and benchmarks need real pipelines of both families without downloading anything. These
are the standard diffusers/transformers classes at toy sizes with seeded random weights, saved
in the standard pipeline layout so they load through exactly the path a real checkpoint takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from gen.tokenizer import build_clip_tokenizer

# A small corpus so common prompt words are single tokens; anything else falls back to bytes.
_CORPUS = (
    "a photo of an the on in with and at by wearing red orange yellow green blue purple white black "
    "brown pink grey gray dog cat toy robot mug car house bird teddy bear hat bow beach grass water sky "
    "left right center top bottom small large big tiny two one background picture painting style"
).split()


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny pipeline; the defaults build in about a second and sample 64x64 images."""

    sample_size: int = 16  # latent side; images are sample_size * 4 pixels (4x VAE), the built-in world's 64
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    seed: int = 0


def _text_config(vocab_size: int, hidden: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae(cfg: TinyConfig) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.sample_size * 4,
    )


def _unet(cfg: TinyConfig, **extra) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def build_tiny_pipeline(family: str = "sd", cfg: TinyConfig = TinyConfig()):
    """Build a tiny ``StableDiffusionPipeline`` (family "sd") or ``StableDiffusionXLPipeline`` ("sdxl")."""
    import tempfile

    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(_CORPUS, tmp, num_merges=400)
    vocab = len(tokenizer)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    text_encoder = CLIPTextModel(_text_config(vocab, cfg.text_hidden, cfg.text_layers))
    if family == "sd":
        return StableDiffusionPipeline(
            vae=_vae(cfg),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_unet(cfg, cross_attention_dim=cfg.cross_attention_dim),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        hidden2 = cfg.text_hidden
        time_dim = 8
        unet = _unet(
            cfg,
            cross_attention_dim=cfg.text_hidden + hidden2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + hidden2,
            transformer_layers_per_block=1,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(cfg),
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab, hidden2, cfg.text_layers)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    raise ValueError(f"unknown tiny pipeline family {family!r}; expected 'sd' or 'sdxl'")


def save_tiny_pipeline(out_dir: str, family: str = "sd", cfg: TinyConfig = TinyConfig()) -> str:
    """Build a tiny pipeline and save it (safetensors) in diffusers layout; returns ``out_dir``."""
    build_tiny_pipeline(family, cfg).save_pretrained(out_dir, safe_serialization=True)
    return os.fspath(out_dir)

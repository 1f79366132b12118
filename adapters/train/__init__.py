"""The LoRA trainer: DreamBooth-LoRA with prior preservation, optional text-encoder LoRA and new tokens.

Modules: ``config`` (options, presets per base profile, command-line flags), ``data`` (jobs, class
images, cached latents and prompts, batches), ``lora`` (peft layers for K users on a borrowed base,
restored exactly), ``loop`` (the training loop, checkpoints), ``api`` (``personalize``).
"""

from adapters.train.api import personalize, personalize_many, register
from adapters.train.config import PRESET_NAMES, PRESETS, TrainConfig, profile_of, resolve_config
from adapters.train.data import TrainJob, class_images
from adapters.train.loop import TrainingDiverged, TrainResult, Validation, train_adapters

__all__ = [
    "PRESETS", "PRESET_NAMES", "TrainConfig", "TrainJob", "TrainResult", "TrainingDiverged", "Validation",
    "class_images", "personalize", "personalize_many", "profile_of", "register", "resolve_config", "train_adapters",
]

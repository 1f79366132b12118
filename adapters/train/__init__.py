"""The LoRA trainer: DreamBooth-LoRA with prior preservation, optional text-encoder LoRA and new tokens.

Modules: ``config`` (options, presets per base profile, command-line flags), ``data`` (jobs, class
images, cached latents and prompts, batches), ``lora`` (peft layers for K users on a borrowed base,
restored exactly), ``loop`` (the training loop, checkpoints), ``api`` (``personalize``).

The names below import on first use, so building the CLI's flags (``adapters.train.config``) does
not pay for importing diffusers, peft and accelerate.
"""

from importlib import import_module

_EXPORTS = {
    "personalize": "adapters.train.api",
    "personalize_many": "adapters.train.api",
    "register": "adapters.train.api",
    "PRESETS": "adapters.train.config",
    "PRESET_NAMES": "adapters.train.config",
    "TrainConfig": "adapters.train.config",
    "profile_of": "adapters.train.config",
    "resolve_config": "adapters.train.config",
    "TrainJob": "adapters.train.data",
    "class_images": "adapters.train.data",
    "TrainResult": "adapters.train.loop",
    "TrainingDiverged": "adapters.train.loop",
    "Validation": "adapters.train.loop",
    "train_adapters": "adapters.train.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adapters.train' has no attribute {name!r}")

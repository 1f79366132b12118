"""Shared by the demo's tests: the demo service on the built-in base with every cost cut to the bone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.fidelity import FidelitySettings
from demo.service import DemoService, DemoSettings
from demo.uploads import UploadLimits
from gen.base import load_base

# Class images, validation and evaluation sample 2 steps; uploads are capped low so refusals are cheap to provoke.
TINY = dict(
    train_options={"num_class_images": 2, "class_image_steps": 2},
    fidelity=FidelitySettings(prompts=2, images_per_prompt=1, prior_images=2, steps=2),
    validation_rounds=2,
    validation_images=1,
    limits=UploadLimits(max_file_bytes=200_000, max_pixels=1_000_000),
)


def tiny_service(root: Path, *, auth: bool) -> DemoService:
    return DemoService(lambda: load_base("builtin"), DemoSettings(outputs=root / "outputs", registry=root / "registry", auth=auth, **TINY))


@contextlib.contextmanager
def gradio_env(root: Path) -> Iterator[None]:
    """Gradio's upload cache under the test's outputs, and no analytics calls."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "outputs" / ".gradio"))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        yield

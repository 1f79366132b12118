"""Provenance: enough about each image to reproduce it alone, stored with the image.

Every generated image carries one record: which base (and its fingerprint), which adapters in
which versions, its own seed and the sampling settings. PNGs carry it in a text chunk, so an
image file is its own receipt; a JSON sidecar lists a whole batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from gen.errors import InvalidRequest

PNG_KEY = "bespoke-provenance"


@dataclass(frozen=True)
class Provenance:
    """How one image was made."""

    base: str
    base_fingerprint: str
    prompt: str
    negative_prompt: str | None
    seed: int
    scheduler: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    adapters: tuple[dict, ...] = ()
    user: str | None = None
    package_version: str = field(default_factory=lambda: _package_version())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Provenance:
        known = cls.__dataclass_fields__
        clean = {k: v for k, v in data.items() if k in known}
        clean["adapters"] = tuple(clean.get("adapters", ()))
        return cls(**clean)

    def generate_kwargs(self) -> dict:
        """Arguments for ``Sampler.generate`` that reproduce exactly this image.

        The user and style come back, and every adapter is pinned to the version that was used
        (``versions``), so a replay never silently picks up a newer ``latest``.
        """
        styles = [a for a in self.adapters if a.get("kind") == "style"]
        versions = {a["concept"]: a["version"] for a in self.adapters if isinstance(a.get("version"), int)}
        return dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            num_images=1,
            seed=self.seed,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            height=self.height,
            width=self.width,
            user=self.user,
            style=f"{styles[0]['concept']}:{styles[0]['weight']!r}" if styles else None,
            versions=versions or None,
        )


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bespoke-diffusion")
    except PackageNotFoundError:
        return "unknown"


def save_png(image: Image.Image, provenance: Provenance, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG with its provenance in a text chunk (atomically: no half files)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(provenance.to_dict()))
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_provenance(path: str | os.PathLike) -> Provenance:
    """Read the provenance back from a PNG written by :func:`save_png`."""
    with Image.open(path) as im:
        text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
    if text is None:
        raise InvalidRequest(f"{path} carries no bespoke provenance")
    return Provenance.from_dict(json.loads(text))

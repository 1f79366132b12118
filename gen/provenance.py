"""Provenance: enough about each image to reproduce it alone, stored with the image.

Every generated image carries one record: which base (and its fingerprint), which adapters in
which versions, its own seed and the sampling settings. PNGs carry it in a text chunk, so an
image file is its own receipt; a JSON sidecar lists a whole batch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from gen.errors import InvalidRequest

PNG_KEY = "bespoke-provenance"
MAX_RECORD_CHARS = 256 * 1024  # a record is a prompt plus a few hundred bytes; anything far larger was not written here

# The fields a record must carry and the JSON types each may hold: a replay feeds them straight to the sampler.
_FIELDS: dict[str, tuple[type, ...]] = {
    "base": (str,), "base_fingerprint": (str,), "prompt": (str,), "negative_prompt": (str, type(None)),
    "seed": (int,), "scheduler": (str,), "steps": (int,), "guidance_scale": (int, float), "height": (int,), "width": (int,),
}
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "adapters": (list,), "user": (str, type(None)), "package_version": (str,), "dtype": (str, type(None)), "device": (str, type(None)),
}


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
    # The arithmetic the image came from: the same seed in bfloat16, or on another device, moves pixels by a few
    # levels. Records written before these fields existed read as None (unknown).
    dtype: str | None = None  # "float32", "float16", "bfloat16"
    device: str | None = None  # the device type: "cpu", "cuda", "mps"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Provenance:
        """A record read back from a file, checked field by field: an image's text chunk is anyone's to write."""
        if not isinstance(data, dict):
            raise InvalidRequest(f"provenance must be a JSON object, not {type(data).__name__}")
        for name, types in (*_FIELDS.items(), *_OPTIONAL_FIELDS.items()):
            if name not in data and name in _OPTIONAL_FIELDS:
                continue
            if name not in data:
                raise InvalidRequest(f"provenance has no {name!r}")
            _check_type(name, data[name], types)
        if not math.isfinite(data["guidance_scale"]):
            raise InvalidRequest(f"provenance field 'guidance_scale' must be finite, got {data['guidance_scale']!r}")
        clean = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        clean["guidance_scale"] = float(clean["guidance_scale"])
        clean["adapters"] = tuple(_check_adapter(i, a) for i, a in enumerate(clean.get("adapters", ())))
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


def arithmetic(base) -> dict[str, str]:
    """The ``dtype`` and ``device`` fields for images made on ``base`` (a :class:`gen.base.Base`)."""
    return {"dtype": str(base.dtype).removeprefix("torch."), "device": base.device.type}


def replay_differences(provenance: Provenance, base) -> list[str]:
    """What differs between the run that made an image and a ``base`` about to replay it.

    Settings replay exactly (:meth:`Provenance.generate_kwargs`); the weights and their arithmetic
    belong to the loaded base, so a replay can only say where they differ.
    """
    here = arithmetic(base)
    made = {name: getattr(provenance, name) for name in here}
    return [f"{name} {made[name]} (replaying in {here[name]})" for name in here if made[name] is not None and made[name] != here[name]]


def _check_type(name: str, value: object, types: tuple[type, ...]) -> None:
    """``value`` is one of ``types``; a bool is never a number (JSON's true is not a seed)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise InvalidRequest(f"provenance field {name!r} must be {expected}, got {type(value).__name__} {value!r:.60}")


def _check_adapter(index: int, adapter: object) -> dict:
    """One adapter entry: a concept name, an optional whole version, and a weight where a style needs one."""
    name = f"adapters[{index}]"
    _check_type(name, adapter, (dict,))
    _check_type(f"{name}.concept", adapter.get("concept"), (str,))
    for key, types in (("kind", (str,)), ("user", (str, type(None))), ("version", (int, str, type(None))), ("weight", (int, float))):
        if key in adapter:
            _check_type(f"{name}.{key}", adapter[key], types)
    if adapter.get("kind") == "style" and "weight" not in adapter:
        raise InvalidRequest(f"provenance field '{name}.weight' is missing for a style")
    return adapter


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
    """Read the provenance back from a PNG written by :func:`save_png`; anything else raises :class:`InvalidRequest`."""
    try:
        with Image.open(path) as im:
            text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
    except (OSError, ValueError) as e:  # not an image, or a text chunk past Pillow's decompression cap
        raise InvalidRequest(f"cannot read provenance from {path}: {e}") from e
    if text is None:
        raise InvalidRequest(f"{path} carries no bespoke provenance")
    if len(text) > MAX_RECORD_CHARS:
        raise InvalidRequest(f"{path}: provenance of {len(text)} characters is too large to be a record (at most {MAX_RECORD_CHARS})")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and over-long integers
        raise InvalidRequest(f"{path}: provenance is not valid JSON: {e}") from e
    return Provenance.from_dict(data)

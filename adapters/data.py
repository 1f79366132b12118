"""User photos in, training examples out: validate, orient, convert, crop, caption, fingerprint.

Photos come from users, so every file is untrusted: only JPEG, PNG and WebP are decoded (PIL is
told so, which keeps its other, rarer parsers away from user bytes), the pixel count is checked
from the header before any decoding (a decompression bomb is refused, never decoded), and every
file is fully decoded up front so a truncated or corrupt file fails here rather than mid-training.
All problems are collected and reported together, by file name, so a user fixes a folder in one go.
Names are shown with control and bidirectional-override characters escaped, so a crafted name
(``photo\u202egnp.exe``) cannot disguise itself in an error message.

Phones store orientation in EXIF rather than in the pixels, so it is applied first; then any mode
(RGBA, LA, P or colour-keyed RGB and L with transparency, grayscale, CMYK, 16-bit) becomes 8-bit RGB, transparent areas
composited on white. Each image is center-cropped to a square and resized to the base's
resolution. The crop is recorded because SDXL conditions on the original size and crop offset.

A fingerprint is the SHA-256 of the file's bytes (of the raw pixels, mode and size for images
passed in memory): the registry records these, never the images.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import string
import struct
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gen.errors import BespokeError, InvalidRequest

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")  # the JPEG opener also reads MPO, the multi-picture JPEG of many cameras
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_CAPTION_CHARS = 2000  # far past any text encoder's limit (77 tokens); longer text is an error, not a caption
# Magic numbers of formats users commonly send, to name them when they are refused or damaged.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x80", "pickle"), (b"PK\x03\x04", "zip"), (b"%PDF", "PDF"),
)
ImageSource = str | os.PathLike | Image.Image
# EXIF orientation -> the transpose that makes the pixels upright (as PIL's ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


class InvalidImages(BespokeError):
    """Some of the user's images cannot be used; the message lists every bad file and why."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a user may upload for one concept."""

    min_images: int = 1
    max_images: int = 50
    max_pixels: int = 64_000_000  # larger than any phone photo (48 MP), far below a bomb
    max_file_bytes: int = 50 << 20
    min_side: int = 16  # a 1x1 (or 8x8) "photo" holds no subject to learn


@dataclass(frozen=True)
class UserImage:
    """One decoded photo: upright 8-bit RGB, with the name it is reported by and its fingerprint."""

    name: str
    image: Image.Image
    sha256: str


@dataclass(frozen=True)
class Example:
    """One training example at the base's resolution."""

    image: Image.Image  # RGB, resolution x resolution
    caption: str
    name: str
    sha256: str
    original_size: tuple[int, int]  # (height, width) before cropping, for SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized pixels


def expand_sources(sources: ImageSource | Sequence[ImageSource]) -> list[Path | Image.Image]:
    """Files and in-memory images as given; a folder becomes its image files (by suffix, sorted, not recursive)."""
    if isinstance(sources, (str, os.PathLike, Image.Image)):
        sources = [sources]
    out: list[Path | Image.Image] = []
    for source in sources:
        if isinstance(source, Image.Image):
            out.append(source)
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def load_images(sources: ImageSource | Sequence[ImageSource], limits: ImageLimits = ImageLimits()) -> list[UserImage]:
    """Decode, orient and convert every image; raise :class:`InvalidImages` listing all bad ones."""
    items = expand_sources(sources)
    if not limits.min_images <= len(items) <= limits.max_images:
        raise InvalidImages(f"found {len(items)} images; give between {limits.min_images} and {limits.max_images} (JPEG, PNG or WebP files, or folders of them)")
    loaded, problems = [], []
    for i, item in enumerate(items):
        name = item.name if isinstance(item, Path) else f"image {i + 1}"
        try:
            loaded.append(_load_one(item, name, limits))
        except _Refused as e:
            problems.append(f"{shown_name(name)}: {e}")
    if problems:
        raise InvalidImages(f"{len(problems)} of {len(items)} images cannot be used: " + "; ".join(problems))
    return loaded


class _Refused(Exception):
    """Why one image was refused (collected into :class:`InvalidImages`)."""


def shown_name(name: str) -> str:
    """``name`` with control and format characters (NUL, newlines, bidi overrides) escaped as ``\\uXXXX``."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in name)


def _format_of(data: bytes) -> str | None:
    """The format ``data`` announces by its magic number, if it is one we can name."""
    if data[4:8] == b"ftyp":  # ISO media: the brand says which
        return "HEIC/AVIF" if data[8:12] in (b"heic", b"heix", b"mif1", b"avif") else "MP4/QuickTime"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _load_one(item: Path | Image.Image, name: str, limits: ImageLimits) -> UserImage:
    if isinstance(item, Image.Image):
        _check_pixels(item.size, limits)
        digest = hashlib.sha256(f"{item.mode}|{item.size}|".encode() + item.tobytes()).hexdigest()
        return UserImage(name, to_rgb(item), digest)
    try:
        data = _read_capped(item, limits.max_file_bytes)
    except FileNotFoundError:
        raise _Refused("no such file") from None
    except ValueError:  # a NUL byte in the path
        raise _Refused("is not a valid file name") from None
    except OSError as e:
        raise _Refused(f"cannot be read ({e.strerror or e})") from None
    if not data:
        raise _Refused("is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own bomb check: an error here
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                _check_pixels(im.size, limits)  # from the header, before decoding
                frames = getattr(im, "n_frames", 1)
                if frames > 1 and im.format != "MPO":  # MPO: a camera's still with a preview frame
                    raise _Refused(f"is animated ({frames} frames); give a still photo")
                im.load()
                image = to_rgb(im)
        except UnidentifiedImageError:
            raise _Refused(_unreadable(data)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Refused(f"refused as a decompression bomb ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # struct.error: a malformed EXIF or chunk
            raise _Refused(f"corrupt or truncated ({e})") from None
    return UserImage(name, image, hashlib.sha256(data).hexdigest())


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refusing anything but a regular file and never reading more than ``max_bytes + 1``.

    ``st_size`` alone is no bound: ``/dev/zero``, a FIFO or a file still growing reports 0 (or less
    than it holds), so the read itself stops one byte past the limit.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # non-blocking: opening a FIFO must not wait for a writer
    with open(fd, "rb", buffering=0) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("is not a regular file (a device, pipe or folder); give a photo file")
        if info.st_size > max_bytes:
            raise _Refused(f"{info.st_size} bytes is over the {max_bytes}-byte limit")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _Refused(f"is over the {max_bytes}-byte limit")
    return data


def _unreadable(data: bytes) -> str:
    """Why PIL found no image in ``data``: a format we do not take, or a damaged file of one we do."""
    fmt = _format_of(data)
    if fmt in ("JPEG", "PNG", "WebP"):
        return f"a damaged {fmt} (its header cannot be parsed)"
    if fmt is not None:
        return f"is a {fmt} file; give a JPEG, PNG or WebP image"
    return "not a JPEG, PNG or WebP image"


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise _Refused(f"has no pixels ({w}x{h})")
    if min(w, h) < limits.min_side:
        raise _Refused(f"{w}x{h} is too small; photos need at least {limits.min_side} pixels a side")
    if w * h > limits.max_pixels:
        raise _Refused(f"{w}x{h} is {w * h} pixels, over the {limits.max_pixels}-pixel limit")


def to_rgb(im: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency on white, 16-bit and float scaled down."""
    method = _UPRIGHT.get(_orientation(im))
    if method is not None:
        im = im.transpose(method)
    if im.mode in ("P", "RGB", "L") and "transparency" in im.info:  # a palette entry or colour key (PNG tRNS)
        im = im.convert("RGBA")
    elif im.mode == "P":
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        values = np.asarray(im)
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (None without one, or when it is not a number), read without re-serializing the EXIF.

    PIL's ``exif_transpose`` writes the EXIF back out after rotating, which fails on tags of a
    type it cannot encode (``struct.error``); the pixels need only the one tag. EXIF that cannot
    be parsed at all is refused like any other damaged file.
    """
    try:
        value = im.getexif().get(0x0112)
    except (struct.error, SyntaxError, ValueError, EOFError, OSError, TypeError, KeyError) as e:
        raise _Refused(f"has damaged EXIF metadata ({e})") from None
    return value if isinstance(value, int) else None


def center_crop_resize(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """The largest centred square, resized to ``size``; returns it and the crop's (top, left) in resized pixels."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    resized = square.resize((size, size), Image.LANCZOS if side > size else Image.BICUBIC)
    scale = size / side
    return resized, (round(top * scale), round(left * scale))


def fill(template: str, what: str, **values: str) -> str:
    """``template`` with its ``{name}`` placeholders filled from ``values``; any other placeholder is a user error.

    Only bare ``{name}`` fields are allowed: ``str.format`` would also honour format specs and
    attribute access, so ``{trigger:>999999999}`` from a user's caption would build a gigabyte string.
    """
    allowed = ", ".join("{" + name + "}" for name in values)
    shown = repr(template if len(template) <= 80 else template[:77] + "...")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise InvalidRequest(f"{what} {shown} may only use the placeholders {allowed} ({e})") from None
    for field, spec, conversion in fields:
        if field not in values or spec or conversion:
            bad = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InvalidRequest(f"{what} {shown} may only use the placeholders {allowed}, not {bad[:40]!r}")
    return template.format(**values)


def _names_trigger(template: str) -> bool:
    """Whether ``template`` has a ``{trigger}`` field ("{{trigger}}" is the literal text, naming nobody)."""
    try:
        return any(field == "trigger" for _, field, _, _ in string.Formatter().parse(template))
    except ValueError:  # malformed: fill() names the problem
        return True


def default_caption(trigger: str, class_word: str) -> str:
    """DreamBooth's instance prompt: the trigger names the subject, the class word says what it is."""
    return f"a {trigger} {class_word}"


def caption_templates(
    images: Sequence[UserImage], captions: Sequence[str] | Mapping[str, str] | None
) -> list[str | None]:
    """Per-image caption templates (``{trigger}``, ``{class_word}`` placeholders) or None for the default.

    ``captions`` is a list aligned with the images or a mapping from file name to caption; every
    given caption must contain ``{trigger}``, or the subject would have no name in it.
    """
    if captions is None:
        return [None] * len(images)
    if isinstance(captions, Mapping):
        unknown = sorted(set(captions) - {im.name for im in images})
        if unknown:
            raise InvalidImages(f"captions name images that are not in the set: {', '.join(unknown)}")
        templates = [captions.get(im.name) for im in images]
    else:
        if isinstance(captions, str) or len(captions) != len(images):
            raise InvalidImages(f"got {1 if isinstance(captions, str) else len(captions)} captions for {len(images)} images; give one per image or a mapping by file name")
        templates = list(captions)
    long = [im.name for im, t in zip(images, templates) if t is not None and len(t) > MAX_CAPTION_CHARS]
    if long:
        raise InvalidImages(f"captions are limited to {MAX_CAPTION_CHARS} characters (the text encoder reads about 300); too long for: {', '.join(map(shown_name, long))}")
    missing = [im.name for im, t in zip(images, templates) if t is not None and not _names_trigger(t)]
    if missing:
        raise InvalidImages(f"captions must contain {{trigger}} where the subject is named (e.g. 'a {{trigger}} dog on a beach'); missing in: {', '.join(missing)}")
    return templates


def make_examples(
    images: Sequence[UserImage],
    resolution: int,
    trigger: str,
    class_word: str,
    captions: Sequence[str] | Mapping[str, str] | None = None,
) -> list[Example]:
    """Crop and resize every image and caption it (default: ``"a {trigger} {class_word}"``)."""
    examples = []
    for im, template in zip(images, caption_templates(images, captions)):
        pixels, crop = center_crop_resize(im.image, resolution)
        caption = default_caption(trigger, class_word) if template is None else fill(template, f"caption for {im.name}", trigger=trigger, class_word=class_word)
        examples.append(Example(pixels, caption, im.name, im.sha256, (im.image.height, im.image.width), crop))
    return examples

"""Photos uploaded to the demo: checked before any training starts, one clear message per refused file.

Uploads are untrusted. Gradio stores them in its upload folder and hands the app their paths; the
app only ever reads paths inside that folder (so a crafted API call cannot make it read
``/etc/passwd``), counts them (3 to 20 by default), and decodes each with
:func:`adapters.data.load_images`, which accepts only JPEG, PNG and WebP, checks the byte size and
the pixel count from the header before decoding (a decompression bomb is refused, never decoded)
and fully decodes the rest so a truncated file fails here, not mid-training.

File names are shown back to the user, so control and bidi characters are escaped (as
:func:`adapters.data.shown_name` does) and they are cut short and HTML-escaped first.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.data import ImageLimits, InvalidImages, UserImage, load_images
from adapters.data import shown_name as _escaped_name
from gen.errors import BespokeError

_PREFIX = re.compile(r"^\d+ of \d+ images cannot be used: ")
MAX_SHOWN_NAME = 60


@dataclass(frozen=True)
class UploadLimits:
    """What one personalization may upload."""

    min_images: int = 3
    max_images: int = 20
    max_file_bytes: int = 20 << 20  # a large phone JPEG is ~10 MB
    max_pixels: int = 40_000_000  # a 48 MP phone photo is refused; ~40 MP and below are fine

    @property
    def upload_cap_bytes(self) -> int:
        """Gradio's own hard cap per upload: above ours, so our message (naming the file) is the one users see."""
        return 2 * self.max_file_bytes


class UploadRefused(BespokeError):
    """Some uploads cannot be used; ``problems`` holds one line per refused file (or one about the count)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def shown_name(path: str | os.PathLike) -> str:
    """A file's name as safe to show: the base name only, control and bidi characters escaped, shortened, HTML-escaped."""
    name = _escaped_name(Path(path).name) or "(unnamed)"
    if len(name) > MAX_SHOWN_NAME:
        name = name[: MAX_SHOWN_NAME - 3] + "..."
    return html.escape(name, quote=False)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def check_uploads(paths: Sequence[str | os.PathLike], limits: UploadLimits = UploadLimits(), upload_root: str | os.PathLike | None = None) -> list[UserImage]:
    """Decode every uploaded photo or raise :class:`UploadRefused` listing each problem.

    ``upload_root`` (Gradio's upload folder) is where every path must lie; None skips that check
    (for callers that pass files they created themselves).
    """
    paths = [Path(p) for p in paths or ()]
    n = len(paths)
    if n > limits.max_images:
        raise UploadRefused([f"{n} photos is too many: give at most {limits.max_images}"])
    if n < limits.min_images:
        raise UploadRefused([f"{n} photo{'s' if n != 1 else ''} is too few: give at least {limits.min_images} photos of the same subject"])
    one = ImageLimits(min_images=1, max_images=1, max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes)
    loaded, problems = [], []
    for path in paths:
        name = shown_name(path)
        if upload_root is not None and not _inside(path, Path(upload_root)):
            problems.append(f"{name}: was not uploaded through the app")
            continue
        try:
            (image,) = load_images([path], one)
        except InvalidImages as e:
            reason = _PREFIX.sub("", str(e)).removeprefix(_escaped_name(path.name) + ": ")  # the name is shown once, ours
            problems.append(f"{name}: {html.escape(reason, quote=False)}")
            continue
        loaded.append(image)
    if problems:
        raise UploadRefused(problems)
    return loaded

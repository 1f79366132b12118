"""Where the project keeps files on a user's machine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN_DIR = PACKAGE_DIR / "builtin"


def cache_dir() -> Path:
    """Root for caches and the default registry: ``$BESPOKE_HOME``, else ``$XDG_CACHE_HOME/bespoke-diffusion``."""
    explicit = os.environ.get("BESPOKE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "bespoke-diffusion"


def replace_folder(final: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a folder beside ``final``, then swap it in for ``final``.

    A model folder is several files (diffusers writes ``model_index.json`` before our
    ``bespoke.json``; an evaluator's weights before its metrics), so one written in place and
    killed midway still loads, with the wrong defaults or metrics, and the good one that was there
    is gone. Here a crash leaves the old folder whole; only the two renames are not one step.
    """
    final = Path(final)
    partial, old = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)

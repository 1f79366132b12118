"""Where the project keeps files on a user's machine."""

from __future__ import annotations

import os
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

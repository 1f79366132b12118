"""bespoke-diffusion's lower layer: base models, the world, sampling and evaluation.

``gen`` never imports ``adapters``; adapters reach the sampler through small protocols defined here.
The names below import on first use, so ``import gen.errors`` (say, in a registry CLI command)
does not pay for importing diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "Base": "gen.base",
    "load_base": "gen.base",
    "BespokeError": "gen.errors",
    "Provenance": "gen.provenance",
    "read_provenance": "gen.provenance",
    "save_png": "gen.provenance",
    "Generation": "gen.sampler",
    "Sampler": "gen.sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gen' has no attribute {name!r}")

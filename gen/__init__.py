"""bespoke-diffusion's lower layer: base models, the world, sampling and evaluation.

``gen`` never imports ``adapters``; adapters reach the sampler through small protocols defined here.
"""

from gen.base import Base, load_base
from gen.errors import BespokeError
from gen.provenance import Provenance, read_provenance, save_png
from gen.sampler import Generation, Sampler

__all__ = ["Base", "BespokeError", "Generation", "Provenance", "Sampler", "load_base", "read_provenance", "save_png"]

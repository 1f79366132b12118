"""The small shape of an adapter that ``gen`` consumes, and where adapters come from.

``gen`` is the lower layer: it never imports ``adapters``. Anything that can hand over a
:class:`LoraAdapter` for (user, concept, version) satisfies :class:`AdapterSource`; the registry
in ``adapters`` is one such source, a dict in a test is another.

Tensor keys follow diffusers' LoRA convention, prefixed by the component they attach to:
``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<...>`` (and
``text_encoder_2.<...>`` for SDXL). ``lora_A`` is (rank, in_features[, k, k]) and ``lora_B``
(out_features, rank[, 1, 1]); the update to a weight is ``alpha / rank * B @ A``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraAdapter:
    """LoRA tensors plus what is needed to apply them and to say which adapter was used."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # peft-style name suffixes ("to_q") or full module paths, as trained/imported
    base_fingerprint: str
    trigger: str | None = None  # the token(s) that name the concept in a prompt, e.g. "sks" or "<rex>"
    class_word: str | None = None  # e.g. "dog"
    # New token embeddings (pivotal tuning): text encoder name -> (len(new_tokens), hidden) tensor.
    new_tokens: tuple[str, ...] = ()
    token_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    # Identity for provenance: who owns it, which concept and version.
    user: str | None = None
    concept: str | None = None
    version: int | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def component_tensors(self, component: str) -> dict[str, torch.Tensor]:
        """Tensors of one component with the component prefix removed (keys as peft expects them)."""
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *self.token_embeddings.values()])


@runtime_checkable
class AdapterSource(Protocol):
    """Where the sampler gets adapters from, always scoped to one user; each adapter carries its version number."""

    def get(self, user: str, concept: str, version: int | str = "latest") -> LoraAdapter: ...

    def concepts(self, user: str) -> list[str]: ...


@dataclass(frozen=True)
class Fingerprints:
    """Two hashes of a base's weights (made in one pass by :mod:`gen.base`).

    ``adapted`` covers the UNet and text encoders: what a LoRA adapter attaches to and what its trigger
    is read by. The VAE is left out, so swapping a VAE (SD1.5's ft-MSE decoder, the built-in base's
    stage-4 decoder) keeps every adapter. ``weights`` covers every weight, the VAE's too: what caches of
    generated images (class images) are keyed by, and what adapters recorded as their base's fingerprint
    before the VAE was left out; those still fit.
    """

    adapted: str
    weights: str

    def __contains__(self, fingerprint: object) -> bool:
        """Whether an adapter recorded for ``fingerprint`` was made for these weights."""
        return fingerprint in (self.adapted, self.weights)

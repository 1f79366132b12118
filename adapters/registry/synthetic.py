"""Random LoRA adapters shaped for a base, for tests, benchmarks and smoke checks.

Real adapters come from training; these only need the right keys and shapes, and a non-zero
delta (B is filled too, unlike a fresh peft init) so that applying one visibly changes outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.validate import BaseSpec
from gen.adapter import LoraAdapter

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_adapter(
    spec: BaseSpec,
    rank: int = 4,
    alpha: float = 8.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    components: Sequence[str] = ("unet",),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_modules: int | None = None,
    std: float = 0.1,
) -> LoraAdapter:
    """An adapter on every module of ``components`` whose path ends with one of ``targets`` (peft's rule)."""
    generator = torch.Generator().manual_seed(seed)
    modules = [
        m for m in sorted(spec.modules)
        if m.split(".", 1)[0] in components and any(m == t or m.endswith("." + t) for t in targets)
    ][:max_modules]
    if not modules:
        raise ValueError(f"no module of {list(components)} matches {list(targets)}")
    tensors = {}
    for module in modules:
        shape_a, shape_b = spec.modules[module].lora_shapes(rank)
        tensors[f"{module}.lora_A.weight"] = (torch.randn(shape_a, generator=generator) * std).to(dtype)
        tensors[f"{module}.lora_B.weight"] = (torch.randn(shape_b, generator=generator) * std).to(dtype)
    return LoraAdapter(tensors=tensors, rank=rank, alpha=alpha, target_modules=tuple(targets), base_fingerprint=spec.fingerprint)

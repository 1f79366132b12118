"""Which layers LoRA attaches to: the default targets shared by training and serving, and peft's matching rule.

Kept free of torch so that the command line can build its training flags (``bespoke --help``)
without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as diffusers' DreamBooth-LoRA
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def matches_target(name: str, targets: Sequence[str]) -> bool:
    """peft's rule: a module is targeted when its path equals a target or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)

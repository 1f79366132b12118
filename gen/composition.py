"""Two concepts at once: merging adapters, and scoring each concept against its own references.

Composing two LoRAs adds their weight updates. Two things can go wrong, and both are measured:

* in a prompt naming both concepts (``"<rex> and <mia> on the beach"``), one subject may take
  over: each image is scored against each concept's references (``joint_fidelity``);
* one adapter's update may bleed into the other's subject even where the prompt names only that
  one. :func:`merge_adapters` builds "X with Y's weights also on" (X's trigger, both LoRAs), so
  X's prompts can be sampled solo and composed: ``leakage`` is how much more the composed images
  look like Y's references than the solo ones do, ``interference`` how much X's own fidelity drops.

Similarities are relative to each concept's real-vs-real, as in :func:`gen.evaluate.subject_fidelity`;
``real_cross_similarity`` (X's photos against Y's) is the level two distinct real subjects share.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import replace

import torch

from gen.adapter import LoraAdapter
from gen.errors import EvaluationError
from gen.evaluate import Embedder, Images, mean_similarity, real_vs_real, relative_to_real


def merge_adapters(
    primary: LoraAdapter, others: Sequence[tuple[LoraAdapter, float]], weight: float = 1.0, *, base: Container[str] | None = None
) -> LoraAdapter:
    """``primary`` (its trigger, class word, new tokens) with its LoRA plus each other LoRA times its weight.

    Ranks are concatenated and each part's ``alpha / rank * weight`` is folded into its ``B``, so
    the result (alpha = total rank, scale 1) applies exactly the sum of the parts' updates.
    ``base`` (a base's :class:`~gen.adapter.Fingerprints`) is what every part must fit: one base's
    adapters may carry either of its fingerprints (older ones recorded every weight). Without it
    every part must carry the primary's.
    """
    parts = [(primary, weight), *others]
    for other, _ in others:
        if _same_adapter(primary, other):
            # Otherwise it merges into one adapter at twice the weight, and scoring it finds one concept where it expects two.
            raise EvaluationError(f"cannot compose {_name(primary)} with itself: composition measures two different concepts; pick another concept or version")
    fits = base if base is not None else (primary.base_fingerprint,)
    for adapter, _ in parts:
        if adapter.base_fingerprint not in fits:
            raise EvaluationError(f"cannot compose adapters of different bases ({primary.base_fingerprint} and {adapter.base_fingerprint})")
    modules = sorted({k[: -len(".lora_A.weight")] for adapter, _ in parts for k in adapter.tensors if k.endswith(".lora_A.weight")})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        shape_a = next(a.tensors[f"{module}.lora_A.weight"].shape for a, _ in parts if f"{module}.lora_A.weight" in a.tensors)
        shape_b = next(a.tensors[f"{module}.lora_B.weight"].shape for a, _ in parts if f"{module}.lora_B.weight" in a.tensors)
        a_parts, b_parts = [], []
        for adapter, w in parts:
            a = adapter.tensors.get(f"{module}.lora_A.weight")
            if a is None:  # this part does not touch the module: zero rank rows keep the ranks aligned
                a_parts.append(torch.zeros(adapter.rank, *shape_a[1:]))
                b_parts.append(torch.zeros(shape_b[0], adapter.rank, *shape_b[2:]))
            else:
                a_parts.append(a.float())
                b_parts.append(adapter.tensors[f"{module}.lora_B.weight"].float() * (adapter.scale * w))
        tensors[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0)
        tensors[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1)
    rank = sum(adapter.rank for adapter, _ in parts)
    targets = tuple(dict.fromkeys(t for adapter, _ in parts for t in adapter.target_modules))
    return replace(primary, tensors=tensors, rank=rank, alpha=float(rank), target_modules=targets)


def _name(adapter: LoraAdapter) -> str:
    who = "/".join(x for x in (adapter.user, adapter.concept) if x) or "an adapter"
    return f"{who} v{adapter.version}" if adapter.version is not None else who


def _same_adapter(x: LoraAdapter, y: LoraAdapter) -> bool:
    """One adapter twice: the same recorded identity (user, concept, version), or the same weights."""
    if x.version is not None and (x.user, x.concept, x.version) == (y.user, y.concept, y.version):
        return True
    return x.tensors.keys() == y.tensors.keys() and all(x.tensors[k] is y.tensors[k] or torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)


def composition_metrics(
    references: Mapping[str, Images],
    embedder: Embedder,
    joint: Images,
    solo: Mapping[str, Images] | None = None,
    composed: Mapping[str, Images] | None = None,
) -> dict[str, float]:
    """Per concept X (two concepts): fidelity in the joint prompt, and, given solo and composed images, leakage and interference.

    Keys are ``"<concept>/<metric>"``, plus ``joint_balance`` (the gap between the two joint fidelities).
    """
    if len(references) != 2:
        # One key: both concepts carry one name (a dict keeps one), e.g. an adapter composed with itself.
        same = f" ({next(iter(references))!r}): the two concepts need different names" if len(references) == 1 else ""
        raise EvaluationError(f"composition is scored for two concepts, got {len(references)}{same}")
    (x_name, y_name) = list(references)
    out: dict[str, float] = {}
    joint_fidelity = {}
    for x, y in ((x_name, y_name), (y_name, x_name)):
        rvr = real_vs_real(references[x], embedder)
        joint_fidelity[x] = relative_to_real(mean_similarity(joint, references[x], embedder), rvr)
        out[f"{x}/joint_fidelity"] = joint_fidelity[x]
        out[f"{x}/real_cross_similarity"] = mean_similarity(references[x], references[y], embedder)
        if solo is not None and composed is not None:
            solo_cross = mean_similarity(solo[x], references[y], embedder)
            composed_cross = mean_similarity(composed[x], references[y], embedder)
            solo_fidelity = relative_to_real(mean_similarity(solo[x], references[x], embedder), rvr)
            composed_fidelity = relative_to_real(mean_similarity(composed[x], references[x], embedder), rvr)
            out.update({
                f"{x}/solo_fidelity": solo_fidelity,
                f"{x}/composed_fidelity": composed_fidelity,
                f"{x}/solo_cross_similarity": solo_cross,
                f"{x}/composed_cross_similarity": composed_cross,
                f"{x}/leakage": composed_cross - solo_cross,
                f"{x}/interference": solo_fidelity - composed_fidelity,
            })
    out["joint_balance"] = abs(joint_fidelity[x_name] - joint_fidelity[y_name])
    return out

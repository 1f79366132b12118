"""Composing an adapter with itself is refused before any sampling, with a message that says so."""

from dataclasses import replace

import pytest
import torch

from gen.adapter import LoraAdapter
from gen.composition import composition_metrics, merge_adapters
from gen.errors import EvaluationError


def _adapter(seed, **identity):
    g = torch.Generator().manual_seed(seed)
    tensors = {"unet.x.lora_A.weight": torch.randn(2, 5, generator=g), "unet.x.lora_B.weight": torch.randn(6, 2, generator=g)}
    return LoraAdapter(tensors=tensors, rank=2, alpha=2.0, target_modules=("x",), base_fingerprint="f", **identity)


def test_composing_an_adapter_with_itself_is_refused_by_name():
    robo = _adapter(0, user="alice", concept="robo", version=1)
    again = replace(robo, tensors={k: v.clone() for k, v in robo.tensors.items()}, class_word="robot")  # a second registry read
    for other in (robo, again, replace(robo, user=None, concept=None, version=None)):  # the same identity, or the same weights
        with pytest.raises(EvaluationError, match="cannot compose alice/robo v1 with itself"):
            merge_adapters(robo, [(other, 1.0)])
    assert merge_adapters(robo, [(replace(_adapter(1), user="alice", concept="robo", version=2), 1.0)]).rank == 4  # another version composes
    assert merge_adapters(_adapter(0, concept="a"), [(_adapter(1, concept="a"), 1.0)]).rank == 4  # unversioned, other weights


def test_composition_scores_with_one_name_for_both_concepts_say_so():
    with pytest.raises(EvaluationError, match=r"got 1 \('alice/robo v1'\): the two concepts need different names"):
        composition_metrics({"alice/robo v1": []}, None, [])

"""Adapter diagnostics on constructed LoRA updates with known rank, norm and overlap, and on tiny SD/SDXL bases."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from adapters.diagnostics import DiagnosticsConfig, DiagnosticsError, diagnose, effective_rank, short_name, subspace_overlap
from adapters.formats import lora_delta
from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.adapter import LoraAdapter
from gen.base import load_base

OUT, IN = 12, 10


def basis(n: int, columns: list[int]) -> torch.Tensor:
    """Columns of the n x n identity: an orthonormal set spanning the chosen axes."""
    return torch.eye(n)[:, columns]


def make(b: torch.Tensor, a: torch.Tensor, alpha: float | None = None, module: str = "unet.layer", **extra) -> LoraAdapter:
    rank = a.shape[0]
    tensors = {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}
    for name, (bb, aa) in extra.items():
        tensors.update({f"{name}.lora_A.weight": aa, f"{name}.lora_B.weight": bb})
    return LoraAdapter(tensors=tensors, rank=rank, alpha=float(alpha if alpha is not None else rank), target_modules=("layer",), base_fingerprint="f")


def update(singular_values: list[float], out_axes: list[int], in_axes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) whose product has exactly these singular values, writing ``out_axes`` and reading ``in_axes``."""
    b = basis(OUT, out_axes) * torch.tensor(singular_values)
    a = basis(IN, in_axes).T
    return b, a


def test_singular_values_norms_and_ranks_match_the_construction():
    b, a = update([3.0, 2.0, 1.0, 0.0], [0, 1, 2, 3], [4, 5, 6, 7])
    adapter = make(b, a, alpha=8.0)  # scale 2
    weight = torch.full((OUT, IN), 2.0)  # Frobenius norm 2 * sqrt(120)
    layer = diagnose(adapter, {"unet.layer": weight}).layers[0]
    assert layer.singular_values == pytest.approx((6.0, 4.0, 2.0, 0.0), abs=1e-9)
    assert layer.delta_norm == pytest.approx(2 * math.sqrt(14)) == pytest.approx(float(lora_delta(adapter, "unet.layer").norm()), rel=1e-5)
    assert layer.relative_norm == pytest.approx(2 * math.sqrt(14) / (2 * math.sqrt(120)))
    assert layer.spectral_norm == pytest.approx(6.0)
    assert layer.stable_rank == pytest.approx(56 / 36)
    p = torch.tensor([6.0, 4.0, 2.0]) / 12
    assert layer.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert layer.shape == (OUT, IN) and layer.rank == 4 and layer.flags == ()


def test_effective_rank_counts_equal_directions():
    assert effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    eq = diagnose(make(*update([1.0, 1.0], [0, 1], [0, 1]))).layers[0]
    assert eq.effective_rank == pytest.approx(2.0) and eq.stable_rank == pytest.approx(2.0)


def test_dead_exploding_and_broken_layers_are_flagged():
    weights = {name: torch.ones(OUT, IN) for name in ("unet.dead", "unet.fine", "unet.big", "unet.nan")}  # norm sqrt(120) ~ 11
    b_small, a_small = update([0.5, 0.5], [0, 1], [0, 1])
    adapter = make(
        torch.zeros(OUT, 2), a_small, module="unet.dead",  # B never left zero: dead
        **{"unet.fine": (b_small, a_small), "unet.big": (b_small * 40, a_small), "unet.nan": (b_small * float("nan"), a_small)},
    )
    diag = diagnose(adapter, weights)
    flags = {layer.module: layer.flags for layer in diag.layers}
    assert flags == {"unet.dead": ("dead",), "unet.fine": (), "unet.big": ("exploding",), "unet.nan": ("non-finite",)}
    summary = diag.summary()
    assert (summary["dead_layers"], summary["exploding_layers"], summary["non_finite_layers"]) == (1.0, 1.0, 1.0)
    assert len(diag.warnings) == 3 and any("NaN" in w for w in diag.warnings)
    # An outlier far above the adapter's other layers is exploding even below the absolute threshold.
    many = {f"unet.l{i}": (b_small * 0.2, a_small) for i in range(6)}
    many["unet.l6"] = (b_small * 6, a_small)  # 30x the others' relative norm, yet under 0.5
    diag = diagnose(make(b_small * 0.2, a_small, module="unet.l7", **many), {f"unet.l{i}": torch.ones(OUT, IN) for i in range(8)})
    assert [layer.module for layer in diag.flagged("exploding")] == ["unet.l6"]
    assert diag.layers[6].relative_norm < DiagnosticsConfig().exploding_relative_norm
    # Without base weights only absolute norms are known: dead layers are still found.
    assert [layer.flags for layer in diagnose(make(torch.zeros(OUT, 2), a_small)).layers] == [("dead",)]


def test_overlap_is_one_with_itself_zero_when_orthogonal_and_a_half_when_sharing_half():
    first = make(*update([2.0, 1.0], [0, 1], [0, 1]))
    same_space = make(*update([5.0, 0.3], [1, 0], [3, 4]))  # same output axes, other strengths and inputs
    orthogonal = make(*update([2.0, 1.0], [2, 3], [0, 1]))
    half = make(*update([2.0, 1.0], [1, 2], [0, 1]))
    itself = subspace_overlap(first, first)
    assert itself.layers[0].column_overlap == pytest.approx(1.0) and itself.layers[0].row_overlap == pytest.approx(1.0)
    assert itself.warnings and "interfere" in itself.warnings[0]
    same = subspace_overlap(first, same_space).layers[0]
    assert same.column_overlap == pytest.approx(1.0) and same.row_overlap == pytest.approx(0.0, abs=1e-9)
    ortho = subspace_overlap(first, orthogonal)
    assert ortho.layers[0].column_overlap == pytest.approx(0.0, abs=1e-9) and ortho.layers[0].max_cosine == pytest.approx(0.0, abs=1e-9)
    assert ortho.warnings == []
    assert subspace_overlap(first, half).layers[0].column_overlap == pytest.approx(0.5)
    inside = make(*update([4.0], [1], [0]))  # one direction inside first's two: fully overlapping, as far as it goes
    assert subspace_overlap(first, inside).layers[0].column_overlap == pytest.approx(1.0)
    assert subspace_overlap(first, inside).layers[0].ranks == (2, 1)
    assert itself.layers[0].chance == pytest.approx(2 / OUT)


def test_overlap_reports_layers_only_one_adapter_touches_and_refuses_mismatched_shapes():
    b, a = update([1.0], [0], [0])
    first = make(b, a, **{"unet.other": (b, a)})
    second = make(b, a, **{"unet.third": (b, a)})
    report = subspace_overlap(first, second)
    assert [layer.module for layer in report.layers] == ["unet.layer"]
    assert report.only_first == ["unet.other"] and report.only_second == ["unet.third"]
    wider = make(torch.ones(OUT + 1, 1), a)
    with pytest.raises(DiagnosticsError, match="differ in shape"):
        subspace_overlap(first, wider)
    with pytest.raises(DiagnosticsError, match="only one of"):
        diagnose(replace(first, tensors={"unet.layer.lora_A.weight": a}))
    with pytest.raises(DiagnosticsError, match="does not fit"):
        diagnose(first, {"unet.layer": torch.ones(3, 3)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_overlap_of_a_non_finite_adapter_is_a_diagnostics_error_not_an_svd_failure(bad):
    b, a = update([1.0, 0.5], [0, 1], [0, 1])
    broken = make(b, a.clone().fill_(bad))
    with pytest.raises(DiagnosticsError, match="unet.layer: an adapter holds NaN or infinite values"):
        subspace_overlap(broken, make(b, a))
    with pytest.raises(DiagnosticsError, match="NaN or infinite"):
        subspace_overlap(make(b, a), broken)


def test_conv_lora_updates_are_read_as_matrices():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g)
    adapter = make(b, a)
    layer = diagnose(adapter, {"unet.layer": torch.randn(5, 3, 3, 3, generator=g)}).layers[0]
    assert layer.shape == (5, 27)
    assert layer.delta_norm == pytest.approx(float(lora_delta(adapter, "unet.layer").norm()), rel=1e-5)
    assert layer.singular_values == pytest.approx(tuple(torch.linalg.svdvals(lora_delta(adapter, "unet.layer").flatten(1)).tolist()[:2]), rel=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_registry_adapters_on_tiny_bases_get_relative_norms_for_every_layer(family, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    base = load_base(tiny_sd_dir if family == "sd" else tiny_sdxl_dir)
    spec = BaseSpec.from_base(base)
    components = ("unet", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    adapter = random_adapter(spec, rank=4, alpha=4.0, targets=("to_q", "to_v", "q_proj", "v_proj"), components=components, seed=3, std=0.05)
    with Registry(tmp_path / "reg") as registry:
        registry.for_user("ann").put(adapter, base, "rex", trigger="sks", class_word="dog")
        stored = registry.for_user("ann").get("rex")
    diag = diagnose(stored, base)
    assert {layer.component for layer in diag.layers} == set(components)
    assert len(diag.layers) == len(stored.tensors) // 2
    assert all(layer.relative_norm is not None and 0 < layer.relative_norm < 1 for layer in diag.layers)
    assert all(0 < layer.effective_rank <= 4 for layer in diag.layers)
    assert diag.name == "ann/rex v1"
    data = diag.to_dict()
    assert data["summary"]["layers"] == len(diag.layers) and len(data["layers"]) == len(diag.layers)
    other = random_adapter(spec, rank=4, alpha=4.0, targets=("to_q", "to_v"), seed=4, std=0.05)
    report = subspace_overlap(stored, other)
    assert report.layers and all(0 <= layer.column_overlap < 0.9 for layer in report.layers)
    assert report.only_first and not report.only_second  # text-encoder layers belong to the first alone
    wrong = replace(stored, tensors={"unet.no.such.module.lora_A.weight": torch.ones(1, 2), "unet.no.such.module.lora_B.weight": torch.ones(2, 1)}, rank=1)
    with pytest.raises(DiagnosticsError, match="no module"):
        diagnose(wrong, base)


def test_new_token_embeddings_are_compared_with_the_vocabulary(tiny_sd_dir):
    base = load_base(tiny_sd_dir)
    adapter = random_adapter(BaseSpec.from_base(base), rank=2, targets=("to_q",), max_modules=1)
    vocab = float(base.pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    huge = replace(adapter, new_tokens=("<t0>",), token_embeddings={"text_encoder": torch.full((1, 32), 100.0)})
    stats = diagnose(huge, base).token_embeddings["text_encoder"]
    assert stats["norm_ratio"] == pytest.approx(100.0 * math.sqrt(32) / vocab, rel=1e-4)
    assert any("swamp" in w for w in diagnose(huge, base).warnings)


def test_short_names_keep_plots_readable():
    assert short_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "unet.d1.a0.t0.attn1.to_q"
    assert short_name("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj") == "te2.L3.q_proj"

"""Adapter diagnostics: why an adapter behaves as it does, read from its weights alone.

An adapter is a set of low-rank updates ``delta = alpha / rank * B @ A``, one per targeted layer
(keys as stored in the registry: ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight``;
see :mod:`gen.adapter`). Looking at those updates answers questions no sample grid can:

* **How hard does it push?** ``||delta||_F / ||W||_F`` per layer, against the base's weight. A
  layer near zero is *dead* (B never left its zero init, or learned nothing); one whose update
  rivals the weight itself, or sits far above the adapter's other layers, is *exploding* (too
  high a learning rate or too many steps; expect overfitting and drift).
* **How much of its rank does it use?** the singular values of each delta, and their *effective
  rank* (Roy & Vetterli 2007: the exponential of the entropy of the normalised singular values;
  ``r`` for r equal values, 1 for a single direction). Rank 16 used as rank 2 is wasted memory.
* **Will two adapters fight when composed?** per shared layer, the principal angles between the
  column spaces (the output directions each update writes) of the two deltas. Overlap is the mean
  squared cosine: 1 for the same subspace, 0 for orthogonal ones; random subspaces of dimension
  ``k`` in ``d`` dimensions overlap by about ``k / d`` (reported as ``chance``). Updates writing
  the same directions add up and interfere; a warning is raised when overlap is high.

The SVD of a rank-r product is computed from QR factors of B and A (an r x r SVD), so this costs
almost nothing even for SDXL's largest layers. Works for any base (SD, SDXL, the tiny test
pipelines): base weights are looked up by module path, or passed in as a mapping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from gen.adapter import COMPONENTS, LoraAdapter
from gen.errors import BespokeError

if TYPE_CHECKING:
    from gen.base import Base

_A, _B = ".lora_A.weight", ".lora_B.weight"


class DiagnosticsError(BespokeError):
    """An adapter (or a pair of them) cannot be diagnosed as asked."""


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Thresholds for flags and warnings; the defaults suit LoRA on diffusion models."""

    dead_relative_norm: float = 1e-4  # ||delta|| / ||W|| below this: dead
    dead_norm: float = 1e-7  # without base weights: ||delta|| below this is dead
    exploding_relative_norm: float = 0.5  # an update half the size of the weight it changes
    outlier_factor: float = 25.0  # a layer this many times the adapter's median relative norm: exploding
    rank_tolerance: float = 1e-6  # singular values below tolerance * the largest span nothing
    overlap_warning: float = 0.5  # mean squared cosine of principal angles


@dataclass(frozen=True)
class LayerStats:
    """One targeted layer's update."""

    module: str  # component-prefixed module path
    shape: tuple[int, int]  # of the update as a matrix (out, in * kernel)
    rank: int  # the LoRA rank stored
    delta_norm: float  # Frobenius norm of alpha / rank * B @ A
    weight_norm: float | None  # Frobenius norm of the base weight (None: not given)
    singular_values: tuple[float, ...]
    effective_rank: float
    stable_rank: float  # ||delta||_F^2 / ||delta||_2^2
    flags: tuple[str, ...] = ()  # "dead", "exploding", "non-finite"

    @property
    def relative_norm(self) -> float | None:
        if self.weight_norm is None:
            return None
        if self.weight_norm > 0:
            return self.delta_norm / self.weight_norm
        if self.delta_norm == 0:
            return 0.0  # no update on a zero weight: dead, not exploding
        return math.inf if math.isfinite(self.delta_norm) else float("nan")

    @property
    def spectral_norm(self) -> float:
        return self.singular_values[0] if self.singular_values else 0.0

    @property
    def component(self) -> str:
        return self.module.split(".", 1)[0]

    def to_dict(self) -> dict:
        return {**asdict(self), "relative_norm": self.relative_norm, "spectral_norm": self.spectral_norm}


@dataclass
class AdapterDiagnostics:
    """Every layer's stats, new-token embedding stats, and the warnings they raise."""

    layers: list[LayerStats]
    token_embeddings: dict[str, dict[str, float]] = field(default_factory=dict)
    config: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    name: str = "adapter"

    def flagged(self, flag: str) -> list[LayerStats]:
        return [layer for layer in self.layers if flag in layer.flags]

    @property
    def warnings(self) -> list[str]:
        out = []
        n = len(self.layers)
        for flag, why in (
            ("non-finite", "hold NaN or infinite values: the adapter is broken"),
            ("exploding", "change their base weights a lot: expect overfitting and prior drift (lower the learning rate or the steps)"),
            ("dead", "are near zero: they learned nothing (too few steps, too low a learning rate, or a frozen part)"),
        ):
            hit = self.flagged(flag)
            if hit:
                out.append(f"{len(hit)} of {n} layers {why}; e.g. {hit[0].module}")
        for encoder, stats in self.token_embeddings.items():
            if stats.get("norm_ratio", 0.0) > 10.0:
                out.append(f"new token embeddings of {encoder} are {stats['norm_ratio']:.0f}x the vocabulary's mean norm: they may swamp the prompt")
        return out

    def summary(self) -> dict[str, float]:
        """Adapter-level numbers: norms, ranks and flag counts."""
        rel = [layer.relative_norm for layer in self.layers if layer.relative_norm is not None and math.isfinite(layer.relative_norm)]
        total = math.sqrt(sum(layer.delta_norm**2 for layer in self.layers if math.isfinite(layer.delta_norm)))
        out: dict[str, float] = {
            "layers": len(self.layers),
            "total_delta_norm": total,
            "mean_effective_rank": _mean([layer.effective_rank for layer in self.layers]),
            "mean_stable_rank": _mean([layer.stable_rank for layer in self.layers]),
            "dead_layers": len(self.flagged("dead")),
            "exploding_layers": len(self.flagged("exploding")),
            "non_finite_layers": len(self.flagged("non-finite")),
        }
        if rel:
            out.update(mean_relative_norm=_mean(rel), max_relative_norm=max(rel), median_relative_norm=_median(rel))
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary(),
            "warnings": self.warnings,
            "layers": [layer.to_dict() for layer in self.layers],
            "token_embeddings": self.token_embeddings,
            "config": asdict(self.config),
        }


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2) if n else float("nan")


# --- the update of one layer ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Factored:
    """``delta = left @ diag(s) @ right.T`` with orthonormal ``left`` (out, k) and ``right`` (in, k)."""

    s: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    shape: tuple[int, int]


def lora_modules(adapter: LoraAdapter) -> list[str]:
    """The component-prefixed modules an adapter updates, sorted; refuses half a pair."""
    a = {k[: -len(_A)] for k in adapter.tensors if k.endswith(_A)}
    b = {k[: -len(_B)] for k in adapter.tensors if k.endswith(_B)}
    if a != b:
        odd = sorted(a ^ b)[0]
        raise DiagnosticsError(f"adapter holds only one of lora_A / lora_B for {odd}")
    if not a:
        raise DiagnosticsError("adapter holds no LoRA tensors")
    return sorted(a)


def factor(adapter: LoraAdapter, module: str) -> _Factored:
    """The SVD of one module's update, from QR factors of its LoRA matrices (float64)."""
    a = adapter.tensors[module + _A].double().flatten(1)  # (r, in * kernel)
    b = adapter.tensors[module + _B].double().flatten(1)  # (out, r)
    if a.shape[0] != b.shape[1]:
        raise DiagnosticsError(f"{module}: lora_A has rank {a.shape[0]} but lora_B has {b.shape[1]}")
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a.T = qa ra
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _Factored(s * adapter.scale, qb @ u, qa @ vh.T, (b.shape[0], a.shape[1]))


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)): r for r equal singular values, 1 for one; 0 for a zero update."""
    s = singular_values.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _layer_stats(adapter: LoraAdapter, module: str, weight: torch.Tensor | None, config: DiagnosticsConfig) -> LayerStats:
    weight_norm = float(weight.double().norm()) if weight is not None else None
    a, b = adapter.tensors[module + _A], adapter.tensors[module + _B]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        shape = (b.shape[0], a.flatten(1).shape[1])
        return LayerStats(module, shape, a.shape[0], float("nan"), weight_norm, (), float("nan"), float("nan"), ("non-finite",))
    f = factor(adapter, module)
    s = f.s
    norm = float(s.norm())
    stable = float(norm**2 / s[0] ** 2) if len(s) and s[0] > 0 else 0.0
    return LayerStats(module, f.shape, a.shape[0], norm, weight_norm, tuple(float(v) for v in s), effective_rank(s), stable)


def _flag(layers: list[LayerStats], config: DiagnosticsConfig) -> list[LayerStats]:
    """Add dead / exploding flags, judged per layer and against the adapter's median."""
    rel = [layer.relative_norm for layer in layers if layer.relative_norm is not None and math.isfinite(layer.relative_norm)]
    median = _median(rel) if rel else float("nan")
    out = []
    for layer in layers:
        flags = list(layer.flags)
        if "non-finite" not in flags:
            r = layer.relative_norm
            if (r is not None and r < config.dead_relative_norm) or (r is None and layer.delta_norm < config.dead_norm):
                flags.append("dead")
            elif r is not None and (r > config.exploding_relative_norm or (median > config.dead_relative_norm and r > config.outlier_factor * median)):
                flags.append("exploding")
        out.append(replace(layer, flags=tuple(flags)))
    return out


# --- base weights ---------------------------------------------------------------------------------


def base_weights(base: Base, modules: list[str]) -> dict[str, torch.Tensor]:
    """The base's weight for each component-prefixed module path."""
    out = {}
    for module in modules:
        component, path = module.split(".", 1)
        model = getattr(base.pipe, component, None) if component in COMPONENTS else None
        if model is None:
            raise DiagnosticsError(f"the base has no {component} for {module}")
        try:
            out[module] = model.get_submodule(path).weight.detach()
        except AttributeError:
            raise DiagnosticsError(f"the base has no module {module}; was the adapter made for another base?") from None
    return out


def _token_stats(adapter: LoraAdapter, base: Base | None) -> dict[str, dict[str, float]]:
    out = {}
    for encoder, rows in adapter.token_embeddings.items():
        norms = rows.float().norm(dim=-1)
        stats = {"tokens": float(len(norms)), "mean_norm": float(norms.mean()), "max_norm": float(norms.max())}
        model = getattr(base.pipe, encoder, None) if base is not None else None
        if model is not None:
            vocab = model.get_input_embeddings().weight.detach().float().norm(dim=-1)
            vocab_mean = float(vocab[vocab > 0].mean()) if (vocab > 0).any() else 0.0  # placeholder rows start at zero
            stats["vocab_mean_norm"] = vocab_mean
            stats["norm_ratio"] = stats["max_norm"] / vocab_mean if vocab_mean > 0 else math.inf
        out[encoder] = stats
    return out


def diagnose(
    adapter: LoraAdapter,
    base: Base | Mapping[str, torch.Tensor] | None = None,
    config: DiagnosticsConfig = DiagnosticsConfig(),
    name: str | None = None,
) -> AdapterDiagnostics:
    """Per-layer norms (relative to the base's weights when ``base`` is given), spectra, ranks and flags.

    ``base`` is a loaded :class:`~gen.base.Base` or a mapping from module path to weight.
    """
    modules = lora_modules(adapter)
    if base is None:
        weights: Mapping[str, torch.Tensor] = {}
    elif isinstance(base, Mapping):
        weights = base
    else:
        weights = base_weights(base, modules)
    layers = []
    for module in modules:
        weight = weights.get(module)
        if weight is not None and weight.flatten(1).shape != (adapter.tensors[module + _B].shape[0], adapter.tensors[module + _A].flatten(1).shape[1]):
            raise DiagnosticsError(f"{module}: the base weight has shape {tuple(weight.shape)}, which the LoRA update does not fit")
        layers.append(_layer_stats(adapter, module, weight, config))
    return AdapterDiagnostics(_flag(layers, config), _token_stats(adapter, None if isinstance(base, Mapping) else base), config, name or adapter_label(adapter))


# --- two adapters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerOverlap:
    """How the updates of two adapters on one layer share directions."""

    module: str
    dim: int  # of the output space
    ranks: tuple[int, int]  # numerical ranks of the two updates
    column_overlap: float  # mean squared cosine of principal angles between output subspaces
    row_overlap: float  # the same for input subspaces
    max_cosine: float  # cosine of the smallest principal angle (output side)
    chance: float  # expected column overlap of random subspaces of these ranks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OverlapReport:
    """Subspace overlap per shared layer, and the layers only one adapter touches."""

    layers: list[LayerOverlap]
    only_first: list[str]
    only_second: list[str]
    threshold: float
    names: tuple[str, str] = ("first", "second")

    @property
    def mean_column_overlap(self) -> float:
        return _mean([layer.column_overlap for layer in self.layers])

    @property
    def mean_row_overlap(self) -> float:
        return _mean([layer.row_overlap for layer in self.layers])

    @property
    def high(self) -> list[LayerOverlap]:
        return [layer for layer in self.layers if layer.column_overlap >= self.threshold]

    @property
    def warnings(self) -> list[str]:
        if not self.high:
            return []
        worst = max(self.high, key=lambda layer: layer.column_overlap)
        return [
            f"{self.names[0]} and {self.names[1]} write into overlapping subspaces in {len(self.high)} of {len(self.layers)} shared layers "
            f"(overlap >= {self.threshold}; worst {worst.module}: {worst.column_overlap:.2f}): composed, they may interfere"
        ]

    def summary(self) -> dict[str, float]:
        return {
            "shared_layers": len(self.layers),
            "mean_column_overlap": self.mean_column_overlap,
            "max_column_overlap": max((layer.column_overlap for layer in self.layers), default=float("nan")),
            "mean_row_overlap": self.mean_row_overlap,
            "mean_chance": _mean([layer.chance for layer in self.layers]),
            "high_overlap_layers": len(self.high),
        }

    def to_dict(self) -> dict:
        return {
            "names": list(self.names), "summary": self.summary(), "warnings": self.warnings, "threshold": self.threshold,
            "layers": [layer.to_dict() for layer in self.layers], "only_first": self.only_first, "only_second": self.only_second,
        }


def _basis(f: _Factored, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the update's column and row spaces (numerical rank only)."""
    if len(f.s) == 0 or f.s[0] <= 0:
        return f.left[:, :0], f.right[:, :0]
    k = int((f.s > tolerance * f.s[0]).sum())
    return f.left[:, :k], f.right[:, :k]


def _overlap(p: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """(mean squared cosine of principal angles, largest cosine) between the spans of orthonormal p and q."""
    k = min(p.shape[1], q.shape[1])
    if k == 0:
        return 0.0, 0.0
    cosines = torch.linalg.svdvals(p.T @ q).clamp(0.0, 1.0)
    return float((cosines**2).sum() / k), float(cosines[0])


def _finite(adapter: LoraAdapter, module: str) -> bool:
    return all(bool(torch.isfinite(adapter.tensors[module + suffix]).all()) for suffix in (_A, _B))


def subspace_overlap(first: LoraAdapter, second: LoraAdapter, config: DiagnosticsConfig = DiagnosticsConfig()) -> OverlapReport:
    """Principal angles between the two adapters' updates on every layer both touch."""
    mods_a, mods_b = set(lora_modules(first)), set(lora_modules(second))
    shared = sorted(mods_a & mods_b)
    layers = []
    for module in shared:
        if not (_finite(first, module) and _finite(second, module)):  # before the SVD, which fails to converge on them
            raise DiagnosticsError(f"{module}: an adapter holds NaN or infinite values")
        fa, fb = factor(first, module), factor(second, module)
        if fa.shape != fb.shape:
            raise DiagnosticsError(f"{module}: the adapters' updates differ in shape ({fa.shape} vs {fb.shape}); were they made for the same base?")
        (ca, ra), (cb, rb) = _basis(fa, config.rank_tolerance), _basis(fb, config.rank_tolerance)
        column, max_cos = _overlap(ca, cb)
        row, _ = _overlap(ra, rb)
        dim = fa.shape[0]
        chance = max(ca.shape[1], cb.shape[1]) / dim if min(ca.shape[1], cb.shape[1]) else 0.0
        layers.append(LayerOverlap(module, dim, (ca.shape[1], cb.shape[1]), column, row, max_cos, min(chance, 1.0)))
    names = (adapter_label(first, "first"), adapter_label(second, "second"))
    return OverlapReport(layers, sorted(mods_a - mods_b), sorted(mods_b - mods_a), config.overlap_warning, names)


def adapter_label(adapter: LoraAdapter, default: str = "adapter") -> str:
    """``user/concept vN`` (what is known of it), for reports and warnings."""
    who = "/".join(x for x in (adapter.user, adapter.concept) if x) or default
    return f"{who} v{adapter.version}" if adapter.version is not None else who


def short_name(module: str) -> str:
    """A compact label for plots: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``unet.d1.a0.t0.attn1.to_q``."""
    replacements = (
        ("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"), ("transformer_blocks.", "t"),
        ("text_model.encoder.layers.", "L"), ("self_attn.", ""), ("resnets.", "r"),
    )
    for old, new in replacements:
        module = module.replace(old, new)
    return module.replace("text_encoder_2.", "te2.").replace("text_encoder.", "te.")

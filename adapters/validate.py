"""Validation of untrusted adapter files and tensors against the base they claim to fit.

Adapters arrive from users and from the internet, so every byte is hostile until checked:

* only safetensors is read. Pickle-based files (``.bin``, ``.ckpt``, ``.pt``, ...) can run code
  when loaded, so they are refused by extension *and* by content, and ``torch.load`` is never called;
* the safetensors header is parsed by hand before the library sees the file: its length is
  bounded, every tensor entry is checked (dtype, shape, offsets) and the declared data must fill
  the file exactly, so a header claiming more data than the file holds is refused up front;
* tensor keys must name LoRA-targetable modules (``Linear``/``Conv2d``) of the base's ``unet``,
  ``text_encoder`` or ``text_encoder_2``, with shapes matching those modules and one rank;
* dtypes are float16/bfloat16/float32 only, every value is finite, total size is bounded.

The base is described by a :class:`BaseSpec` (fingerprint + module shapes), which can be built
from a loaded :class:`gen.base.Base` or saved as JSON, so checks need no pipeline in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gen.adapter import COMPONENTS, Fingerprints, LoraAdapter
from gen.errors import BespokeError

if TYPE_CHECKING:
    from gen.base import Base

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".zip")
SAFE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
TORCH_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
EMBEDDING_PREFIX = "token_embeddings."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MAX_TEXT_FIELD = 200  # trigger and class word
# Bidirectional overrides and isolates: text that reads differently from what it holds (U+202E turns "gnp.exe" around)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class InvalidAdapter(BespokeError):
    """An adapter file or adapter tensors are malformed, unsafe or do not fit the base."""


class UnsafeFile(InvalidAdapter):
    """A file that could run code when loaded (pickle, PyTorch zip checkpoint)."""


class BaseMismatch(InvalidAdapter):
    """An adapter claims, or was made for, a different base than the one given."""


@dataclass(frozen=True)
class Limits:
    """Size bounds for untrusted adapters; generous for real LoRAs, small enough to stop abuse."""

    max_file_bytes: int = 1 << 30  # 1 GiB: an SDXL rank-128 LoRA with text encoders is ~0.9 GB
    max_header_bytes: int = 16 << 20
    max_tensors: int = 20_000
    max_rank: int = 1024


@dataclass(frozen=True)
class ModuleShape:
    """What a LoRA on one module must look like: ``Linear`` (kernel 1x1) or ``Conv2d``."""

    kind: str  # "linear" or "conv2d"
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Expected (lora_A, lora_B) shapes at ``rank``; peft's conv LoRA puts the kernel on A."""
        if self.kind == "linear":
            return (rank, self.in_features), (self.out_features, rank)
        return (rank, self.in_features, *self.kernel), (self.out_features, rank, 1, 1)


@dataclass(frozen=True)
class BaseSpec:
    """A base as adapters see it: its fingerprint and the shape of every LoRA-targetable module.

    Keys of ``modules`` are component-prefixed module paths (``unet.down_blocks.0...to_q``);
    ``embedding_dims`` gives each text encoder's token-embedding width.
    """

    fingerprint: str
    family: str
    modules: Mapping[str, ModuleShape]
    embedding_dims: Mapping[str, int] = field(default_factory=dict)
    weights_fingerprint: str | None = None  # every weight's, the VAE's too: what adapters recorded before the VAE was left out

    @property
    def fingerprints(self) -> Fingerprints:
        """Both fingerprints, so an adapter fits a spec by the same rule as it fits a loaded base."""
        return Fingerprints(self.fingerprint, self.weights_fingerprint or self.fingerprint)

    @classmethod
    def from_base(cls, base: Base) -> BaseSpec:
        return cls.from_pipeline(base.pipe, base.fingerprint, base.family, base.fingerprints.weights)

    @classmethod
    def from_pipeline(cls, pipe, fingerprint: str, family: str, weights_fingerprint: str | None = None) -> BaseSpec:
        modules: dict[str, ModuleShape] = {}
        dims: dict[str, int] = {}
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            for name, module in model.named_modules():
                shape = _module_shape(module)
                if shape is not None:
                    modules[f"{component}.{name}"] = shape
            if component.startswith("text_encoder"):
                dims[component] = int(model.get_input_embeddings().weight.shape[1])
        return cls(fingerprint=fingerprint, family=family, modules=modules, embedding_dims=dims, weights_fingerprint=weights_fingerprint)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BaseSpec:
        data = json.loads(text)
        modules = {k: ModuleShape(v["kind"], v["in_features"], v["out_features"], tuple(v["kernel"])) for k, v in data["modules"].items()}
        return cls(data["fingerprint"], data["family"], modules, data["embedding_dims"], data.get("weights_fingerprint"))


def _module_shape(module: torch.nn.Module) -> ModuleShape | None:
    # diffusers' LoRACompatibleLinear/Conv subclass these, so isinstance covers them too.
    if isinstance(module, torch.nn.Linear):
        return ModuleShape("linear", module.in_features, module.out_features)
    if isinstance(module, torch.nn.Conv2d) and module.groups == 1:
        return ModuleShape("conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size))
    return None


# --- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code: F16, BF16, F32
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def refuse_pickle_name(path: Path) -> None:
    """Refuse files whose name says they are pickles, before opening them."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFile(f"{path.name}: {path.suffix} files are pickles that can run code when loaded; only .safetensors is accepted")


def read_header(path: str | os.PathLike, limits: Limits = Limits()) -> SafetensorsHeader:
    """Parse and check a safetensors header without trusting it (see the module docstring)."""
    path = Path(path)
    refuse_pickle_name(path)
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise InvalidAdapter(f"{path.name}: {size} bytes is over the {limits.max_file_bytes}-byte limit")
        with open(path, "rb") as f:
            head = f.read(8)
            _refuse_pickle_content(path, head)
            if len(head) < 8:
                raise InvalidAdapter(f"{path.name}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > limits.max_header_bytes:
                raise InvalidAdapter(f"{path.name}: safetensors header claims {header_len} bytes, over the {limits.max_header_bytes}-byte limit")
            if 8 + header_len > size:
                raise InvalidAdapter(f"{path.name}: safetensors header claims {header_len} bytes but the file holds {size}")
            raw = f.read(header_len)
    except OSError as e:
        raise InvalidAdapter(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested deeper than Python recurses
        raise InvalidAdapter(f"{path.name}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path.name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidAdapter(f"{path.name}: safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise InvalidAdapter(f"{path.name}: {len(header)} tensors, over the {limits.max_tensors}-tensor limit")
    tensors, data_end = _check_entries(path.name, header)
    if 8 + header_len + data_end != size:
        raise InvalidAdapter(f"{path.name}: header declares {data_end} bytes of tensor data but the file holds {size - 8 - header_len}")
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def _refuse_pickle_content(path: Path, head: bytes) -> None:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise UnsafeFile(f"{path.name} is a pickle, not safetensors; pickles can run code when loaded and are refused")
    if head[:4] == b"PK\x03\x04":
        raise UnsafeFile(f"{path.name} is a zip (PyTorch checkpoint), not safetensors; pickled checkpoints are refused")


def _check_entries(name: str, header: dict) -> tuple[dict[str, TensorInfo], int]:
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InvalidAdapter(f"{name}: tensor {key!r} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFE_DTYPES:
            raise InvalidAdapter(f"{name}: tensor {key!r} has dtype {dtype}; only float16, bfloat16 and float32 are accepted")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidAdapter(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise InvalidAdapter(f"{name}: tensor {key!r} has invalid data offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise InvalidAdapter(f"{name}: tensor {key!r} offsets span {end - begin} bytes but its shape needs {math.prod(shape) * _ITEMSIZE[dtype]}")
        data_end = max(data_end, end)
        tensors[key] = TensorInfo(dtype, tuple(shape))
    return tensors, data_end


def load_safetensors(path: str | os.PathLike, limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check a file with :func:`read_header`, then load its tensors (memory-mapped) and metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_header(path, limits)
    try:
        return load_file(os.fspath(path)), header.metadata
    except (SafetensorError, OSError) as e:
        raise InvalidAdapter(f"{Path(path).name}: not a valid safetensors file ({e})") from e


# --- tensors against a base -------------------------------------------------------------------


def split_lora_key(key: str) -> tuple[str, str]:
    """``unet.x.y.lora_A.weight`` -> (``unet.x.y``, ``A``); refuses anything else with a clear error."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if module.split(".", 1)[0] in COMPONENTS and "." in module:
                return module, suffix[6]
    raise InvalidAdapter(f"tensor key {key!r} is not a LoRA weight (<component>.<module>.lora_A.weight or .lora_B.weight)")


def validate_adapter(adapter: LoraAdapter, spec: BaseSpec, limits: Limits = Limits()) -> None:
    """Check an adapter's claims and tensors against ``spec``; raises :class:`InvalidAdapter` on the first problem."""
    if adapter.base_fingerprint not in spec.fingerprints:
        raise BaseMismatch(f"adapter was made for base {adapter.base_fingerprint!r} but the base given is {spec.fingerprint!r}")
    if not isinstance(adapter.rank, int) or not 1 <= adapter.rank <= limits.max_rank:
        raise InvalidAdapter(f"rank {adapter.rank!r} is not an integer between 1 and {limits.max_rank}")
    if not (isinstance(adapter.alpha, (int, float)) and math.isfinite(adapter.alpha) and adapter.alpha > 0):
        raise InvalidAdapter(f"alpha {adapter.alpha!r} must be a finite positive number")
    if not adapter.tensors:
        raise InvalidAdapter("adapter holds no LoRA tensors")
    if len(adapter.tensors) + len(adapter.token_embeddings) > limits.max_tensors:
        raise InvalidAdapter(f"adapter holds more than {limits.max_tensors} tensors")
    if adapter.nbytes() > limits.max_file_bytes:
        raise InvalidAdapter(f"adapter holds {adapter.nbytes()} bytes, over the {limits.max_file_bytes}-byte limit")
    for name, text in (("trigger", adapter.trigger), ("class word", adapter.class_word)):
        check_text(name, text)
    pairs: dict[str, set[str]] = {}
    for key, tensor in adapter.tensors.items():
        module, which = split_lora_key(key)
        shape = spec.modules.get(module)
        if shape is None:
            raise InvalidAdapter(f"tensor {key!r} names no LoRA-targetable module (Linear or Conv2d) of the base")
        expected = shape.lora_shapes(adapter.rank)[which == "B"]
        if tuple(tensor.shape) != expected:
            raise InvalidAdapter(f"tensor {key!r} has shape {tuple(tensor.shape)}; the base module and rank {adapter.rank} need {expected}")
        _check_values(key, tensor)
        pairs.setdefault(module, set()).add(which)
    for module, found in sorted(pairs.items()):
        if found != {"A", "B"}:
            (present,) = found
            raise InvalidAdapter(f"module {module!r} has lora_{present} without lora_{'B' if present == 'A' else 'A'}")
    _validate_embeddings(adapter, spec)


def check_text(name: str, text: str | None) -> None:
    if text is None:
        return
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_FIELD:
        raise InvalidAdapter(f"{name} must be non-empty text of at most {MAX_TEXT_FIELD} characters")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS for c in text):  # C0, DEL, C1, line breaks
        raise InvalidAdapter(f"{name} {text!r} contains control characters")


def _check_values(key: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in TORCH_DTYPE_NAMES:
        raise InvalidAdapter(f"tensor {key!r} has dtype {tensor.dtype}; only float16, bfloat16 and float32 are accepted")
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidAdapter(f"tensor {key!r} contains NaN or infinite values")


def _validate_embeddings(adapter: LoraAdapter, spec: BaseSpec) -> None:
    if adapter.token_embeddings and not adapter.new_tokens:
        raise InvalidAdapter("adapter has token embeddings but names no new tokens")
    for token in adapter.new_tokens:
        check_text("new token", token)
    if len(set(adapter.new_tokens)) != len(adapter.new_tokens):
        raise InvalidAdapter("new tokens must be distinct")
    for component, tensor in adapter.token_embeddings.items():
        dim = spec.embedding_dims.get(component)
        if dim is None:
            raise InvalidAdapter(f"token embeddings for {component!r}, which the base does not have as a text encoder")
        if tuple(tensor.shape) != (len(adapter.new_tokens), dim):
            raise InvalidAdapter(f"token embeddings for {component} have shape {tuple(tensor.shape)}; expected {(len(adapter.new_tokens), dim)}")
        _check_values(f"{EMBEDDING_PREFIX}{component}", tensor)


def lora_dtype(adapter: LoraAdapter) -> str:
    """The adapter's tensor dtype name, or ``"mixed"``."""
    names = {TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in adapter.tensors.values()}
    return names.pop() if len(names) == 1 else "mixed"

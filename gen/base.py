"""Loading a base text-to-image model, and the fingerprints adapters and caches are checked against.

A base is loaded once per process and never moves; everything per user is small and moves
around it. ``load_base`` accepts the built-in model, any local diffusers folder of the SD
family, or a hub id (only when the caller opts into the network). Whatever the source, the
pipeline is loaded the same way from a local folder, so the built-in model gets no special path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

from gen.adapter import Fingerprints
from gen.errors import BaseLoadError, InvalidRequest
from gen.paths import BUILTIN_DIR, cache_dir

PIPELINE_FAMILIES: dict[str, tuple[str, type[DiffusionPipeline]]] = {
    "StableDiffusionPipeline": ("sd", StableDiffusionPipeline),
    "StableDiffusionXLPipeline": ("sdxl", StableDiffusionXLPipeline),
}
# Components whose weights an adapter attaches to or feeds (its fingerprint), then every weighted one, in a fixed order.
ADAPTED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHTED_COMPONENTS = (*ADAPTED_COMPONENTS, "vae")
# The weight-file stem each component's loader asks for: diffusers models, then transformers' text encoders.
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
BUILTIN_BASE_DIR = BUILTIN_DIR / "base"
DEFAULTS_FILE = "bespoke.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-base sampling defaults; a base folder may override them in ``bespoke.json``."""

    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    stand_in: bool = False  # true for a placeholder with untrained weights


@dataclass
class Base:
    """A loaded base pipeline plus what the rest of the system needs to know about it."""

    pipe: DiffusionPipeline
    family: str  # "sd" or "sdxl"
    source: str  # "builtin", a folder path or a hub id, as the user named it
    folder: Path | None  # where the weights were read from; None for a pipeline built in memory
    device: torch.device
    dtype: torch.dtype
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    @cached_property
    def fingerprints(self) -> Fingerprints:
        """Identity of the weights, independent of device and dtype (see :func:`fingerprint_folder`)."""
        if self.folder is not None:
            return fingerprint_folder(self.folder)
        return fingerprint_pipeline(self.pipe, self.family)

    @property
    def fingerprint(self) -> str:
        """What adapters are made for and checked against: the UNet and text encoders, not the VAE."""
        return self.fingerprints.adapted

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline, source: str = "memory") -> Base:
        """Wrap a pipeline built in memory (tests, training) without going through disk."""
        family = _family_of(type(pipe).__name__, source)
        param = next(pipe.unet.parameters())
        return cls(pipe=pipe, family=family, source=source, folder=None, device=param.device, dtype=param.dtype)


def resolve_device_dtype(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision when present, else CPU in float32; both overridable, and checked."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InvalidRequest(f"unknown device {str(device)!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device 'cuda' was requested but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequest("device 'mps' was requested but MPS is not available")

    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InvalidRequest(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidRequest(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if device.type == "cpu" and dtype == torch.float16:
        raise InvalidRequest("float16 cannot run on the cpu (missing kernels); use float32 or bfloat16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InvalidRequest("bfloat16 is not supported by this GPU; use float16")
    return device, dtype


def load_base(
    spec: str | os.PathLike = "builtin",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_network: bool = False,
) -> Base:
    """Load a base: ``"builtin"``, a local diffusers folder, or a hub id (needs ``allow_network``)."""
    device, dtype = resolve_device_dtype(device, dtype)
    source = os.fspath(spec)
    folder = _locate(source, allow_network)
    class_name = _read_model_index(folder).get("_class_name", "")
    family, pipeline_cls = PIPELINE_FAMILIES.get(class_name, (None, None))
    if pipeline_cls is None:
        _family_of(class_name, source)  # raises with the supported list

    defaults = _read_defaults(folder)  # before the weights: a bad file fails in a moment, not after a long load
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    with _quiet_hf():
        try:
            pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True, **extra)
            _check_loaded(pipe, folder)
            pipe.to(device)
        except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BaseLoadError(f"cannot load the pipeline in {folder}: {first_line}") from e
    return Base(pipe=pipe, family=family, source=source, folder=folder, device=device, dtype=dtype, defaults=defaults)


def _check_loaded(pipe: DiffusionPipeline, folder: Path) -> None:
    """Refuse a pipeline that loaded but cannot run, before its first step fails with a cryptic error.

    A weight file missing a tensor leaves that parameter on the meta device (moving it then fails
    with "Cannot copy out of meta tensor"); an inpainting or image-to-image UNet takes extra input
    channels beside the latents, which text-to-image sampling never supplies.
    """
    for component in WEIGHTED_COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.is_meta:
                raise BaseLoadError(f"cannot load the pipeline in {folder}: {component} weight {name} is missing from its weight file")
    unet_channels, latent_channels = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    if unet_channels != latent_channels:
        raise BaseLoadError(
            f"{folder} holds a UNet with {unet_channels} input channels for {latent_channels}-channel latents "
            "(an inpainting or image-to-image model?); only text-to-image bases are supported"
        )


def _family_of(class_name: str, source: str) -> str:
    if class_name not in PIPELINE_FAMILIES:
        supported = ", ".join(PIPELINE_FAMILIES)
        raise BaseLoadError(f"{source} holds a {class_name or 'pipeline of unknown class'}; supported pipelines: {supported}")
    return PIPELINE_FAMILIES[class_name][0]


def _locate(source: str, allow_network: bool) -> Path:
    """Map a base spec to a local folder, downloading only when explicitly allowed."""
    if source == "builtin":
        if not (BUILTIN_BASE_DIR / "model_index.json").is_file():
            raise BaseLoadError(f"the built-in base is missing from {BUILTIN_BASE_DIR}; reinstall the package")
        return BUILTIN_BASE_DIR
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseLoadError(f"{source} is a file, not a diffusers pipeline folder")
        return path.resolve()
    if not _looks_like_hub_id(source):
        raise BaseLoadError(f"no base at {source}: expected 'builtin', a local diffusers folder, or a hub id like 'org/name'")
    return _hub_snapshot(source, allow_network)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not source.startswith(("/", "~", "."))


def _weight_patterns(component: str) -> list[str]:
    name = _WEIGHT_NAMES[component]
    return [f"{component}/{name}.safetensors", f"{component}/{name}-?????-of-?????.safetensors"]


# What load_base reads, and no more: SD repos also ship fp16/non-EMA variants, root single-file
# checkpoints and a safety checker, several gigabytes that would never be loaded.
_HUB_PATTERNS = ["*.json", "*/*.txt", "*/*.model", *(p for c in WEIGHTED_COMPONENTS for p in _weight_patterns(c))]


def _hub_snapshot(repo_id: str, allow_network: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS
    try:
        with _quiet_hf():
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if not allow_network:
            raise BaseLoadError(
                f"{repo_id} is not a local folder and not in the local hub cache; "
                "pass allow_network=True (CLI: --allow-network) to download it"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise BaseLoadError(f"cannot download {repo_id}: {str(e).splitlines()[0]}") from e


def _read_json_object(path: Path) -> dict:
    """A JSON object from a file the user supplied; anything else is their folder's fault, said in one line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BaseLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BaseLoadError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise BaseLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    data = _read_json_object(index)
    if not isinstance(data.get("_class_name", ""), str):
        raise BaseLoadError(f"{index}: _class_name must be a string")
    return data


def _read_defaults(folder: Path) -> SamplingDefaults:
    """The folder's ``bespoke.json`` sampling defaults, type-checked here so a bad one is blamed on the base, not on a request."""
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return SamplingDefaults()
    data = _read_json_object(path).get("sampling", {})
    if not isinstance(data, dict):
        raise BaseLoadError(f"{path}: 'sampling' must be an object, not {type(data).__name__}")
    defaults = SamplingDefaults()
    known = {k: v for k, v in data.items() if k in SamplingDefaults.__dataclass_fields__}
    for key, value in known.items():
        expected = type(getattr(defaults, key))
        numeric = (int, float) if expected is float else expected
        if not isinstance(value, numeric) or (isinstance(value, bool) and expected is not bool):
            raise BaseLoadError(f"{path}: sampling.{key} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return SamplingDefaults(**{k: float(v) if isinstance(getattr(defaults, k), float) else v for k, v in known.items()})


class _quiet_hf:
    """Silence diffusers/transformers info logs and loading bars; our own progress is shown instead."""

    def __enter__(self):
        self._levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc):
        diffusers_logging.set_verbosity(self._levels[0])
        transformers_logging.set_verbosity(self._levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


# --- fingerprints -----------------------------------------------------------------------------
#
# A fingerprint hashes every weight tensor's name, dtype, shape and bytes as stored, component
# by component. The same weights give the same fingerprint whether they are read from a folder
# or held by a pipeline built in memory, and whatever device or dtype the pipeline runs in.
# Hashing a large folder takes seconds, so folder results are cached on disk, keyed by each
# weight file's path, size, modification time, inode and status-change time. The last two are
# what tools cannot set back (`cp -p`, rsync and `touch -r` restore mtime, not ctime), so a file
# rewritten to the same size and mtime is hashed again rather than trusted.


class _Hashers:
    """Feeds one pass over the components into both fingerprints."""

    def __init__(self, family: str):
        self.adapted, self.weights = hashlib.sha256(family.encode()), hashlib.sha256(family.encode())

    def component(self, component: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        hashers = [self.weights] + ([self.adapted] if component in ADAPTED_COMPONENTS else [])

        def update(chunk: bytes) -> None:
            for hasher in hashers:
                hasher.update(chunk)

        update(f"#{component}".encode())
        for name, tensor in sorted(named, key=lambda kv: kv[0]):  # one tensor's bytes at a time
            t = tensor.detach().to("cpu").contiguous()
            update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
            update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    def result(self) -> Fingerprints:
        return Fingerprints(self.adapted.hexdigest()[:16], self.weights.hexdigest()[:16])


def fingerprint_pipeline(pipe: DiffusionPipeline, family: str) -> Fingerprints:
    """Fingerprints of a pipeline held in memory (hashes its state dicts)."""
    hashers = _Hashers(family)
    for name in WEIGHTED_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            hashers.component(name, module.state_dict().items())
    return hashers.result()


def _weight_files(folder: Path, component: str) -> list[Path]:
    """The files ``from_pretrained`` (no variant) reads for a component, so extra files cannot change a fingerprint.

    Hub repos keep variants beside the weights (``model.fp16.safetensors``, ``*.non_ema.safetensors``)
    that are never loaded. A sharded component is read through its index; diffusers tries the
    index before the single file, transformers the single file first, and this follows each.
    """
    directory, name = folder / component, _WEIGHT_NAMES[component]
    single, index = directory / f"{name}.safetensors", directory / f"{name}.safetensors.index.json"
    if single.is_file() and not (name == "diffusion_pytorch_model" and index.is_file()):
        return [single]
    if not index.is_file():
        return []
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v for v in weight_map.values()):
        raise BaseLoadError(f"{index} has no valid weight_map (file names in the folder)")
    return sorted({directory / shard for shard in weight_map.values()})


def fingerprint_folder(folder: str | os.PathLike) -> Fingerprints:
    """Fingerprints of a diffusers folder, cached on disk by the weight files' stat (see above)."""
    folder = Path(folder).resolve()
    class_name = _read_model_index(folder).get("_class_name", "")
    family = _family_of(class_name, str(folder))
    files = [(c, f) for c in WEIGHTED_COMPONENTS for f in _weight_files(folder, c)]
    stats = [(c, f, f.stat()) for c, f in files]
    key = hashlib.sha256(
        json.dumps([[c, str(f), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for c, f, st in stats]).encode()
    ).hexdigest()
    cache_file = cache_dir() / "fingerprints.json"
    cached = _read_json(cache_file)
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and set(entry) == {"adapted", "weights"} and all(isinstance(v, str) for v in entry.values()):
        return Fingerprints(**entry)  # anything else (the single-hash scheme's strings, a damaged file) is recomputed
    cached = cached if isinstance(cached, dict) else {}

    hashers = _Hashers(family)
    for component in WEIGHTED_COMPONENTS:
        component_files = _weight_files(folder, component)
        if not component_files:
            continue
        named = []
        for path in component_files:
            with safe_open(path, framework="pt") as f:
                named += [(k, f.get_tensor(k)) for k in f.keys()]
        hashers.component(component, named)
    fingerprints = hashers.result()
    cached[key] = asdict(fingerprints)
    _write_json_atomic(cache_file, cached)
    return fingerprints


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    """Best effort: the cache is an optimisation, so a read-only home must not break loading."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass

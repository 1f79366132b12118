"""LoRA adapters in and out of the three on-disk conventions that matter.

* **diffusers** — a folder holding ``pytorch_lora_weights.safetensors``; keys
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``/``text_encoder_2.`` too);
  the LoRA config as JSON in the safetensors header under ``lora_adapter_metadata``, flat and
  prefixed by component (``{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...]}``),
  exactly as ``diffusers.loaders.lora_base.write_lora_layers`` writes it and ``_fetch_state_dict``
  reads it back. Without that metadata diffusers reloads an adapter with alpha = rank, so it is
  always written.
* **peft** — a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, keys prefixed
  ``base_model.model.``. A peft folder describes one model: the UNet's adapter sits at the root,
  each text encoder's in a ``text_encoder/`` or ``text_encoder_2/`` subfolder.
* **kohya** — one file, keys ``lora_unet_<path_with_underscores>.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha`` (``lora_te_``, ``lora_te1_``, ``lora_te2_`` for text encoders),
  ``ss_*`` and ``modelspec.*`` header fields. The per-module ``.alpha`` holds the adapter's real
  alpha (diffusers' own kohya export writes alpha = rank, which changes the strength).

Our own short fields ride in every header as ``bespoke.<field>`` (JSON values), so a file is
self-describing whatever its format. New token embeddings (pivotal tuning) travel inline in the
registry's blobs (``token_embeddings.<component>`` keys), in ``token_embeddings.safetensors``
beside diffusers/peft exports, and as A1111 ``bundle_emb`` keys in kohya files.

Import detects the format from the file or folder, converts to our key convention (which is
diffusers'), folds per-module alphas into ``lora_B`` so one alpha describes the adapter, and
validates everything against the base (:func:`adapters.validate.validate_adapter`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from adapters.format_names import FORMATS
from adapters.validate import (
    EMBEDDING_PREFIX,
    PICKLE_SUFFIXES,
    SAFE_DTYPES,
    BaseSpec,
    InvalidAdapter,
    Limits,
    UnsafeFile,
    load_safetensors,
    read_header,
    refuse_pickle_name,
    split_lora_key,
    validate_adapter,
)
from gen.adapter import COMPONENTS, LoraAdapter

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig.lora_alpha default
EMBEDDINGS_NAME = "token_embeddings.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
BESPOKE_PREFIX = "bespoke."
MAX_CONFIG_BYTES = 1 << 20
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
KOHYA_SUFFIXES = {"lora_down.weight": "A", "lora_up.weight": "B"}
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # a module path, as alpha_pattern keys name them
_DTYPE_CODES = {dtype: code for code, dtype in SAFE_DTYPES.items()}
KOHYA_EMBED_KEYS = {"string_to_param.*": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}


# --- header fields ----------------------------------------------------------------------------


def bespoke_metadata(adapter: LoraAdapter, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """Our short fields as ``bespoke.<name>`` header entries, each a JSON value; ``None`` is left out."""
    fields = {
        "format_version": 1,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "base_fingerprint": adapter.base_fingerprint,
        "target_modules": list(adapter.target_modules),
        "trigger": adapter.trigger,
        "class_word": adapter.class_word,
        "new_tokens": list(adapter.new_tokens) or None,
        **(extra or {}),
    }
    return {BESPOKE_PREFIX + k: json.dumps(v) for k, v in fields.items() if v is not None}


# What the fields that shape an adapter must hold when a file sets them (others are kept as they come)
_BESPOKE_TYPES = {"target_modules": "a list of module names", "new_tokens": "a list of tokens", "trigger": "text", "class_word": "text", "base_fingerprint": "text"}


def read_bespoke_metadata(metadata: Mapping[str, str]) -> dict[str, object]:
    """Inverse of :func:`bespoke_metadata`; malformed entries are refused, not guessed."""
    out = {}
    for key, value in metadata.items():
        if key.startswith(BESPOKE_PREFIX):
            name = key[len(BESPOKE_PREFIX):]
            out[name] = _parse_json(value, f"header field {key!r}")
            if name in _BESPOKE_TYPES and out[name] is not None and not _holds(out[name], _BESPOKE_TYPES[name]):
                raise InvalidAdapter(f"header field {key!r} must be {_BESPOKE_TYPES[name]}, not {value[:80]}")
    return out


def _holds(value: object, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting deeper than Python recurses
        raise InvalidAdapter(f"{what} is not valid JSON") from e


def diffusers_lora_metadata(adapter: LoraAdapter) -> dict[str, object]:
    """The ``lora_adapter_metadata`` dict diffusers turns into a ``LoraConfig`` per component.

    ``target_modules`` lists the exact module paths that carry tensors, so peft injects LoRA
    layers into those modules and no others.
    """
    out: dict[str, object] = {}
    for component, modules in _modules_by_component(adapter).items():
        out[f"{component}.r"] = adapter.rank
        out[f"{component}.lora_alpha"] = adapter.alpha
        out[f"{component}.target_modules"] = modules
    return out


def _modules_by_component(adapter: LoraAdapter) -> dict[str, list[str]]:
    found: dict[str, set[str]] = {}
    for key in adapter.tensors:
        module, _ = split_lora_key(key)
        component, path = module.split(".", 1)
        found.setdefault(component, set()).add(path)
    return {c: sorted(found[c]) for c in COMPONENTS if c in found}


# --- writing ----------------------------------------------------------------------------------


def encode_adapter(adapter: LoraAdapter, extra: Mapping[str, object] | None = None) -> bytes:
    """The registry's blob: a diffusers-layout safetensors file with embeddings inline and all header fields."""
    tensors = {**adapter.tensors, **{EMBEDDING_PREFIX + c: t for c, t in adapter.token_embeddings.items()}}
    return _safetensors_bytes(tensors, _diffusers_header(adapter, extra))


def _diffusers_header(adapter: LoraAdapter, extra: Mapping[str, object] | None) -> dict[str, str]:
    return {"format": "pt", LORA_METADATA_KEY: json.dumps(diffusers_lora_metadata(adapter), sort_keys=True), **bespoke_metadata(adapter, extra)}


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize deterministically: the same adapter always gives the same bytes, hence the same sha256.

    ``safetensors.torch.save`` writes header metadata in hash-map order, which differs from call
    to call; this writes the same format with sorted keys (8-byte aligned, as the spec asks).
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def _write_file(path: Path, data: bytes) -> Path:
    """Write beside the target and rename, so a reader never sees a half-written export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: leave no half file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


# Every file a diffusers or peft export may write, relative to its folder. An export removes the ones it did not
# write this time: a stale adapter_config.json or text_encoder/ from an earlier export would otherwise be read
# back as part of this adapter (and a peft config outranks diffusers weights when the format is detected).
EXPORT_FILES = (
    DIFFUSERS_WEIGHT_NAME, EMBEDDINGS_NAME, PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME,
    *(f"{component}/{name}" for component in COMPONENTS[1:] for name in (PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME)),
)


def _write_folder(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (relative name -> bytes), then remove the other export files an earlier export left.

    Only files an export of ours wrote are replaced or removed: a folder holding someone else's
    adapter under those names is refused before anything is written.
    """
    foreign = [name for name in EXPORT_FILES if (folder / name).is_file() and not _exported_here(folder / name)]
    if foreign:
        raise InvalidAdapter(f"{folder} holds {foreign[0]}, which bespoke did not write; export into an empty or new folder")
    for name, data in files.items():
        _write_file(folder / name, data)
    for name in EXPORT_FILES:
        if name not in files:
            (folder / name).unlink(missing_ok=True)
    for component in COMPONENTS[1:]:
        if (folder / component).is_dir() and not any((folder / component).iterdir()):
            (folder / component).rmdir()


def _exported_here(path: Path) -> bool:
    """Whether an export file is ours: its weights' header carries our fields (a peft config goes by its weights)."""
    weights = path if path.suffix == ".safetensors" else path.with_name(PEFT_WEIGHT_NAME)
    try:
        metadata = read_header(weights).metadata
    except (InvalidAdapter, UnsafeFile):
        return False
    return any(k.startswith(BESPOKE_PREFIX) for k in metadata) or (path.name == EMBEDDINGS_NAME and "new_tokens" in metadata)


def _embedding_files(adapter: LoraAdapter) -> dict[str, bytes]:
    if not adapter.token_embeddings:
        return {}
    metadata = {"new_tokens": json.dumps(list(adapter.new_tokens))}
    return {EMBEDDINGS_NAME: _safetensors_bytes(adapter.token_embeddings, metadata)}


def write_diffusers(adapter: LoraAdapter, folder: str | os.PathLike, extra: Mapping[str, object] | None = None) -> Path:
    """``folder/pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights`` with alpha intact."""
    folder = Path(folder)
    weights = _safetensors_bytes(adapter.tensors, _diffusers_header(adapter, extra))
    _write_folder(folder, {DIFFUSERS_WEIGHT_NAME: weights, **_embedding_files(adapter)})
    return folder / DIFFUSERS_WEIGHT_NAME


def write_peft(adapter: LoraAdapter, folder: str | os.PathLike, extra: Mapping[str, object] | None = None) -> Path:
    """A peft folder: the UNet's adapter at the root, text encoders' in subfolders named after them."""
    folder = Path(folder)
    header = {"format": "pt", **bespoke_metadata(adapter, extra)}
    files = {}
    for component, modules in _modules_by_component(adapter).items():
        sub = "" if component == "unet" else f"{component}/"
        tensors = {PEFT_PREFIX + k: v for k, v in adapter.component_tensors(component).items()}
        files[sub + PEFT_WEIGHT_NAME] = _safetensors_bytes(tensors, header)
        files[sub + PEFT_CONFIG_NAME] = json.dumps(_peft_config(adapter, modules), indent=2).encode()
    _write_folder(folder, {**files, **_embedding_files(adapter)})
    return folder


def _peft_config(adapter: LoraAdapter, modules: list[str]) -> dict:
    """The fields of peft's ``LoraConfig`` that matter; peft fills the rest with its defaults."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_kohya(adapter: LoraAdapter, path: str | os.PathLike, extra: Mapping[str, object] | None = None) -> Path:
    """One kohya/A1111 file whose per-module ``.alpha`` is the adapter's real alpha (not the rank)."""
    path = Path(path)
    te1 = "lora_te1_" if any(k.startswith("text_encoder_2.") for k in adapter.tensors) else "lora_te_"
    prefixes = {"unet": "lora_unet_", "text_encoder": te1, "text_encoder_2": "lora_te2_"}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        module, which = split_lora_key(key)
        component, module_path = module.split(".", 1)
        name = prefixes[component] + module_path.replace(".", "_")
        tensors[f"{name}.{'lora_down' if which == 'A' else 'lora_up'}.weight"] = tensor
        tensors[f"{name}.alpha"] = torch.tensor(float(adapter.alpha), dtype=torch.float32)
    sdxl = "text_encoder_2" in adapter.token_embeddings
    for component, emb in adapter.token_embeddings.items():
        suffix = ("clip_l" if component == "text_encoder" else "clip_g") if sdxl else "string_to_param.*"
        for i, token in enumerate(adapter.new_tokens):
            tensors[f"bundle_emb.{token}.{suffix}"] = emb[i : i + 1]
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": _number(adapter.alpha),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        **({"modelspec.trigger_phrase": adapter.trigger} if adapter.trigger else {}),
        **bespoke_metadata(adapter, extra),
    }
    return _write_file(path, _safetensors_bytes(tensors, header))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


WRITERS = {"diffusers": write_diffusers, "peft": write_peft, "kohya": write_kohya}


def write_adapter(adapter: LoraAdapter, out: str | os.PathLike, fmt: str, extra: Mapping[str, object] | None = None) -> Path:
    """Export in ``fmt``: ``out`` is a folder for diffusers and peft, a ``.safetensors`` file for kohya."""
    if fmt not in WRITERS:
        raise InvalidAdapter(f"unknown adapter format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "kohya" and Path(out).suffix != ".safetensors":
        raise InvalidAdapter(f"a kohya export is one file; name it *.safetensors (got {os.fspath(out)!r})")
    return WRITERS[fmt](adapter, out, extra)


# --- reading ----------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike, limits: Limits = Limits()) -> tuple[str, Path]:
    """Which convention ``path`` follows, and the file or folder to read it from."""
    path = Path(path)
    if path.is_dir():
        if any((path / sub / PEFT_CONFIG_NAME).is_file() for sub in ("", *COMPONENTS[1:])):
            return "peft", path
        candidates = [path / DIFFUSERS_WEIGHT_NAME] if (path / DIFFUSERS_WEIGHT_NAME).is_file() else [
            p for p in sorted(path.glob("*.safetensors")) if p.name != EMBEDDINGS_NAME
        ]
        if len(candidates) != 1:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickles and not candidates:
                raise UnsafeFile(f"{path} holds only pickled weights ({pickles[0]}); only .safetensors is accepted")
            raise InvalidAdapter(f"{path} holds {len(candidates)} candidate .safetensors files; pass the adapter file itself")
        path = candidates[0]
    elif not path.is_file():
        raise InvalidAdapter(f"no adapter at {path}")
    keys = list(read_header(path, limits).tensors)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya", path
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        if not (path.parent / PEFT_CONFIG_NAME).is_file():
            raise InvalidAdapter(f"{path.name} holds peft weights but no {PEFT_CONFIG_NAME} lies beside it, so its alpha is unknown")
        return "peft", path.parent
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers", path
    raise InvalidAdapter(f"{path.name} is not a LoRA in diffusers, peft or kohya layout (first key: {keys[0] if keys else 'none'!r})")


def read_adapter(path: str | os.PathLike, spec: BaseSpec, limits: Limits = Limits()) -> tuple[LoraAdapter, str]:
    """Read an adapter in any supported format, validated against ``spec``; returns it and its format.

    An adapter that names no base fingerprint in its header is taken to be for ``spec``'s base;
    its keys and shapes are then the check.
    """
    fmt, source = detect_format(path, limits)
    tensors, module_alphas, meta, embeddings = _READERS[fmt](source, spec, limits)
    adapter = _assemble(tensors, module_alphas, meta, embeddings, spec)
    validate_adapter(adapter, spec, limits)
    return adapter, fmt


# A reader returns: LoRA tensors under our keys, each module's alpha (None: alpha = rank), the
# file's header metadata, and token embeddings (component -> tensor, new tokens).
Embeddings = tuple[dict[str, torch.Tensor], tuple[str, ...]]


def _read_diffusers(path: Path, spec: BaseSpec, limits: Limits):
    tensors, meta = load_safetensors(path, limits)
    inline = {k[len(EMBEDDING_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(EMBEDDING_PREFIX)}
    embeddings = (inline, tuple(read_bespoke_metadata(meta).get("new_tokens") or ())) if inline else _read_embeddings(path.parent, limits)
    config = _json_field(meta, LORA_METADATA_KEY, path, dict)
    alphas = {}
    for key, tensor in tensors.items():
        module, which = split_lora_key(key)
        if which == "A":
            component, module_path = module.split(".", 1)
            sub = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
            alphas[module] = _config_alpha(sub, module_path, _rank_of(key, tensor)) if sub else None
    return tensors, alphas, meta, embeddings


def _read_peft(folder: Path, spec: BaseSpec, limits: Limits):
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float | None] = {}
    meta: dict[str, str] = {}
    for component in COMPONENTS:
        sub = folder if component == "unet" else folder / component
        if not (sub / PEFT_CONFIG_NAME).is_file():
            continue
        config = {"lora_alpha": PEFT_DEFAULT_ALPHA, **_read_json_file(sub / PEFT_CONFIG_NAME)}  # what peft reads a config without it as
        _check_peft_config(config, sub)
        weights = sub / PEFT_WEIGHT_NAME
        if not weights.is_file():
            if (sub / "adapter_model.bin").exists():
                refuse_pickle_name(sub / "adapter_model.bin")
            raise InvalidAdapter(f"{sub} has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHT_NAME}")
        part, part_meta = load_safetensors(weights, limits)
        meta = meta or part_meta
        for key, tensor in part.items():
            if not key.startswith(PEFT_PREFIX):
                raise InvalidAdapter(f"{weights.name}: key {key!r} lacks the peft prefix {PEFT_PREFIX!r}")
            ours = f"{component}.{key[len(PEFT_PREFIX):]}"
            module, which = split_lora_key(ours)
            tensors[ours] = tensor
            if which == "A":
                alphas[module] = _config_alpha(config, module.split(".", 1)[1], _rank_of(ours, tensor))
    if not tensors:
        raise InvalidAdapter(f"{folder} holds no peft adapter (no {PEFT_CONFIG_NAME} with weights)")
    return tensors, alphas, meta, _read_embeddings(folder, limits)


def _check_peft_config(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only LORA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise InvalidAdapter(f"{where}: {flag}=true adapters are not supported")


def _read_kohya(path: Path, spec: BaseSpec, limits: Limits):
    raw, meta = load_safetensors(path, limits)
    table = _kohya_names(spec)
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float | None] = {}
    bundles: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        name, _, rest = key.partition(".")
        if name == "bundle_emb":  # bundle_emb.<token>.<part>, where a token may hold dots and a part may too
            part = next((p for p in KOHYA_EMBED_KEYS if rest.endswith("." + p) and len(rest) > len(p) + 1), None)
            if part is None:
                raise InvalidAdapter(f"{path.name}: unsupported embedding key {key!r}")
            bundles.setdefault(KOHYA_EMBED_KEYS[part], {})[rest[: -len(part) - 1]] = tensor
            continue
        module = table.get(name)
        if module is None:
            raise InvalidAdapter(f"{path.name}: kohya key {key!r} names no LoRA-targetable module of the base")
        if rest == "alpha":
            alphas[module] = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan
        elif rest in KOHYA_SUFFIXES:
            tensors[f"{module}.lora_{KOHYA_SUFFIXES[rest]}.weight"] = tensor
        else:
            raise InvalidAdapter(f"{path.name}: kohya key {key!r} is not a plain LoRA weight (LoHa, LoKr and DoRA are not supported)")
    header_alpha = meta.get("ss_network_alpha")  # may be "Dynamic" (kohya's resize_lora): read only where a module needs it
    for key in tensors:
        module, _ = split_lora_key(key)
        if module not in alphas and header_alpha is not None:
            alphas[module] = _parse_float(header_alpha, "ss_network_alpha")
        elif header_alpha is not None and _same_float32(header_alpha, alphas[module]):
            alphas[module] = float(header_alpha)  # the .alpha tensor is float32 (0.1 reads 0.10000000149); the header has the digits
    tokens = tuple(next(iter(bundles.values()), {}))
    declared = tuple(read_bespoke_metadata(meta).get("new_tokens") or ())
    if set(declared) == set(tokens):
        tokens = declared  # keys come back sorted; the header keeps the tokens' order
    if any(set(b) != set(tokens) for b in bundles.values()):
        raise InvalidAdapter(f"{path.name}: bundle_emb entries do not name the same tokens for every text encoder")
    for component, bundle in bundles.items():
        if len({t.numel() for t in bundle.values()}) > 1:
            raise InvalidAdapter(f"{path.name}: bundle_emb entries for {component} differ in size ({sorted({t.numel() for t in bundle.values()})})")
    embeddings = {c: torch.cat([bundles[c][t].reshape(1, -1) for t in tokens]) for c in bundles}
    if "trigger" not in read_bespoke_metadata(meta) and meta.get("modelspec.trigger_phrase"):
        meta = {**meta, BESPOKE_PREFIX + "trigger": json.dumps(meta["modelspec.trigger_phrase"])}
    return tensors, alphas, meta, (embeddings, tokens)


def _same_float32(text: str, value: float) -> bool:
    """Whether ``text`` is a number that rounds to ``value`` in float32."""
    try:
        return float(torch.tensor(float(text), dtype=torch.float32)) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _kohya_names(spec: BaseSpec) -> dict[str, str]:
    """kohya name -> our module path. Underscores lose information, so a clash is refused, not guessed."""
    table: dict[str, str] = {}
    clashes = set()
    for module in spec.modules:
        component, path = module.split(".", 1)
        for prefix in KOHYA_PREFIXES.get(component, ()):
            name = prefix + path.replace(".", "_")
            if name in table:
                clashes.add(name)
            table[name] = module
    return {k: v for k, v in table.items() if k not in clashes}


_READERS = {"diffusers": _read_diffusers, "peft": _read_peft, "kohya": _read_kohya}


def _read_embeddings(folder: Path, limits: Limits) -> Embeddings:
    path = folder / EMBEDDINGS_NAME
    if not path.is_file():
        return {}, ()
    tensors, meta = load_safetensors(path, limits)
    tokens = _json_field(meta, "new_tokens", path, list)
    if not _holds(tokens, _BESPOKE_TYPES["new_tokens"]):
        raise InvalidAdapter(f"{path.name}: header field 'new_tokens' must be {_BESPOKE_TYPES['new_tokens']}")
    return tensors, tuple(tokens)


def _config_alpha(config: Mapping, module_path: str, rank: int | None) -> float | None:
    """A module's effective alpha under a peft ``LoraConfig`` dict (alpha_pattern, rsLoRA included).

    Patterns match the way peft's ``get_pattern_key`` does. rsLoRA scales by alpha/sqrt(r); that
    is the same as a plain LoRA with alpha*sqrt(r), which is how it is kept.
    """
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapter("alpha_pattern must map module names to alphas")
    for pattern, value in patterns.items():
        if not MODULE_NAME.fullmatch(pattern):  # a regex from a file could backtrack for hours, so only names are read
            raise InvalidAdapter(f"alpha_pattern key {pattern[:80]!r} is not a module name; regular expressions are not accepted from files")
        if module_path == pattern or module_path.endswith("." + pattern):  # peft's (.*\.)?(name)$ for a plain name
            alpha = value
            break
    if alpha is None:
        return None
    alpha = _parse_float(alpha, "lora_alpha")
    if config.get("use_rslora") and rank:
        alpha *= math.sqrt(rank)
    return alpha


def _rank_of(key: str, tensor: torch.Tensor) -> int:
    """A lora_A's rank, its first dimension; a LoRA matrix has at least two (Conv2d's have four)."""
    if tensor.ndim < 2:
        raise InvalidAdapter(f"tensor {key!r} has shape {tuple(tensor.shape)}; a LoRA weight has at least 2 dimensions")
    return int(tensor.shape[0])


def _assemble(tensors: dict[str, torch.Tensor], module_alphas: Mapping[str, float | None], meta: Mapping[str, str], embeddings: Embeddings, spec: BaseSpec) -> LoraAdapter:
    """One rank and one alpha for the whole adapter; modules with another alpha get it folded into B."""
    if not tensors:
        raise InvalidAdapter("the file holds no LoRA tensors")
    ranks = Counter(_rank_of(k, t) for k, t in tensors.items() if k.endswith(".lora_A.weight"))
    if not ranks:
        raise InvalidAdapter("the file holds lora_B tensors but no lora_A")
    rank = ranks.most_common(1)[0][0]
    modules = {split_lora_key(k)[0] for k in tensors}
    per_module = {m: float(rank) if module_alphas.get(m) is None else module_alphas[m] for m in sorted(modules)}
    bad = [m for m, a in per_module.items() if not (math.isfinite(a) and a > 0)]
    if bad:
        raise InvalidAdapter(f"module {bad[0]!r} has alpha {per_module[bad[0]]!r}; alpha must be a finite positive number")
    alpha = Counter(per_module.values()).most_common(1)[0][0]
    folded = dict(tensors)
    for module, module_alpha in per_module.items():
        key = f"{module}.lora_B.weight"
        if module_alpha != alpha and key in folded:
            folded[key] = (folded[key].float() * (module_alpha / alpha)).to(folded[key].dtype)
    fields = read_bespoke_metadata(meta)
    emb, tokens = embeddings
    targets = fields.get("target_modules") or sorted(modules)
    return LoraAdapter(
        tensors=folded,
        rank=int(rank),
        alpha=float(alpha),
        target_modules=tuple(targets),
        base_fingerprint=str(fields.get("base_fingerprint", spec.fingerprint)),
        trigger=fields.get("trigger"),
        class_word=fields.get("class_word"),
        new_tokens=tokens,
        token_embeddings=emb,
    )


def _json_field(meta: Mapping[str, str], key: str, path: Path, kind: type):
    """A header field holding JSON of type ``kind`` (empty when absent)."""
    if key not in meta:
        return kind()
    value = _parse_json(meta[key], f"{path.name}: header field {key!r}")
    if not isinstance(value, kind):
        raise InvalidAdapter(f"{path.name}: header field {key!r} must be a JSON {'object' if kind is dict else 'list'}")
    return value


def _read_json_file(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidAdapter(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path} is not a JSON object")
    return data


def _parse_float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise InvalidAdapter(f"{name} {value!r} is not a number") from e


# --- reference application --------------------------------------------------------------------


def lora_delta(adapter: LoraAdapter, module: str) -> torch.Tensor:
    """The weight update ``alpha / rank * B @ A`` of one module (``component.path``), in float32.

    Conv LoRAs flatten A's kernel into its columns; the product reshapes to the conv weight.
    """
    a = adapter.tensors[f"{module}.lora_A.weight"].float()
    b = adapter.tensors[f"{module}.lora_B.weight"].float()
    delta = b.flatten(1) @ a.flatten(1)
    return adapter.scale * (delta.reshape(b.shape[0], *a.shape[1:]) if a.ndim == 4 else delta)


def apply_lora_reference(model: torch.nn.Module, adapter: LoraAdapter, component: str = "unet") -> torch.nn.Module:
    """A deep copy of ``model`` with the adapter's ``component`` LoRAs merged (W + alpha/r * B @ A).

    The plainest possible application, with no LoRA library in the way: the ground truth that
    conversions and loaders are checked against.
    """
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for key in adapter.tensors:
            module, which = split_lora_key(key)
            owner, path = module.split(".", 1)
            if owner == component and which == "A":
                weight = modules[path].weight
                weight += lora_delta(adapter, module).to(weight.dtype)
    return merged

"""Generate the bad-input corpus: hostile and broken files, deterministic and small (well under 1 MB).

Every entry point that takes a user's file is fed this corpus by ``tests/robustness``; each case
names what must happen (refused with an error naming the problem, or accepted and normalized).
The corpus is made on demand (tests make it into a temp folder), never committed.

    python scripts/make_bad_inputs.py OUT_DIR            # images/ and adapters/ for the tiny SD pipeline
    python scripts/make_bad_inputs.py OUT_DIR --base builtin

Layout: ``OUT_DIR/images/<case>``, ``OUT_DIR/adapters/<case>`` (a file or a folder), a
``manifest.json`` describing each case, and ``UNPICKLED``, never: the pickles' ``__reduce__`` would
create it (``os.mkdir``) if anything ever unpickled them. Text cases (captions, names) are plain
data here (:data:`CAPTIONS`, :data:`NAMES`), since they reach the code as strings, not files.

Decompression bombs are made cheaply: a PNG whose header claims 20000x20000 pixels with almost no
data. A checker that decodes before checking would try to allocate 1.2 GB; ours must refuse it from
the header alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = "UNPICKLED"


@dataclass(frozen=True)
class Case:
    """One corpus entry: what it is, and what must happen when a user hands it over."""

    name: str  # file (or folder) name under images/ or adapters/
    what: str
    expect: str  # "refused" or "accepted"
    match: str  # regex the error must match (refused), or what acceptance means (accepted)


# --- images -----------------------------------------------------------------------------------

def _noise(size: tuple[int, int] = (64, 48), seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` with a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def _scrambled(data: bytes, marker: bytes, offset: int, length: int) -> bytes:
    out = bytearray(data)
    start = out.index(marker) + offset
    for i in range(start, start + length):
        out[i] ^= 0xA5
    return bytes(out)


def _zeroed(data: bytes, marker: bytes, offset: int, length: int) -> bytes:
    out = bytearray(data)
    start = out.index(marker) + offset
    out[start : start + length] = bytes(length)
    return bytes(out)


def _animated(fmt: str) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0))]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _cmyk() -> bytes:
    from PIL import Image

    return _encoded(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95)


def _sixteen_bit() -> bytes:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    return _encoded(Image.fromarray(ramp), "PNG")


def _exif_rotated() -> bytes:
    from PIL import Image

    im = Image.new("RGB", (60, 30), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 30))  # red on the left edge: on top once upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encoded(im, "JPEG", exif=exif, quality=95)


def _mpo() -> bytes:
    """A camera-style multi-picture JPEG (a still plus a preview): a photo, not an animation."""
    from PIL import Image

    frames = [_noise((48, 48), 3), Image.new("RGB", (48, 48), (9, 9, 9))]
    return _encoded(frames[0], "MPO", save_all=True, append_images=frames[1:])


_JPEG = lambda: _encoded(_noise(), "JPEG", quality=90)  # noqa: E731
_PNG = lambda: _encoded(_noise(), "PNG")  # noqa: E731

IMAGES: dict[str, tuple[str, str, str, Callable[[], bytes]]] = {
    # name: (what, expect, match, bytes)
    "truncated.jpg": ("JPEG cut in half", "refused", r"corrupt or truncated", lambda: _JPEG()[: len(_JPEG()) // 2]),
    "truncated.png": ("PNG cut at 60%", "refused", r"corrupt or truncated", lambda: _PNG()[: len(_PNG()) * 6 // 10]),
    "corrupt_data.png": ("PNG with scrambled compressed data", "refused", r"corrupt or truncated", lambda: _scrambled(_PNG(), b"IDAT", 20, 40)),
    "corrupt_header.jpg": ("JPEG whose frame header says 0x0 pixels", "refused", r"a damaged JPEG \(its header cannot be parsed\)", lambda: _zeroed(_JPEG(), b"\xff\xc0", 5, 4)),
    "corrupt_tables.jpg": ("JPEG with scrambled Huffman tables", "refused", r"corrupt or truncated", lambda: _scrambled(_JPEG(), b"\xff\xc4", 4, 26)),
    "corrupt_scan.jpg": (
        "JPEG with scrambled scan data (JPEG has no checksum)", "accepted",
        "decodes with artefacts: undetectable without a checksum, so it is a photo the user can see is wrong",
        lambda: _scrambled(_JPEG(), b"\xff\xda", 40, 120),
    ),
    "text.jpg": ("a text file named .jpg", "refused", r"not a JPEG, PNG or WebP image", lambda: b"this is not an image\n" * 20),
    "pickle.png": ("a pickle named .png", "refused", r"is a pickle file", lambda: pickle.dumps({"a": 1})),
    "zero_bytes.png": ("an empty file", "refused", r"is empty \(0 bytes\)", lambda: b""),
    "one_pixel.png": ("a 1x1 PNG", "refused", r"1x1 is too small", lambda: _encoded(_noise((1, 1)), "PNG")),
    "bomb.png": ("PNG claiming 20000x20000 (decompression bomb)", "refused", r"refused as a decompression bomb \(Image size \(400000000 pixels\)", lambda: png_claiming(20000, 20000)),
    "big.png": ("PNG claiming 9000x9000 (under PIL's bomb limit, over ours)", "refused", r"9000x9000 is 81000000 pixels, over the 64000000-pixel limit", lambda: png_claiming(9000, 9000)),
    "animated.gif": ("2-frame animated GIF", "refused", r"is a GIF file", lambda: _animated("GIF")),
    "animated.png": ("2-frame animated PNG (APNG)", "refused", r"is animated \(2 frames\)", lambda: _animated("PNG")),
    "animated.webp": ("2-frame animated WebP", "refused", r"is animated \(2 frames\)", lambda: _animated("WEBP")),
    "heic_photo.jpg": ("an iPhone HEIC named .jpg", "refused", r"is a HEIC/AVIF file", lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)),
    "cmyk.jpg": ("CMYK JPEG", "accepted", "8-bit RGB", _cmyk),
    "sixteen_bit.png": ("16-bit grayscale PNG", "accepted", "8-bit RGB, values scaled down", _sixteen_bit),
    "exif_rotated.jpg": ("JPEG stored sideways with EXIF orientation 6", "accepted", "upright: 30x60, red edge on top", _exif_rotated),
    "camera_mpo.jpg": ("multi-picture JPEG (MPO) from a camera", "accepted", "first picture, 8-bit RGB", _mpo),
    "фото-שלום.png": ("Unicode and right-to-left file name", "accepted", "loaded; reported under its own name", lambda: _encoded(_noise(seed=1), "PNG")),
    "photo\u202egnp.exe.png": (
        "right-to-left override in a (broken) file's name", "refused", r"not a JPEG, PNG or WebP image",
        lambda: b"MZ\x90\x00 not really a png",
    ),
}
# Sources that are not files in the corpus folder but paths a caller may pass.
PATHS: dict[str, tuple[str, str]] = {
    "nul\x00byte.png": ("a path with a NUL byte", r"is not a valid file name"),
    "../../../../nonexistent/x.png": ("a path climbing out of the folder to nothing", r"no such file"),
    "/nonexistent/abs/path.png": ("an absolute path to nothing", r"no such file"),
}

# Captions (text, not files): (what, expect, match).
CAPTIONS: dict[str, tuple[str, str, str]] = {
    "a {trigger} " + "very " * 2000 + "long caption": ("10 kB caption", "refused", r"captions are limited to 2000 characters"),
    "a {trigger} {class_word:>999999999}": ("caption with a format spec (would allocate 1 GB)", "refused", r"may only use the placeholders .*not '\{class_word:>999999999\}'"),
    "a {trigger} {class_word.__class__}": ("caption reaching for attributes", "refused", r"not '\{class_word.__class__\}'"),
    "a {0} dog {trigger}": ("caption with a positional field", "refused", r"not '\{0\}'"),
    "a {trigger} dog with {{braces}}": ("caption with escaped braces", "accepted", "braces kept literally"),
    "a {trigger} dog \u202eevil": ("caption with a bidi override", "accepted", "text kept as given; the tokenizer reads it as any other character"),
}

# Names users choose (user, concept): (what, expect).
NAMES: dict[str, tuple[str, str]] = {
    "../x": ("parent-directory path", "refused"),
    "/etc/passwd": ("absolute path", "refused"),
    "a/b": ("path separator", "refused"),
    "a\x00b": ("NUL byte", "refused"),
    "": ("empty", "refused"),
    "x" * 65: ("65 characters", "refused"),
    "\u202eevil": ("right-to-left override", "refused"),
    "rex'; DROP TABLE versions; --": ("SQL injection attempt", "refused"),
    "%": ("SQL LIKE wildcard", "refused"),
    "שלום": ("Hebrew (right-to-left script)", "accepted"),
    "東京": ("CJK", "accepted"),
    "zoë": ("accented (NFC)", "accepted"),
}


# --- adapter files ----------------------------------------------------------------------------

class _Exploit:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that something unpickled a user file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"unet.x.lora_A.weight": _Exploit(marker)})


def _torch_zip(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state": _Exploit(marker)}, buf)
    return buf.getvalue()


def _header_file(header: dict, data: bytes = b"", claimed_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + data


def _lora_file(spec, mutate: Callable[[dict], None] | None = None, dtype=None, metadata: dict | None = None) -> bytes:
    """A real diffusers-layout LoRA for ``spec``'s base (rank 4 on the first attention modules), then mutated."""
    import torch

    from adapters.formats import _safetensors_bytes, bespoke_metadata
    from adapters.registry.synthetic import random_adapter

    adapter = random_adapter(spec, rank=4, alpha=4.0, max_modules=2, seed=0)
    tensors = dict(adapter.tensors)
    if mutate is not None:
        mutate(tensors)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    meta = {**bespoke_metadata(adapter), **(metadata or {})}
    if dtype in (torch.float64, torch.int8):  # our writer only writes LoRA dtypes: write this one by hand
        return _raw_safetensors(tensors, meta)
    return _safetensors_bytes(tensors, meta)


def _raw_safetensors(tensors: dict, metadata: dict) -> bytes:
    codes = {"torch.float64": "F64", "torch.int8": "I8", "torch.float32": "F32"}
    header, chunks, offset = {"__metadata__": metadata}, [], 0
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        data = t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
        header[key] = {"dtype": codes[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return _header_file(header, b"".join(chunks))


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _set_nan(tensors: dict) -> None:
    tensors[_first(tensors, "lora_A.weight")] = tensors[_first(tensors, "lora_A.weight")].clone().index_fill_(1, __import__("torch").tensor([0]), float("nan"))


def _set_inf(tensors: dict) -> None:
    key = _first(tensors, "lora_B.weight")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("inf")


def _wrong_shape(tensors: dict) -> None:
    key = _first(tensors, "lora_A.weight")
    tensors[key] = tensors[key][:, :-1].contiguous()


def _unknown_module(tensors: dict) -> None:
    module = _first(tensors, "lora_A.weight").removesuffix(".lora_A.weight")
    for part in ("lora_A", "lora_B"):
        tensors[f"{module}_zz.{part}.weight"] = tensors.pop(f"{module}.{part}.weight")


def _lone_a(tensors: dict) -> None:
    del tensors[_first(tensors, "lora_B.weight")]


def _overlapping(spec) -> bytes:
    """Two tensors pointing at the same bytes: each entry looks right, the file as a whole does not."""
    header = {
        "unet.x.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "unet.y.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    return _header_file(header, bytes(8))


def _scalar_a(tensors: dict) -> None:
    tensors[_first(tensors, "lora_A.weight")] = __import__("torch").tensor(1.0)


def _deep_json(depth: int = 100_000) -> bytes:
    """A header nested deeper than Python's JSON parser recurses."""
    raw = b"[" * depth + b"]" * depth
    return struct.pack("<Q", len(raw)) + raw


def _truncated(spec) -> bytes:
    data = _lora_file(spec)
    return data[: len(data) - 100]


def _adapter_cases(marker: Path) -> dict[str, tuple[str, str, str, Callable[[object], bytes | dict[str, bytes]]]]:
    """name -> (what, expect, match, builder(spec) -> file bytes, or {relative path: bytes} for a folder)."""
    import torch

    return {
        "pickled.bin": ("pickled state dict (.bin) whose __reduce__ runs os.mkdir", "refused", r"\.bin files are pickles", lambda s: _pickle_bytes(marker)),
        "pickled.ckpt": ("pickled checkpoint (.ckpt)", "refused", r"\.ckpt files are pickles", lambda s: _pickle_bytes(marker)),
        "pickle_in_disguise.safetensors": ("a pickle named .safetensors", "refused", r"is a pickle, not safetensors", lambda s: _pickle_bytes(marker)),
        "torch_zip.safetensors": ("torch.save zip checkpoint named .safetensors", "refused", r"is a zip \(PyTorch checkpoint\)", lambda s: _torch_zip(marker)),
        "pickle_folder": ("diffusers folder holding only pytorch_lora_weights.bin", "refused", r"holds only pickled weights", lambda s: {"pytorch_lora_weights.bin": _pickle_bytes(marker)}),
        "peft_pickle_folder": (
            "peft folder with adapter_config.json and a pickled adapter_model.bin", "refused", r"adapter_model\.bin: \.bin files are pickles",
            lambda s: {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}).encode(), "adapter_model.bin": _pickle_bytes(marker)},
        ),
        "zero_bytes.safetensors": ("an empty file", "refused", r"too short to be a safetensors file", lambda s: b""),
        "not_json_header.safetensors": ("header bytes that are not JSON", "refused", r"header is not valid JSON", lambda s: struct.pack("<Q", 16) + b"\xff" * 16),
        "header_overclaims_length.safetensors": (
            "header length field larger than the file", "refused", r"header claims 4096 bytes but the file holds",
            lambda s: _header_file({}, b"", claimed_len=4096),
        ),
        "oversized_header.safetensors": ("header length field of 1 TB", "refused", r"over the \d+-byte limit", lambda s: struct.pack("<Q", 1 << 40) + b"{}      "),
        "data_overclaims.safetensors": (
            "tensor offsets past the end of the data", "refused", r"header declares 64 bytes of tensor data but the file holds 8",
            lambda s: _header_file({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, bytes(8)),
        ),
        "truncated.safetensors": ("a valid adapter with its last 100 bytes cut", "refused", r"tensor data but the file holds", _truncated),
        "overlapping_offsets.safetensors": ("two tensors sharing the same bytes", "refused", r"not a valid safetensors file|overlap|offset", _overlapping),
        "wrong_keys.safetensors": (
            "full-model weights, not a LoRA", "refused", r"is not a LoRA in diffusers, peft or kohya layout",
            lambda s: _raw_safetensors({"model.diffusion_model.input_blocks.0.weight": torch.zeros(4, 4)}, {}),
        ),
        "unknown_module.safetensors": ("LoRA on a module the base does not have", "refused", r"names no LoRA-targetable module", lambda s: _lora_file(s, _unknown_module)),
        "wrong_shape.safetensors": ("LoRA whose lora_A has the wrong width", "refused", r"has shape .* need", lambda s: _lora_file(s, _wrong_shape)),
        "lone_lora_a.safetensors": ("lora_A without its lora_B", "refused", r"has lora_A without lora_B", lambda s: _lora_file(s, _lone_a)),
        "float64.safetensors": ("float64 tensors", "refused", r"dtype F64; only float16, bfloat16 and float32", lambda s: _lora_file(s, dtype=torch.float64)),
        "int8.safetensors": ("int8 tensors", "refused", r"dtype I8; only float16, bfloat16 and float32", lambda s: _lora_file(s, dtype=torch.int8)),
        "nan.safetensors": ("a NaN in lora_A", "refused", r"contains NaN or infinite values", lambda s: _lora_file(s, _set_nan)),
        "inf.safetensors": ("an infinity in lora_B", "refused", r"contains NaN or infinite values", lambda s: _lora_file(s, _set_inf)),
        "other_base.safetensors": (
            "an adapter made for another base", "refused", r"made for base '0{16}'",
            lambda s: _lora_file(s, metadata={"bespoke.base_fingerprint": json.dumps("0" * 16)}),
        ),
        "huge_trigger.safetensors": (
            "a 10 kB trigger phrase in the header", "refused", r"trigger must be non-empty text of at most 200",
            lambda s: _lora_file(s, metadata={"bespoke.trigger": json.dumps("sks " * 2500)}),
        ),
        "regex_alpha_pattern.safetensors": (
            "an alpha_pattern key that is a backtracking regex, (.*.*.*.*.*.*.*.*.*.*)*zzz (peft would match it for minutes)", "refused",
            r"is not a module name; regular expressions are not accepted from files",
            lambda s: _lora_file(s, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"(.*.*.*.*.*.*.*.*.*.*)*zzz": 2}})}),
        ),
        "deep_json_header.safetensors": ("a header of 100,000 nested JSON lists (deeper than Python recurses)", "refused", r"header is not valid JSON", lambda s: _deep_json()),
        "dtype_list.safetensors": (
            "a tensor whose dtype is a JSON list", "refused", r"has dtype \['F32'\]",
            lambda s: _header_file({"unet.x.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        ),
        "scalar_lora.safetensors": ("a 0-dimensional lora_A", "refused", r"a LoRA weight has at least 2 dimensions", lambda s: _lora_file(s, _scalar_a)),
        "metadata_list.safetensors": (
            "lora_adapter_metadata that is a JSON list, not an object", "refused", r"'lora_adapter_metadata' must be a JSON object",
            lambda s: _lora_file(s, metadata={"lora_adapter_metadata": "[1, 2]"}),
        ),
        "targets_not_text.safetensors": (
            "bespoke.target_modules holding an object and a number", "refused", r"'bespoke.target_modules' must be a list of module names",
            lambda s: _lora_file(s, metadata={"bespoke.target_modules": json.dumps([{"a": 1}, 3])}),
        ),
        "bidi_trigger.safetensors": (
            "a trigger with a right-to-left override (U+202E)", "refused", r"trigger .* contains control characters",
            lambda s: _lora_file(s, metadata={"bespoke.trigger": json.dumps("\u202eskc")}),
        ),
        "good.safetensors": ("a valid diffusers-layout adapter (control)", "accepted", "imported as a new version", lambda s: _lora_file(s)),
    }


ADAPTER_NAMES = tuple(_adapter_cases(Path(MARKER)))


def adapter_cases(out: str | os.PathLike) -> dict[str, Case]:
    return {name: Case(name, what, expect, match) for name, (what, expect, match, _) in _adapter_cases(Path(out) / MARKER).items()}


def image_cases() -> dict[str, Case]:
    return {name: Case(name, what, expect, match) for name, (what, expect, match, _) in IMAGES.items()}


def make_corpus(out: str | os.PathLike, spec=None) -> Path:
    """Write the corpus into ``out`` (made if needed); ``spec`` (a ``BaseSpec``) shapes the adapter files.

    Without ``spec`` the tiny SD pipeline's spec is used, as the tests do.
    """
    out = Path(out)
    if spec is None:
        from adapters.validate import BaseSpec
        from gen.base import Base
        from gen.tiny import build_tiny_pipeline

        spec = BaseSpec.from_base(Base.from_pipeline(build_tiny_pipeline("sd")))
    images, adapters = out / "images", out / "adapters"
    for folder in (images, adapters):
        folder.mkdir(parents=True, exist_ok=True)
    for name, (_, _, _, build) in IMAGES.items():
        (images / name).write_bytes(build())
    with open(images / "sparse_60mb.png", "wb") as f:  # over the 50 MB limit, without writing 60 MB
        f.write(png_claiming(64, 64))
        f.truncate(60 << 20)
    (images / "folder.png").mkdir(exist_ok=True)
    for name, (_, _, _, build) in _adapter_cases(out / MARKER).items():
        made = build(spec)
        if isinstance(made, dict):
            (adapters / name).mkdir(exist_ok=True)
            for rel, data in made.items():
                (adapters / name / rel).write_bytes(data)
        else:
            (adapters / name).write_bytes(made)
    manifest = {
        "images": {n: asdict(c) for n, c in image_cases().items()},
        "adapters": {n: asdict(c) for n, c in adapter_cases(out).items()},
        "captions": {t[:60]: {"what": w, "expect": e, "match": m} for t, (w, e, m) in CAPTIONS.items()},
        "names": {repr(n): {"what": w, "expect": e} for n, (w, e) in NAMES.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the corpus into")
    parser.add_argument("--base", default=None, help="shape adapter files for this base ('builtin' or a diffusers folder; default: the tiny SD test pipeline)")
    args = parser.parse_args(argv)
    spec = None
    if args.base:
        from adapters.validate import BaseSpec
        from gen.base import load_base

        spec = BaseSpec.from_base(load_base(args.base, device="cpu", dtype="float32"))
    out = make_corpus(args.out, spec)
    files = [p for p in out.rglob("*") if p.is_file()]
    print(f"wrote {len(files)} files to {out} ({sum(p.stat().st_blocks * 512 for p in files) / 1e3:.0f} kB on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

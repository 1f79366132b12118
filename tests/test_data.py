"""User photo preparation: formats, orientation, modes, bad files, bombs, bounds, crops, captions; sample subjects."""

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from adapters.data import ImageLimits, InvalidImages, center_crop_resize, load_images, make_examples
from adapters.samples import SAMPLE_SUBJECTS, sample_subject_images, save_sample_subject, subject_instance
from gen import world


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def _rgb(path) -> tuple:
    return tuple(int(v) for v in np.asarray(load_images([path])[0].image)[0, 0])


def test_jpeg_png_webp_load_as_rgb_with_file_hash_fingerprints(tmp_path):
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    paths = [_save(red, tmp_path / "a.jpg"), _save(red, tmp_path / "b.png"), _save(red, tmp_path / "c.webp", lossless=True)]
    (tmp_path / "notes.txt").write_text("not an image, not picked from a folder")
    images = load_images(tmp_path)
    assert [im.name for im in images] == ["a.jpg", "b.png", "c.webp"]
    assert all(im.image.mode == "RGB" and im.image.size == (40, 30) for im in images)
    assert [im.sha256 for im in images] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(im, tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_images([path])[0].image)
    assert upright.shape[:2] == (40, 20)  # portrait now
    assert upright[2, 10, 0] > 200 and upright[-3, 10, 2] > 200  # the red edge is on top


def test_every_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red -> white
    assert _rgb(_save(rgba, tmp_path / "rgba.png")) == (255, 255, 255)
    assert _rgb(_save(Image.new("LA", (16, 16), (0, 255)), tmp_path / "la.png")) == (0, 0, 0)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    assert _rgb(_save(palette, tmp_path / "p.png", transparency=0)) == (255, 255, 255)
    assert _rgb(_save(Image.new("L", (16, 16), 128), tmp_path / "gray.png")) == (128, 128, 128)
    cmyk = _rgb(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100))
    assert cmyk[0] > 230 and cmyk[1] < 30 and cmyk[2] < 30
    sixteen = Image.fromarray(np.full((16, 16), 65535, np.uint16))
    assert _rgb(_save(sixteen, tmp_path / "deep.png")) == (255, 255, 255)


def test_bad_files_are_all_listed_by_name(tmp_path):
    good = Image.new("RGB", (16, 16), (1, 2, 3))
    _save(good, tmp_path / "good.png")
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, format="PNG")
    (tmp_path / "truncated.png").write_bytes(full.getvalue()[:200])
    (tmp_path / "random.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (tmp_path / "text.png").write_text("hello")
    _save(good, tmp_path / "anim.gif")
    sources = [tmp_path / n for n in ("good.png", "truncated.png", "random.jpg", "text.png", "anim.gif", "missing.webp")]
    with pytest.raises(InvalidImages) as info:
        load_images(sources)
    message = str(info.value)
    assert "5 of 6 images cannot be used" in message and "\n" not in message
    for name in ("truncated.png", "random.jpg", "text.png", "anim.gif", "missing.webp"):
        assert name in message
    assert "good.png" not in message


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(_png_claiming(9_000, 9_000))
    with pytest.raises(InvalidImages) as info:
        load_images([tmp_path / "bomb.png", tmp_path / "big.png"])
    assert "bomb.png" in str(info.value) and "big.png: 9000x9000" in str(info.value)
    small = _save(Image.new("RGB", (64, 64)), tmp_path / "small.png")
    with pytest.raises(InvalidImages, match="small.png: 64x64 is 4096 pixels, over the 1000-pixel limit"):
        load_images([small], ImageLimits(max_pixels=1000))


def test_image_count_is_bounded(tmp_path):
    with pytest.raises(InvalidImages, match="found 0 images"):
        load_images(tmp_path)
    images = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(4)]
    with pytest.raises(InvalidImages, match="found 4 images; give between 1 and 3"):
        load_images(images, ImageLimits(max_images=3))
    assert [im.name for im in load_images(images[:2])] == ["image 1", "image 2"]


def test_center_crop_resize_records_the_crop():
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (100, 0, 200, 100))  # the white centre square survives the crop
    out, (top, left) = center_crop_resize(wide, 64)
    assert out.size == (64, 64) and np.asarray(out).min() > 240
    assert (top, left) == (0, 64)  # 100 px in the original, 64 px at the resized scale


def test_captions_default_and_per_image():
    images = load_images([Image.new("RGB", (80, 60)), Image.new("RGB", (60, 80))])
    examples = make_examples(images, 64, "sks", "dog")
    assert [e.caption for e in examples] == ["a sks dog", "a sks dog"]
    assert examples[0].original_size == (60, 80) and examples[0].image.size == (64, 64)
    custom = make_examples(images, 64, "<rex>", "dog", {"image 2": "a {trigger} {class_word} on a beach"})
    assert [e.caption for e in custom] == ["a <rex> dog", "a <rex> dog on a beach"]
    with pytest.raises(InvalidImages, match="missing in: image 1"):
        make_examples(images, 64, "sks", "dog", ["a dog", "a {trigger} dog"])
    with pytest.raises(InvalidImages, match="missing in: image 2"):  # "{{trigger}}" is the literal text "{trigger}"
        make_examples(images, 64, "sks", "dog", ["a {trigger} dog", "a {{trigger}} dog"])
    with pytest.raises(InvalidImages, match="not in the set: other.png"):
        make_examples(images, 64, "sks", "dog", {"other.png": "a {trigger}"})
    with pytest.raises(InvalidImages, match="got 1 captions for 2 images"):
        make_examples(images, 64, "sks", "dog", ["a {trigger}"])


def test_sample_subjects_are_held_out_and_deterministic(tmp_path):
    assert len(SAMPLE_SUBJECTS) == len(world.HELD_OUT_INSTANCES) and "robot-3" in SAMPLE_SUBJECTS
    a, b = sample_subject_images("robot-3", 4), sample_subject_images("robot-3", 4)
    assert len(a) == 4 and all(im.size == (64, 64) for im in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    paths = save_sample_subject("mug-0", tmp_path, n=2)
    assert [p.name for p in paths] == ["mug-0-0.png", "mug-0-1.png"] and len(load_images(tmp_path)) == 2
    with pytest.raises(ValueError, match="robot-42 is not a held-out subject"):
        subject_instance("robot-42")
    for name in ("unicorn-1", "robot-\u00b2"):  # a superscript two passes str.isdigit, not int()
        with pytest.raises(ValueError, match="unknown sample subject"):
            subject_instance(name)


def test_orientation_is_applied_when_pil_cannot_rewrite_the_exif(tmp_path):
    """A tag of a type PIL cannot re-encode (CellWidth holding ASCII) made ``exif_transpose`` raise struct.error."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG", exif=exif)
    path = tmp_path / "odd_exif.jpg"
    path.write_bytes(buffer.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x08\x00\x02", 1))  # Make (0x010f) -> CellWidth (0x0108)
    (image,) = load_images([path])
    assert image.image.size == (48, 64)  # rotated upright


def test_colour_key_transparency_is_composited_on_white(tmp_path):
    rgb = Image.new("RGB", (16, 16), (0, 0, 0))
    assert _rgb(_save(rgb, tmp_path / "rgb_trns.png", transparency=(0, 0, 0))) == (255, 255, 255)
    assert _rgb(_save(Image.new("L", (16, 16), 0), tmp_path / "l_trns.png", transparency=0)) == (255, 255, 255)
    assert _rgb(_save(Image.new("RGB", (16, 16), (9, 9, 9)), tmp_path / "rgb_other_key.png", transparency=(0, 0, 0))) == (9, 9, 9)


def test_non_regular_files_are_refused_without_reading(tmp_path):
    """A FIFO (or /dev/zero) reports 0 bytes, so the size check alone let an endless read through."""
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal([fifo])), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked opening the FIFO: give it a writer that closes at once, so it ends
        open(fifo, "wb").close()
        worker.join(10)
    assert outcome and "pipe.png: is not a regular file" in outcome[0], outcome
    assert "zero: is not a regular file" in _refusal(["/dev/zero"])


def test_the_byte_limit_holds_when_the_size_on_disk_lies(tmp_path, monkeypatch):
    """A file still growing (or a filesystem that reports 0) is read only to the limit and refused."""
    import os

    path = _save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "grows.png")
    assert path.stat().st_size > 1000
    real_stat, real_fstat = os.stat, os.fstat

    def zero_size(result: os.stat_result) -> os.stat_result:
        fields = list(result)
        fields[6] = 0  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: zero_size(real_stat(p, *a, **k)) if str(p) == str(path) else real_stat(p, *a, **k))
    monkeypatch.setattr(os, "fstat", lambda fd: zero_size(real_fstat(fd)))
    assert "grows.png: is over the 1000-byte limit" in _refusal([path], ImageLimits(max_file_bytes=1000))


def _refusal(sources, limits: ImageLimits = ImageLimits()) -> str:
    with pytest.raises(InvalidImages) as info:
        load_images(sources, limits)
    return str(info.value)

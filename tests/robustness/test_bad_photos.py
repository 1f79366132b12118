"""Bad photos, paths and captions through every entry point that takes them: photo loading and training.

Training is the only consumer of user photos (``personalize`` -> ``prepare_jobs`` -> ``load_images``),
and it checks every photo and caption before any model work: a refused input costs nothing, leaves
no class images, checkpoints or registry records behind, and never touches other users.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from robustness_helpers import bad_inputs, refused, registry_state, short

from adapters.data import IMAGE_SUFFIXES, InvalidImages, load_images, make_examples, shown_name
from adapters.train import personalize
from gen.errors import InvalidRequest
from gen.paths import cache_dir

IMAGES = bad_inputs.image_cases()
REFUSED = [n for n, c in IMAGES.items() if c.expect == "refused"]
ACCEPTED = [n for n, c in IMAGES.items() if c.expect == "accepted"]
FAST = dict(preset="quick", steps=1, num_class_images=1, class_image_steps=1)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_photo_names_the_file_and_the_problem(corpus, name, observe):
    case = IMAGES[name]
    observed = refused(lambda: load_images([corpus / "images" / name]), InvalidImages, re.escape(shown_name(name)) + ": " + case.match)
    assert "\u202e" not in observed  # a bidi override is shown escaped, never applied
    observe("photos", f"`{shown_name(name)}`: {case.what}", "adapters.data.load_images", f"refused: /{case.match}/", short(observed))


def _accepted_checks(name: str, image) -> str:
    """What acceptance means for each accepted case; returns a description of what was seen."""
    pixels = np.asarray(image.image)
    assert image.image.mode == "RGB" and pixels.dtype == np.uint8
    if name == "exif_rotated.jpg":
        assert image.image.size == (30, 60) and pixels[2, 15, 0] > 200 and pixels[-3, 15, 2] > 200
    if name == "cmyk.jpg":
        assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 60
    if name == "sixteen_bit.png":
        assert pixels.min() < 10 and pixels.max() > 245
    if name == "camera_mpo.jpg":
        assert image.image.size == (48, 48)
    assert image.name == name
    return f"accepted: {image.image.mode} {image.image.size[0]}x{image.image.size[1]} uint8, named {shown_name(image.name)!r}"


@pytest.mark.parametrize("name", ACCEPTED)
def test_awkward_but_valid_photo_is_normalized(corpus, name, observe):
    (image,) = load_images([corpus / "images" / name])
    observe("photos", f"`{shown_name(name)}`: {IMAGES[name].what}", "adapters.data.load_images", f"accepted: {IMAGES[name].match}", _accepted_checks(name, image))


@pytest.mark.parametrize("name", ["sparse_60mb.png", "folder.png"])
def test_oversized_file_and_folder_named_like_a_photo(corpus, name, observe):
    match = {"sparse_60mb.png": r"62914560 bytes is over the 52428800-byte limit", "folder.png": r"found 0 images"}[name]
    observed = refused(lambda: load_images([corpus / "images" / name]), InvalidImages, match)
    what = {"sparse_60mb.png": "60 MB file (sparse: never read)", "folder.png": "an empty folder named like a photo (read as a folder)"}[name]
    observe("photos", f"`{name}`: {what}", "adapters.data.load_images", f"refused: /{match}/", short(observed))


@pytest.mark.parametrize("path", list(bad_inputs.PATHS))
def test_path_like_sources(path, observe):
    what, match = bad_inputs.PATHS[path]
    observed = refused(lambda: load_images([path]), InvalidImages, match)
    observe("photos", f"`{shown_name(path)}`: {what}", "adapters.data.load_images", f"refused: /{match}/", short(observed))


def test_training_checks_every_photo_first_and_leaves_nothing_behind(corpus, populated, sd, tmp_path, observe):
    """One folder holding every bad photo: one error listing each, before any model work, with no trace."""
    base, _ = sd
    before = registry_state(populated.root)
    run_dir = tmp_path / "run"
    with pytest.raises(InvalidImages) as info:
        personalize(base, "carol", "rex", [corpus / "images", "nul\x00byte.png"], "dog", registry=populated, output_dir=str(run_dir), **FAST)
    message = str(info.value)
    assert "\n" not in message
    in_folder = [n for n in [*REFUSED, *ACCEPTED] if Path(n).suffix in IMAGE_SUFFIXES]  # a folder gives its photos by suffix
    bad = [n for n in REFUSED if n in in_folder] + ["sparse_60mb.png", "nul\x00byte.png"]
    for name in bad:
        assert f"{shown_name(name)}: " in message, name
    for name in ACCEPTED:
        assert f"{shown_name(name)}: " not in message, name
    assert "animated.gif" not in message  # not a photo suffix: a folder does not offer it
    assert registry_state(populated.root) == before  # nothing registered, alice's and bob's records and blobs untouched
    assert not run_dir.exists() and not (cache_dir() / "class_images").exists() and not (cache_dir() / "train").exists()
    count = f"{len(bad)} of {len(in_folder) + 2} images cannot be used"
    assert message.startswith(count)
    observe(
        "photos", "a folder of every case above, plus a NUL-byte path", "adapters.train.personalize",
        "one error listing every refused file by name; nothing registered; no class images, checkpoints or records; other users untouched",
        f"InvalidImages: {count}: ... (each named); registry unchanged; no files written",
    )


@pytest.mark.parametrize("caption", list(bad_inputs.CAPTIONS))
def test_captions(corpus, caption, observe):
    what, expect, match = bad_inputs.CAPTIONS[caption]
    images = load_images([corpus / "images" / "cmyk.jpg"])
    if expect == "refused":
        observed = refused(lambda: make_examples(images, 64, "sks", "dog", [caption]), (InvalidImages, InvalidRequest), match)
        observe("captions", what, "adapters.data.make_examples", f"refused: /{short(match, 60)}/", short(observed))
    else:
        (example,) = make_examples(images, 64, "sks", "dog", [caption])
        assert example.caption == caption.replace("{trigger}", "sks").replace("{{", "{").replace("}}", "}")
        observe("captions", what, "adapters.data.make_examples", f"accepted: {match}", f"accepted: caption {short(example.caption, 50)!r}")


def test_a_bad_caption_stops_training_before_any_model_work(corpus, populated, sd, tmp_path, observe):
    base, _ = sd
    before = registry_state(populated.root)
    bomb = "a {trigger} {class_word:>999999999}"
    observed = refused(
        lambda: personalize(base, "carol", "rex", [corpus / "images" / "cmyk.jpg"], "dog", captions=[bomb], registry=populated, output_dir=str(tmp_path / "run"), **FAST),
        InvalidRequest, r"not '\{class_word:>999999999\}'",
    )
    assert registry_state(populated.root) == before and not (tmp_path / "run").exists()
    observe("captions", "format-spec caption given to training", "adapters.train.personalize", "refused before any model work; nothing registered", short(observed))

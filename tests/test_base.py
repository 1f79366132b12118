import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gen import world
from gen.base import Base, fingerprint_folder, load_base, resolve_device_dtype
from gen.errors import BaseLoadError, InvalidRequest
from gen.evaluator import load_evaluator, read_attributes
from gen.sampler import Request, Sampler
from gen.tiny import build_tiny_pipeline


@pytest.mark.parametrize("family, cls", [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_loads_each_family_from_a_folder(family, cls, request):
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    base = load_base(folder)
    assert base.family == family
    assert type(base.pipe).__name__ == cls
    assert base.device.type == "cpu" and base.dtype == torch.float32
    assert base.default_size == 64


def test_fingerprint_is_stable_and_independent_of_dtype_and_route(tiny_sd_dir):
    fp = load_base(tiny_sd_dir).fingerprint
    assert len(fp) == 16
    assert load_base(tiny_sd_dir, dtype="bfloat16").fingerprint == fp
    assert Base.from_pipeline(build_tiny_pipeline("sd")).fingerprint == fp  # same seed, built in memory
    assert fingerprint_folder(tiny_sd_dir).adapted == fp  # cached path agrees


def test_fingerprint_changes_when_any_weight_changes(tiny_sd_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    weights = next((copy / "text_encoder").glob("*.safetensors"))
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, weights)
    changed, original = fingerprint_folder(copy), fingerprint_folder(tiny_sd_dir)
    assert changed.adapted != original.adapted and changed.weights != original.weights


def test_a_damaged_fingerprint_cache_is_recomputed_not_trusted(tiny_sd_dir):
    from gen.paths import cache_dir

    expected = fingerprint_folder(tiny_sd_dir)
    cache = cache_dir() / "fingerprints.json"
    for damaged in ('{"x": 1}', "[1, 2]", json.dumps({k: {"adapted": 1} for k in json.loads(cache.read_text())}), "not json"):
        cache.write_text(damaged)
        assert fingerprint_folder(tiny_sd_dir) == expected


def test_a_swapped_vae_keeps_the_adapters_fingerprint_and_changes_the_weights_one(tiny_sd_dir, tmp_path):
    """Adapters never touch the VAE, so a new decoder keeps them; images it decoded (class images) are not reused."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    weights = next((copy / "vae").glob("*.safetensors"))
    tensors = {k: v + 1e-3 for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    swapped, original = load_base(copy), load_base(tiny_sd_dir)
    assert swapped.fingerprint == original.fingerprint
    assert swapped.fingerprints.weights != original.fingerprints.weights
    assert original.fingerprints.weights in original.fingerprints  # what adapters recorded before the VAE was left out
    assert original.fingerprints.weights not in swapped.fingerprints


def test_dtype_override_is_applied(tiny_sd_dir):
    base = load_base(tiny_sd_dir, dtype="bf16")
    assert next(base.pipe.unet.parameters()).dtype == torch.bfloat16


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(BaseLoadError, match="no base at"):
        load_base(str(tmp_path / "nope" / "deeper"))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(BaseLoadError, match="not a diffusers pipeline folder"):
        load_base(tmp_path)


def test_a_file_is_not_a_base(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(BaseLoadError, match="is a file"):
        load_base(f)


def test_unsupported_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(BaseLoadError, match="FluxPipeline.*supported pipelines: StableDiffusionPipeline"):
        load_base(tmp_path)


def test_broken_component_is_reported_in_one_line(tiny_sd_dir, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, copy)
    next((copy / "unet").glob("*.safetensors")).write_bytes(b"not safetensors")
    with pytest.raises(BaseLoadError, match="cannot load the pipeline") as info:
        load_base(copy)
    assert "\n" not in str(info.value)


def test_hub_id_needs_explicit_network_opt_in(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BaseLoadError, match="allow_network=True"):
        load_base("some-org/some-model")


def test_builtin_loads_offline():
    base = load_base("builtin")
    assert base.source == "builtin" and base.family == "sd"


def test_the_shipped_base_draws_each_prompted_class():
    """The shipped weights are a model, not just loadable files: the evaluator reads back what was asked for.

    The prompts state a background, as every pretraining caption did (the model card names the limit
    of prompts that do not: "a photo of a car" draws mugs).
    """
    base, evaluator = load_base("builtin"), load_evaluator()
    prompts = [f"{world.class_prompt(cls)} on a blue background" for cls in world.CLASSES]
    generations = Sampler(base).generate_many([Request(p, num_images=2, seed=0, steps=10) for p in prompts])
    images = [im for g in generations for im in g.images]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    seen = read_attributes(evaluator, images)
    asked = [cls for cls in world.CLASSES for _ in range(2)]
    assert sum(s["class"] == a for s, a in zip(seen, asked)) >= 11, [(a, s["class"]) for s, a in zip(seen, asked)]  # reads 12 of 12
    assert sum(s["background"] == "blue" for s in seen) >= 11


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("cpu", "float16", "float16 cannot run on the cpu"),
        ("cpu", "int8", "unknown dtype"),
        ("cpu", torch.int64, "not supported"),
        ("tpu9", None, "unknown device"),
    ],
)
def test_device_and_dtype_errors(device, dtype, message):
    with pytest.raises(InvalidRequest, match=message):
        resolve_device_dtype(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(InvalidRequest, match="no CUDA GPU"):
        resolve_device_dtype("cuda")


def test_defaults_pick_cpu_float32_here():
    if not torch.cuda.is_available():
        assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)

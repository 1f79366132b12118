import json
import os
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


def test_weights_rewritten_to_the_same_size_and_mtime_are_hashed_again(tiny_sd_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    weights = next((copy / "unet").glob("*.safetensors"))
    before, stat = fingerprint_folder(copy), weights.stat()
    with open(weights, "r+b") as f:  # one byte of the last tensor's data, in place: the size stays
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync would leave it
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint_folder(copy).adapted != before.adapted


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


def _copy(tiny_sd_dir, tmp_path, name: str = "copy"):
    copy = tmp_path / name
    shutil.copytree(tiny_sd_dir, copy)
    return copy


def test_variant_files_beside_the_weights_do_not_change_the_fingerprint(tiny_sd_dir, tmp_path):
    """Hub repos ship fp16 and non-EMA variants the loader never reads; adapters must still fit the base."""
    copy = _copy(tiny_sd_dir, tmp_path)
    for component, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("vae", "diffusion_pytorch_model")]:
        tensors = load_file(copy / component / f"{name}.safetensors")
        save_file({k: v.half() for k, v in tensors.items()}, copy / component / f"{name}.fp16.safetensors")
        save_file({k: v + 1 for k, v in tensors.items()}, copy / component / f"{name}.non_ema.safetensors")
    save_file({"x": torch.zeros(2)}, copy / "v1-5-pruned.safetensors")
    base = load_base(copy)
    assert fingerprint_folder(copy) == fingerprint_folder(tiny_sd_dir)
    assert base.fingerprints == Base.from_pipeline(base.pipe).fingerprints  # what the loader read is what was hashed


def test_a_sharded_component_is_fingerprinted_through_its_index(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    copy = _copy(tiny_sd_dir, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(copy / "unet")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(copy / "unet", max_shard_size="100KB")
    assert len(list((copy / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    save_file({"conv_in.weight": torch.zeros(1)}, copy / "unet" / "diffusion_pytorch_model-00001-of-00002.fp16.safetensors")
    assert load_base(copy).fingerprints == fingerprint_folder(tiny_sd_dir) == fingerprint_folder(copy)


def test_hub_downloads_only_what_the_loader_reads(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from gen.base import _hub_snapshot

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns, **kw: asked.append(allow_patterns) or str(tmp_path))
    _hub_snapshot("org/model", allow_network=False)
    repo = [
        "model_index.json", "v1-5-pruned.safetensors", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json", "tokenizer/merges.txt", "tokenizer/vocab.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    fetched = set(filter_repo_objects(repo, allow_patterns=asked[0]))
    weights = {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors"}
    assert {f for f in fetched if f.endswith(".safetensors")} == weights
    assert {f for f in repo if not f.endswith(".safetensors")} <= fetched  # configs, tokenizer, index


def test_a_weight_missing_from_a_component_is_refused_by_name(tiny_sd_dir, tmp_path):
    copy = _copy(tiny_sd_dir, tmp_path)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_out.weight"]
    save_file(tensors, weights)
    with pytest.raises(BaseLoadError, match=r"unet weight conv_out\.weight is missing"):
        load_base(copy)


def test_an_inpainting_unet_is_refused_at_load(tmp_path):
    """Converted inpainting checkpoints often say StableDiffusionPipeline; their 9-channel UNet would fail at the first step."""
    from gen.tiny import TinyConfig, _unet

    pipe, cfg = build_tiny_pipeline("sd"), TinyConfig()
    pipe.unet = _unet(cfg, cross_attention_dim=cfg.cross_attention_dim, in_channels=9)
    pipe.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    with pytest.raises(BaseLoadError, match="9 input channels for 4-channel latents .*inpainting"):
        load_base(tmp_path / "inpaint")


@pytest.mark.parametrize("text, message", [("[1]", "must hold a JSON object, not list"), ("{oops", "is not valid JSON"),
                                           ('{"_class_name": ["x"]}', "_class_name must be a string")])
def test_a_malformed_model_index_is_a_load_error(tiny_sd_dir, tmp_path, text, message):
    copy = _copy(tiny_sd_dir, tmp_path)
    (copy / "model_index.json").write_text(text)
    with pytest.raises(BaseLoadError, match=message):
        load_base(copy)


@pytest.mark.parametrize("text, message", [
    ('{"sampling": {"steps": 4,}}', "bespoke.json is not valid JSON"),
    ('["x"]', "must hold a JSON object, not list"),
    ('{"sampling": ["steps"]}', "'sampling' must be an object, not list"),
    ('{"sampling": {"steps": "4"}}', "sampling.steps must be int, got str '4'"),
    ('{"sampling": {"steps": true}}', "sampling.steps must be int, got bool"),
    ('{"sampling": {"guidance_scale": "high"}}', "sampling.guidance_scale must be float"),
    ('{"sampling": {"scheduler": 1}}', "sampling.scheduler must be str"),
    ('{"sampling": {"stand_in": "yes"}}', "sampling.stand_in must be bool"),
])
def test_bad_sampling_defaults_are_blamed_on_the_base(tiny_sd_dir, tmp_path, text, message):
    copy = _copy(tiny_sd_dir, tmp_path)
    (copy / "bespoke.json").write_text(text)
    with pytest.raises(BaseLoadError, match=message):
        load_base(copy)


def test_sampling_defaults_are_read_from_bespoke_json(tiny_sd_dir, tmp_path):
    copy = _copy(tiny_sd_dir, tmp_path)
    (copy / "bespoke.json").write_text(json.dumps({"sampling": {"steps": 4, "guidance_scale": 3, "unknown": 1}}))
    defaults = load_base(copy).defaults
    assert defaults.steps == 4 and defaults.guidance_scale == 3.0 and isinstance(defaults.guidance_scale, float)


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

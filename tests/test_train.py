"""The LoRA trainer on tiny pipelines: adapters, registry records, an untouched base, SDXL, several users,
checkpoints and resume, divergence, options, ``accelerate launch`` with two processes, and the bench."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters.registry import Registry
from adapters.samples import save_sample_subject
from adapters.train import TrainingDiverged, TrainJob, personalize, personalize_many, resolve_config, train_adapters
from adapters.train.config import add_config_arguments, overrides_from_args, profile_of
from adapters.train.data import PromptEncoder, TrainingData, class_image_folder, class_images, prepare_jobs
from adapters.train.loop import _min_snr_weights
from adapters.train.lora import Attachment
from gen.base import Base, fingerprint_pipeline, load_base
from gen.errors import BespokeError, InvalidRequest
from gen.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
FAST = {"preset": "quick", "num_class_images": 2, "class_image_steps": 2}


@pytest.fixture
def photos(tmp_path) -> Path:
    save_sample_subject("mug-2", tmp_path / "photos", n=3)
    return tmp_path / "photos"


def snapshot(base: Base) -> dict:
    """Everything training could leave behind on a base."""
    pipe = base.pipe
    models = {n: getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    return {
        "fingerprint": fingerprint_pipeline(pipe, base.family),
        "modules": {n: [(k, type(m).__name__) for k, m in model.named_modules()] for n, model in models.items()},
        "attributes": {n: sorted(model.__dict__) for n, model in models.items()},
        "requires_grad": {n: [p.requires_grad for p in model.parameters()] for n, model in models.items()},
        "training": {n: [m.training for m in model.modules()] for n, model in models.items()},
        "checkpointing": {n: any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) for n, model in models.items()},
        "embeddings": {n: id(model.get_input_embeddings()) for n, model in models.items() if n != "unet"},
        "tokenizers": [len(pipe.tokenizer), len(getattr(pipe, "tokenizer_2", None) or pipe.tokenizer)],
    }


def test_personalize_registers_a_served_adapter_and_gives_the_base_back_unchanged(tiny_sd_dir, photos, tmp_path):
    base = load_base(tiny_sd_dir)
    before = snapshot(base)
    events, validations, live = [], [], {}

    def evaluate(sampler, adapter):
        live["image"] = sampler.generate(f"a {adapter.trigger} mug", seed=3, steps=3).images[0]
        return {"probe": 0.5, "not_a_number": float("nan")}

    with Registry(tmp_path / "reg") as registry, pytest.warns(UserWarning, match="not_a_number"):
        record = personalize(
            base, "alice", "robo", photos, "mug", registry=registry, evaluate=evaluate,
            progress=lambda step, total, info: events.append((info["phase"], step, total)), on_validation=validations.append,
            steps=4, lr=3e-2, token_lr=3e-2, rank=4, alpha=8, new_token=True, text_encoder_lora=True, min_snr_gamma=5.0,
            validation_every=2, num_validation_images=1, **FAST,
        )
        adapter = registry.get("alice", "robo")
    assert snapshot(base) == before

    assert (record.user, record.concept, record.version, record.rank, record.alpha) == ("alice", "robo", 1, 4, 8.0)
    assert (record.trigger, record.new_tokens, record.class_word) == ("<robo>", ("<robo>",), "mug")
    assert record.data_fingerprints == tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(photos.iterdir()))
    assert record.training_config["preset"] == "quick" and record.training_config["profile"] == "builtin"
    assert record.training_config["steps"] == 4 and record.training_config["text_encoder_lora"] is True
    assert record.metrics["probe"] == 0.5 and "not_a_number" not in record.metrics
    assert {"final_loss", "train_seconds", "loop_seconds", "loss/step_000004"} <= set(record.metrics)
    assert {k.split(".")[0] for k in adapter.tensors} == {"unet", "text_encoder"}
    assert adapter.token_embeddings["text_encoder"].shape == (1, 32)
    assert any(float(t.abs().max()) > 0 for k, t in adapter.tensors.items() if "lora_B" in k)

    assert [e for e in events if e[0] == "train"] == [("train", s, 4) for s in range(1, 5)]
    assert events[0][0] == "class images" and [e for e in events if e[0] == "evaluate"] == [("evaluate", 0, 1), ("evaluate", 1, 1)]
    assert [(v.step, v.user, v.concept, v.prompt, len(v.images)) for v in validations] == [(s, "alice", "robo", "a <robo> mug", 1) for s in (2, 4)]

    # Served through the registry (LoRA slots, token pool), the adapter draws what training saw live.
    with Registry(tmp_path / "reg") as registry:
        sampler = Sampler(base, adapters=registry)
        served = sampler.generate("a <robo>", user="alice", seed=3, steps=3).images[0]
        muted = sampler.generate("a <robo:0>", user="alice", seed=3, steps=3).images[0]
    pixels = lambda im: np.asarray(im).astype(np.int16)  # noqa: E731
    assert np.abs(pixels(served) - pixels(live["image"])).max() <= 2
    assert np.abs(pixels(served) - pixels(muted)).mean() > 1  # the LoRA itself matters, not only the token


def test_sdxl_trains_both_text_encoders_with_checkpointing_and_accumulation(tiny_sdxl_dir, photos):
    base = load_base(tiny_sdxl_dir)
    Sampler(base).generate("a mug", steps=1)  # a warm base: transformers installs its output hooks on first use
    before = snapshot(base)
    cfg = resolve_config(base, "quick", steps=2, grad_accum=2, new_token=True, text_encoder_lora=True, num_class_images=2, class_image_steps=2)
    assert profile_of(base) == "sdxl" and cfg.gradient_checkpointing
    (result,) = train_adapters(base, [TrainJob("bob", "toy", photos, "mug")], cfg)
    assert snapshot(base) == before
    adapter = result.adapter
    assert {k.split(".")[0] for k in adapter.tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert set(adapter.token_embeddings) == {"text_encoder", "text_encoder_2"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter.tensors)
    assert len(result.loss_curve) == 2 and all(np.isfinite(result.loss_curve))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_prompt_encoder_conditions_the_unet_as_the_pipeline_does(tiny_sd_dir, tiny_sdxl_dir, family):
    """Training on other conditioning than sampling gives would train a mismatch: SD takes the last hidden
    state, SDXL the penultimate of both encoders concatenated plus the second one's pooled projection."""
    base = load_base(tiny_sdxl_dir if family == "sdxl" else tiny_sd_dir)
    pipe = base.pipe
    tokenizers = {n: getattr(pipe, n) for n in ("tokenizer", "tokenizer_2") if getattr(pipe, n, None) is not None}
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    encode = PromptEncoder(tokenizers, encoders, base.family, base.device)
    with torch.no_grad():
        hidden, pooled = encode(["a red mug", "a cat on the left"])
        for i, prompt in enumerate(["a red mug", "a cat on the left"]):
            out = pipe.encode_prompt(prompt, device=base.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            torch.testing.assert_close(hidden[i:i + 1], out[0])
            if family == "sdxl":
                torch.testing.assert_close(pooled[i:i + 1], out[2])
    assert (pooled is None) == (family == "sd")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pivotal_tuning_encodes_the_class_captions_once_and_trains_as_if_it_encoded_them_every_step(tiny_sd_dir, tiny_sdxl_dir, photos, family, monkeypatch):
    """Only captions holding the new token change as it trains; the class rows' are encoded once at setup."""
    base = load_base(tiny_sdxl_dir if family == "sdxl" else tiny_sd_dir)
    job = [TrainJob("dora", "m", photos, "mug")]
    options = {**FAST, "steps": 3, "new_token": True, "token_lr": 0.1, "warmup_steps": 0, "gradient_checkpointing": False}
    encoded: list[str] = []
    original = PromptEncoder.__call__
    monkeypatch.setattr(PromptEncoder, "__call__", lambda self, captions: encoded.extend(captions) or original(self, captions))
    cfg = resolve_config(base, **options)
    class_caption = prepare_jobs(job, cfg)[0].class_prompt
    (cached,) = train_adapters(base, job, cfg)
    assert encoded.count(class_caption) == 1 and len(encoded) > 3  # once at setup; the instance rows every step

    encoded.clear()
    monkeypatch.setattr(Attachment, "training_changes", lambda self, caption: True)  # every caption, every step
    (live,) = train_adapters(base, job, cfg)
    assert encoded.count(class_caption) == (cfg.steps + 1) * cfg.batch_size  # a class row per instance row; +1: the check after the last step
    torch.testing.assert_close(cached.adapter.token_embeddings, live.adapter.token_embeddings, rtol=1e-4, atol=1e-6)
    for key, tensor in cached.adapter.tensors.items():  # float order (batched vs one-off encoding) moves near-zero
        # elements by ~1e-6 on some CPUs (an AVX-512 Xeon: 1.06e-6, one element in 256), which Adam's ~lr * sign(grad) keeps
        torch.testing.assert_close(tensor, live.adapter.tensors[key], rtol=1e-4, atol=1e-5)
    assert cached.loss_curve == pytest.approx(live.loss_curve, rel=1e-5)


def test_one_process_trains_jobs_of_different_precisions(tiny_sd_dir, photos):
    """accelerate's process-wide state would refuse the second job's precision; a library process trains many jobs."""
    base = load_base(tiny_sd_dir)
    for precision in ("bf16", "no"):
        cfg = resolve_config(base, steps=1, mixed_precision=precision, **FAST)
        (result,) = train_adapters(base, [TrainJob("bob", "toy", photos, "mug")], cfg)
        assert np.isfinite(result.loss_curve).all()


@pytest.mark.parametrize(
    ("prior_distill", "checkpointing"), [(False, False), (True, False), (True, True)],
    ids=["prior-images", "prior-distilled-with-context", "checkpointed"],  # checkpointing reruns the routed forward in backward
)
def test_users_trained_together_get_the_adapters_they_would_get_alone(tiny_sd_dir, tmp_path, prior_distill, checkpointing):
    base = load_base(tiny_sd_dir)
    for name in ("mug-1", "cat-2"):
        save_sample_subject(name, tmp_path / name, n=2)
    jobs = [TrainJob("u1", "a", tmp_path / "mug-1", "mug", seed=1), TrainJob("u2", "b", tmp_path / "cat-2", "cat", seed=2)]
    cfg = resolve_config(
        base, steps=3, lr=1e-2, warmup_steps=0, prior_distill=prior_distill, prior_context=prior_distill, gradient_checkpointing=checkpointing, **FAST
    )
    together = train_adapters(base, jobs, cfg)
    for job, joint in zip(jobs, together):
        (alone,) = train_adapters(base, [job], cfg)
        assert joint.adapter.tensors.keys() == alone.adapter.tensors.keys()
        for key, tensor in joint.adapter.tensors.items():  # Adam's first steps are ~lr * sign(grad): a near-zero
            # gradient element turns float-order noise into up to ~1e-4 of a 3e-2 trajectory (one element in 256 here)
            torch.testing.assert_close(tensor, alone.adapter.tensors[key], rtol=1e-3, atol=1e-4)
        assert joint.loss_curve == pytest.approx(alone.loss_curve, rel=1e-4)
    assert together[0].metrics["users_in_job"] == 2.0


def test_token_retraction_keeps_each_users_new_token_near_the_vocabulary_scale(tiny_sd_dir, tmp_path):
    base = load_base(tiny_sd_dir)
    vocabulary_std = float(base.pipe.text_encoder.get_input_embeddings().weight.std())
    for name in ("mug-1", "cat-2"):
        save_sample_subject(name, tmp_path / name, n=2)
    jobs = [TrainJob("u1", "a", tmp_path / "mug-1", "mug", seed=1), TrainJob("u2", "b", tmp_path / "cat-2", "cat", seed=2)]
    options = {"steps": 6, "new_token": True, "token_lr": 0.1, "warmup_steps": 0, **FAST}
    token = lambda result: result.adapter.token_embeddings["text_encoder"].float()  # noqa: E731
    free = token(train_adapters(base, jobs[:1], resolve_config(base, **options))[0])
    held = train_adapters(base, jobs, resolve_config(base, token_retract=0.5, **options))
    assert abs(float(token(held[0]).std()) - vocabulary_std) < 0.5 * abs(float(free.std()) - vocabulary_std)
    (alone,) = train_adapters(base, jobs[:1], resolve_config(base, token_retract=0.5, **options))
    torch.testing.assert_close(token(held[0]), token(alone), rtol=1e-3, atol=1e-4)  # another user's rows never move these


def test_loraplus_steps_the_b_matrices_ratio_times_as_far_and_leaves_a_as_plain_lora_does(tiny_sd_dir, photos):
    """B starts at zero, so the first step moves only B, by lr * g / |g| under Adam: ratio times as far with LoRA+."""
    base = load_base(tiny_sd_dir)
    job = TrainJob("gus", "m", photos, "mug")
    options = {"steps": 1, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, **FAST}
    (plain,) = train_adapters(base, [job], resolve_config(base, **options))
    (plus,) = train_adapters(base, [job], resolve_config(base, loraplus_lr_ratio=4.0, **options))
    b_keys = [k for k in plain.adapter.tensors if "lora_B" in k]
    assert b_keys and len(b_keys) * 2 == sum(k.startswith("unet.") for k in plain.adapter.tensors)
    for key, tensor in plain.adapter.tensors.items():
        expected = 4.0 * tensor if key in b_keys else tensor
        torch.testing.assert_close(plus.adapter.tensors[key], expected, rtol=1e-4, atol=1e-7)
    assert max(float(plain.adapter.tensors[k].abs().max()) for k in b_keys) > 1e-3  # B did move


def test_distilled_prior_is_zero_while_the_adapter_is_the_base(tiny_sd_dir, photos):
    """With a vanishing learning rate the LoRA stays ~zero, so the model is the base and class rows regressed
    on the base's own prediction add nothing: the loss equals the instance rows' alone. Class rows
    regressed on the class images' noise do add to it."""
    base = load_base(tiny_sd_dir)
    job = [TrainJob("dora", "m", photos, "mug")]
    frozen = dict(steps=3, lr=1e-12, token_lr=1e-12, warmup_steps=0, **FAST)
    instance_only = train_adapters(base, job, resolve_config(base, prior_weight=0.0, **frozen))[0].loss_curve
    distilled = train_adapters(base, job, resolve_config(base, prior_distill=True, **frozen))[0].loss_curve
    in_context = train_adapters(base, job, resolve_config(base, prior_distill=True, prior_context=True, **frozen))[0].loss_curve
    noise_target = train_adapters(base, job, resolve_config(base, **frozen))[0].loss_curve
    assert distilled == pytest.approx(instance_only, rel=1e-4)
    assert in_context == pytest.approx(instance_only, rel=1e-4)
    assert all(n > d + 1e-3 for n, d in zip(noise_target, distilled))


@pytest.mark.parametrize("prior_context", [False, True])
def test_class_rows_carry_the_class_prompt_or_the_photos_captions_without_the_trigger(tiny_sd_dir, photos, prior_context):
    base = load_base(tiny_sd_dir)
    cfg = resolve_config(base, "quick", batch_size=2, prior_distill=True, prior_context=prior_context, trigger="ted")
    templates = ["a large {trigger} mug on the left", "{trigger} {class_word} on a dotted cloth", "{trigger}"]
    (job,) = prepare_jobs([TrainJob("u", "m", photos, "mug", captions=templates)], cfg)  # trigger "ted": in "dotted" too
    data = TrainingData([job], [[Image.new("RGB", (64, 64), "gray")] * 2], base.pipe.vae, cfg, torch.device("cpu"), 1000)
    batches = [data.batch(step, 0, 0) for step in range(24)]
    class_rows = [c for b in batches for c, prior in zip(b.captions, b.prior.tolist()) if prior]
    contexts = {"a large mug on the left", "mug on a dotted cloth"}  # "{trigger}" alone leaves the class prompt
    assert all(job.trigger not in c.split() for c in class_rows)
    if prior_context:  # every other class row: the class prompt, then a photo's caption minus its trigger
        assert class_rows.count("a mug") >= len(class_rows) // 2 and set(class_rows) == {"a mug", *contexts}
        assert data.users[0].context_captions[2] == "a mug"  # never the empty prompt
        assert contexts <= set(data.captions())  # encoded once, with the rest
    else:
        assert set(class_rows) == {"a mug"}


@pytest.mark.parametrize("bias", ["later", "earlier"])
def test_timestep_bias_draws_the_biased_timesteps_more_often_and_changes_nothing_else(tiny_sd_dir, photos, bias):
    base = load_base(tiny_sd_dir)
    (job,) = prepare_jobs([TrainJob("u", "m", photos, "mug")], resolve_config(base, "quick"))

    def draws(**options):
        cfg = resolve_config(base, "quick", batch_size=4, **options)
        data = TrainingData([job], [[Image.new("RGB", (64, 64), "gray")] * 2], base.pipe.vae, cfg, torch.device("cpu"), 1000)
        return [data.batch(step, 0, 0) for step in range(200)]

    uniform, biased = draws(), draws(timestep_bias=bias, timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    t = torch.cat([b.timesteps for b in biased])
    share = float(((t >= 750) if bias == "later" else (t < 250)).float().mean())
    assert 0.43 < share < 0.57  # 3 x 0.25 / (3 x 0.25 + 0.75) = 0.5 of the draws, against 0.25 uniform
    for u, b in zip(uniform, biased):  # the same photos, noise and captions: the option moves the timesteps alone
        assert torch.equal(u.latents, b.latents) and torch.equal(u.noise, b.noise) and u.captions == b.captions


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])  # with an average of the weights, its state resumes too
def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny_sd_dir, photos, tmp_path, ema_decay):
    base = load_base(tiny_sd_dir)
    job = [TrainJob("carol", "m", photos, "mug")]
    settings = dict(steps=4, lr=1e-2, checkpoint_every=1, keep_checkpoints=2, ema_decay=ema_decay, **FAST)
    (straight,) = train_adapters(base, job, resolve_config(base, output_dir=str(tmp_path / "a"), **settings))

    def stop_after_two(step, total, info):
        if info["phase"] == "train" and step == 2:
            raise KeyboardInterrupt
    cfg = resolve_config(base, output_dir=str(tmp_path / "b"), **settings)
    with pytest.raises(KeyboardInterrupt):
        train_adapters(base, job, cfg, progress=stop_after_two)
    checkpoint = tmp_path / "b" / "checkpoint-000002"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 2
    assert not any("model" in p.name and p.suffix in (".safetensors", ".bin") for p in checkpoint.iterdir())  # LoRA only, no base
    # the average is in safetensors: accelerate loads a registered object's pickle with weights_only=False
    assert not list(checkpoint.glob("custom_checkpoint_*")) and (checkpoint / "ema.safetensors").is_file() == bool(ema_decay)

    steps = []
    (resumed,) = train_adapters(base, job, cfg, progress=lambda s, t, i: steps.append(s) if i["phase"] == "train" else None)
    assert steps == [3, 4]
    assert resumed.loss_curve == pytest.approx(straight.loss_curve)
    for key, tensor in straight.adapter.tensors.items():
        torch.testing.assert_close(resumed.adapter.tensors[key], tensor)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-000003", "checkpoint-000004"]


def test_an_output_folder_never_mixes_two_runs(tiny_sd_dir, photos, tmp_path):
    """One output folder, two different jobs: the second refuses the first's checkpoints (it once resumed from them
    and registered the mix), with resume off too (it would overwrite them); resume off restarts the job's own run;
    and a state file cut short by a kill marks its checkpoint incomplete instead of stopping every later run."""
    base = load_base(tiny_sd_dir)
    save_sample_subject("robot-2", tmp_path / "robots", n=2)
    out = str(tmp_path / "run")
    first = [TrainJob("carol", "m", photos, "mug")]
    second = [TrainJob("carol", "r", tmp_path / "robots", "robot")]
    settings = dict(steps=3, checkpoint_every=1, keep_checkpoints=2, output_dir=out, **FAST)
    train_adapters(base, first, resolve_config(base, **settings))
    for resume in (True, False):
        with pytest.raises(BespokeError, match="checkpoint-00000[23] is a checkpoint of another training run"):
            train_adapters(base, second, resolve_config(base, **settings, resume=resume))
    assert sorted(p.name for p in Path(out).iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    shutil.rmtree(out)
    steps = []
    train_adapters(base, second, resolve_config(base, **settings), progress=lambda s, t, i: steps.append(s) if i["phase"] == "train" else None)
    train_adapters(base, second, resolve_config(base, **{**settings, "steps": 2, "resume": False}), progress=lambda s, t, i: steps.append(s) if i["phase"] == "train" else None)
    assert steps == [1, 2, 3, 1, 2] and sorted(p.name for p in Path(out).iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    state = Path(out) / "checkpoint-000002" / "train_state.json"
    state.write_text(state.read_text()[:10])  # killed mid-write (before writes became whole-then-rename)
    steps.clear()
    train_adapters(base, second, resolve_config(base, **{**settings, "steps": 2}), progress=lambda s, t, i: steps.append(s) if i["phase"] == "train" else None)
    assert steps == [2]  # resumed from checkpoint 1, the last complete one


def test_ema_saves_the_moving_average_of_the_weights_each_step_had(tiny_sd_dir, photos, tmp_path):
    """Each checkpoint holds that step's live LoRA weights; the adapter must be their moving average with
    diffusers' EMAModel schedule: decay min(ema_decay, t / (9 + t)) at step t (0 at the first step)."""
    base = load_base(tiny_sd_dir)
    ema_decay, steps = 0.2, 4
    cfg = resolve_config(base, steps=steps, lr=1e-2, checkpoint_every=1, keep_checkpoints=steps, ema_decay=ema_decay, output_dir=str(tmp_path / "run"), **FAST)
    (result,) = train_adapters(base, [TrainJob("erin", "m", photos, "mug")], cfg)
    average = None
    for t in range(1, steps + 1):
        live = load_file(str(tmp_path / "run" / f"checkpoint-{t:06d}" / "lora.safetensors"))
        total = sum(v.double().sum() for k, v in live.items() if k.startswith("0."))  # model 0: the UNet's LoRA (an average is linear)
        decay = min(ema_decay, t / (9 + t)) if t > 1 else 0.0
        average = total if average is None else decay * average + (1 - decay) * total
    got = sum(v.double().sum() for k, v in result.adapter.tensors.items() if k.startswith("unet."))
    assert abs(float(got - total)) > 1e-3  # the average is not the last step's weights
    assert float(got) == pytest.approx(float(average), rel=1e-4, abs=1e-5)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_sd_dir, photos, tmp_path, monkeypatch):
    """A NaN loss at step 4 came from the weights checkpoint 3 holds: 2 is the last good one, and 3 is removed
    so that a resume cannot start from it."""
    base = load_base(tiny_sd_dir)
    before = snapshot(base)
    real = TrainingData.batch

    def batch(self, step, micro, process):
        rows = real(self, step, micro, process)
        if step == 3:
            rows.latents[:] = float("nan")
        return rows

    monkeypatch.setattr(TrainingData, "batch", batch)
    cfg = resolve_config(base, steps=6, warmup_steps=0, checkpoint_every=1, keep_checkpoints=3, output_dir=str(tmp_path / "run"), **FAST)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4 \(loss dave/x: nan\); the last good checkpoint is .*checkpoint-000002 \(step 2\)"):
        train_adapters(base, [TrainJob("dave", "x", photos, "mug")], cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]
    assert snapshot(base) == before


def test_an_update_that_breaks_the_weights_is_caught_even_at_the_last_step(tiny_sd_dir, photos, tmp_path):
    """Step 1's loss is finite (B starts at zero) and lr 1e30 breaks the weights after it: the check after the
    last step refuses them, and nothing is registered."""
    base = load_base(tiny_sd_dir)
    registry = Registry(tmp_path / "registry")
    for steps, match in ((1, r"diverged at step 2 \(loss dave/x: (nan|inf)\); no good checkpoint"), (6, r"diverged at step 2 .*no good checkpoint")):
        with pytest.raises(TrainingDiverged, match=match):
            personalize(base, "dave", "x", photos, "mug", registry=registry, steps=steps, lr=1e30, warmup_steps=0, checkpoint_every=1, output_dir=str(tmp_path / f"run{steps}"), **FAST)
        assert not list((tmp_path / f"run{steps}").glob("checkpoint-*"))  # checkpoint 1 holds the broken weights
    assert registry.for_user("dave").concepts() == []


def test_presets_options_and_command_line_flags(tiny_sd_dir):
    import argparse

    base = load_base(tiny_sd_dir)
    assert profile_of(base) == "builtin"  # a 64-px base, whatever its folder
    cfg = resolve_config(base)
    assert (cfg.resolution, cfg.alpha, cfg.mixed_precision, cfg.text_lr) == (64, float(cfg.rank), "no", cfg.lr)
    assert resolve_config(base, "best").rank > resolve_config(base, "quick").rank
    assert resolve_config(base, "balanced", trigger="zwx").new_token is False  # an explicit trigger replaces the new token
    assert resolve_config(base).prior_context and not resolve_config(base, prior_distill=False).prior_context  # so do prior switches
    assert not resolve_config(base, prior_preservation=False).prior_context
    for options, message in [
        ({"rnak": 4}, "unknown training option 'rnak'"),
        ({"rank": 0}, "rank must be between 1 and 1024"),
        ({"resolution": 63}, "resolution must be a multiple of 4"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\), got 1.0"),
        ({"timestep_bias": "late"}, "timestep_bias must be one of none, earlier, later, got 'late'"),
        ({"timestep_bias_portion": 0.0}, r"timestep_bias_portion must be in \(0, 1\], got 0.0"),
        ({"token_retract": 1.5}, "token_retract must be between 0 and 1, got 1.5"),
        ({"loraplus_lr_ratio": 0.0}, "loraplus_lr_ratio must be positive, got 0.0"),
        ({"mixed_precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"trigger": "zwx", "new_token": True}, "either a trigger or new_token"),
        ({"prior_distill": False, "prior_context": True}, "prior_context needs prior_preservation and prior_distill"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            resolve_config(base, **options)
    with pytest.raises(InvalidRequest, match="unknown preset"):
        resolve_config(base, "fastest")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default targets, and a subset of them, are served: no warning
        resolve_config(base, "best", text_encoder_lora=True)
        resolve_config(base, unet_targets="attn2.to_k,attn2.to_v")
    with pytest.warns(UserWarning, match=r"outside the sampler's default slots \(e.g. unet\.[\w.]*conv1\)"):
        resolve_config(base, unet_targets="to_q,conv1")  # trainable, but the sampler would refuse the adapter

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--rank", "16", "--no-prior-preservation", "--unet-targets", "to_q,to_v", "--min-snr-gamma", "5"])
    assert overrides_from_args(args) == {"rank": 16, "prior_preservation": False, "unet_targets": ("to_q", "to_v"), "min_snr_gamma": 5.0}


def test_min_snr_weights_stay_finite_with_zero_terminal_snr():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    t = torch.tensor([0, 500, 999])
    v = _min_snr_weights(sched, t, 5.0, "v_prediction")
    eps = _min_snr_weights(sched, t, 5.0, "epsilon")
    assert torch.isfinite(v).all() and torch.isfinite(eps).all()
    assert v[2] == 0 and eps[0] == pytest.approx(5.0 / float(_snr(sched, 0)), rel=1e-4)


def _snr(sched, t: int) -> torch.Tensor:
    a = sched.alphas_cumprod[t]
    return a / (1 - a)


def test_class_images_are_generated_once_per_base_and_prompt(tiny_sd_dir, monkeypatch):
    base = load_base(tiny_sd_dir)
    first = class_images(base, "a mug", 3, 64, steps=2)
    folder = class_image_folder(base, "a mug", 64, 2)
    assert folder.parent.name == base.fingerprints.weights and folder.parent.parent.name == "class_images"
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("class images were generated twice"))
    again = class_images(base, "a mug", 3, 64, steps=2)
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(first, again)] == [True] * 3


def test_user_errors_stop_before_training_with_one_line(tiny_sd_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_lora

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    code = train_lora.main(["--base", tiny_sd_dir, "--user", "eve", "--concept", "c", "--class-word", "mug", "--images", str(tmp_path / "bad"), "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "broken.jpg" in err


@pytest.mark.parametrize("seed", [-3, 2**63 - 3])  # numpy refuses the one, validation sampling (4 images: seed + 3) the other
def test_a_job_seed_out_of_range_is_refused_before_any_model_work(tiny_sd_dir, photos, seed):
    base = load_base(tiny_sd_dir)
    with pytest.raises(InvalidRequest, match=f"carol/m: seed must be between 0 and {2**63 - 4}, got {seed}"):
        prepare_jobs([TrainJob("carol", "m", photos, "mug", seed=seed)], resolve_config(base, **FAST))
    with pytest.raises(InvalidRequest, match="seed must be"):
        resolve_config(base, seed=seed, **FAST)


def test_a_trigger_that_is_the_class_word_is_refused(tiny_sd_dir, photos):
    base = load_base(tiny_sd_dir)
    with pytest.raises(InvalidRequest, match="the trigger 'Mug' is the class word"):
        prepare_jobs([TrainJob("carol", "m", photos, "mug")], resolve_config(base, trigger="Mug", **FAST))


def test_options_that_need_a_switch_that_is_off_say_so(tiny_sd_dir):
    base = load_base(tiny_sd_dir)
    with pytest.warns(UserWarning, match="num_new_tokens has no effect: new_token is off"):
        resolve_config(base, "quick", num_new_tokens=3)
    with pytest.warns(UserWarning, match="prior_weight has no effect: prior_preservation is off"):
        resolve_config(base, prior_preservation=False, prior_weight=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_config(base, "quick", new_token=True, num_new_tokens=3)


def test_the_same_seed_gives_the_same_adapter_with_dropout_and_the_record_keeps_the_jobs_seed(tiny_sd_dir, photos, tmp_path):
    base = load_base(tiny_sd_dir)
    options = dict(steps=2, dropout=0.3, lr=1e-2, warmup_steps=0, **FAST)
    registry = Registry(tmp_path / "registry")
    first, second = (personalize(base, "gus", f"m{i}", photos, "mug", registry=registry, seed=7, **options) for i in range(2))
    a, b = (registry.for_user("gus").get(r.concept) for r in (first, second))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    jobs = [TrainJob("gus", "x", photos, "mug", seed=9), TrainJob("hal", "y", photos, "mug", seed=11)]
    records = personalize_many(base, jobs, registry=registry, seed=7, **options)
    assert [r.training_config["seed"] for r in records] == [9, 11]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_trains_with_two_processes(tiny_sd_dir, photos, tmp_path):
    from accelerate.utils import write_basic_config

    config = tmp_path / "accelerate.yaml"
    write_basic_config(mixed_precision="no", save_location=str(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BESPOKE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    # Without a GPU, --multi_gpu makes torchrun start the processes; they join as a gloo group on the CPU.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()),  # torchrun's fixed default (29500) can still be held by an earlier group
        str(ROOT / "scripts" / "train_lora.py"), "--base", tiny_sd_dir, "--user", "frank", "--concept", "duo", "--class-word", "mug",
        "--images", str(photos), "--registry", str(tmp_path / "reg"), "--preset", "quick", "--steps", "2",
        "--num-class-images", "2", "--class-image-steps", "2", "--no-evaluate", "--device", "cpu",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    errors = [line for line in run.stderr.splitlines() if "error:" in line.lower() and "[rank" not in line]  # a rank's one-line user error
    assert run.returncode == 0, "\n".join(errors) + "\n" + run.stderr[-2000:]
    # Every process reports the record it received: the same version and the same file hash.
    reports = dict(re.findall(r"\[process (\d)/2\] frank/duo v1 \((\w+)\)", run.stdout))
    assert sorted(reports) == ["1", "2"] and len(set(reports.values())) == 1, run.stdout
    with Registry(tmp_path / "reg") as registry:
        assert registry.for_user("frank").record("duo").metrics["steps"] == 2.0


def test_another_process_count_is_another_run(tiny_sd_dir, photos, monkeypatch):
    """Each process draws its own rows, so a checkpoint made by one process must not be resumed by two."""
    from accelerate import PartialState

    from adapters.train.loop import run_identity

    base = load_base(tiny_sd_dir)
    cfg = resolve_config(base, **FAST)
    jobs = prepare_jobs([TrainJob("gus", "m", photos, "mug")], cfg)
    alone = run_identity(base, jobs, cfg)
    monkeypatch.setattr(PartialState, "num_processes", property(lambda self: 2), raising=False)  # an instance attribute there
    assert run_identity(base, jobs, cfg) != alone


RETRY_CHILD = """
import sys
from accelerate import PartialState
import adapters.registry as registry_module
from adapters.registry import Registry
from adapters.train import personalize
from gen.base import load_base
from gen.errors import BespokeError

state = PartialState(cpu=True)
base = load_base(sys.argv[1], device="cpu")
failures = [1 if state.is_main_process else 0]  # the main process's first put fails, as a busy registry would
real = registry_module.Registry.for_user

def for_user(self, user):
    handle = real(self, user)
    put = handle.put
    def failing_put(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise BespokeError("registry busy, try again")
        return put(*args, **kwargs)
    handle.put = failing_put
    return handle

registry_module.Registry.for_user = for_user
registry = Registry(sys.argv[3]) if state.is_main_process else None
try:
    record = personalize(base, "frank", "duo", sys.argv[2], "mug", registry=registry, preset="quick", steps=2, num_class_images=2, class_image_steps=2)
    outcome = f"v{record.version}"
except BespokeError as e:  # caught, as a retrying caller would: the process lives on
    outcome = str(e)
sys.stdout.write(f"[rank {state.process_index}] {outcome}\\n")
sys.stdout.flush()
state.wait_for_everyone()  # the other process's next collective: it hung here (or died) when only rank 0 knew
"""


def test_a_failure_on_the_main_process_reaches_every_process(tiny_sd_dir, photos, tmp_path):
    """Registering runs on the main process; its error once stopped there, and the other process waited in the
    broadcast forever: a caller that caught it to retry, as a busy registry invites, deadlocked."""
    from accelerate.utils import write_basic_config

    config, child = tmp_path / "accelerate.yaml", tmp_path / "retry.py"
    write_basic_config(mixed_precision="no", save_location=str(config))
    child.write_text(RETRY_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BESPOKE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()), str(child), tiny_sd_dir, str(photos), str(tmp_path / "reg"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)  # the old deadlock: a timeout
    assert run.returncode == 0, run.stderr[-2000:]
    # the two processes share one stdout, so their lines can interleave mid-line
    lines = sorted(m.strip() for m in re.findall(r"\[rank \d\] .*?(?=\[rank|\n|$)", run.stdout))
    assert lines == ["[rank 0] registry busy, try again", "[rank 1] the main process failed: BespokeError: registry busy, try again"], run.stdout


def test_bench_quick_writes_the_expected_json(tiny_sd_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_personalize

    out = tmp_path / "bench.json"
    bench_personalize.main(["--quick", "--base", tiny_sd_dir, "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"runs", "subjects", "summary", "ablation", "multi_user", "targets", "settings", "environment", "class_image_seconds"} <= set(data)
    row = data["runs"][0]
    assert {"subject", "seed", "train_seconds", "evaluate_seconds", "subject_fidelity", "prompt_fidelity", "prior_drift_class_accuracy", "prior_drift_identity"} <= set(row)
    labels = [r["variant"] for r in data["ablation"]]
    prior_targets = {"prior on the class images' noise", "prior on the base's prediction"}  # the default holds it on both
    assert labels[0].startswith("default") and {"rank 4", "rank 16", "LoRA on cross-attention", "LoRA on transformer blocks", "prior off", *prior_targets} <= set(labels) and len(labels) == 10
    first = data["ablation"][0]
    assert list(first["subject_fidelity_by_subject"]) == ["robot-0"] and first["subject_fidelity"] == first["subject_fidelity_by_subject"]["robot-0"]
    assert {"throughput_ratio", "images_per_s_one_job", "images_per_s_sequential", "quality_one_job"} <= set(data["multi_user"])
    bench_personalize.main(["--quick", "--base", tiny_sd_dir, "--parts", "subjects", "--subjects", "cat-5", "--seeds", "0", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert not {"ablation", "multi_user"} & set(data) and [r["subject"] for r in data["subjects"]] == ["cat-5"]  # only what was asked for ran
    runs, (row,) = data["runs"], data["subjects"]
    assert [r["seed"] for r in runs] == row["seeds"] == [0, 1] and runs[0]["final_loss"] != runs[1]["final_loss"]  # each seed trained
    fidelity = [r["subject_fidelity"] for r in runs]
    assert row["subject_fidelity"] == pytest.approx(sum(fidelity) / 2) and (row["subject_fidelity_min"], row["subject_fidelity_max"]) == (min(fidelity), max(fidelity))
    with pytest.raises(SystemExit):
        bench_personalize.main(["--quick", "--subjects", "robot-500"])  # pretrained on, not held out
    for bad in (["--seeds", "0", "-1"], ["--lr", "nan"]):  # refused before any training, not at the second seed's run
        with pytest.raises(SystemExit):
            bench_personalize.main(["--quick", "--base", tiny_sd_dir, "--parts", "subjects", "--out", str(tmp_path / "refused.json"), *bad])
    assert not (tmp_path / "refused.json").exists()


def test_multi_user_bench_quick_times_ours_peft_alone_and_one_wide_user(tiny_sd_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_multi_user

    out = tmp_path / "multi.json"
    bench_multi_user.main(["--quick", "--base", tiny_sd_dir, "--device", "cpu", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["users"] == 2 and row["ours_ms"] > 0 and row["peft_loop_ms"] > 0
    assert row["throughput_vs_alone"] == pytest.approx(row["alone_ms_times_users"] / row["ours_ms"])
    assert row["one_wide_user_ms"] > 0 and row["throughput_ceiling_vs_alone"] == pytest.approx(row["alone_ms_times_users"] / row["one_wide_user_ms"])


def test_train_step_bench_quick_compares_both_recipes_on_both_families(tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train_step.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"sd15", "sdxl"}
    for row in data["models"].values():
        assert row["ours"]["timed_steps"] >= 2 and row["diffusers"]["timed_steps"] >= 2
        assert row["speedup"] == pytest.approx(row["diffusers"]["step_s"] / row["ours"]["step_s"])
    assert "training step" in done.stdout


def test_fidelity_metrics_rate_real_renders_as_faithful():
    from adapters.fidelity import world_captions
    from gen.benchmark import evaluation_prompt, evaluation_specs
    from gen.evaluate import prompt_fidelity, stated_attributes, subject_fidelity
    from adapters.samples import sample_subject_images, subject_instance, subject_specs
    from gen import world
    from gen.evaluator import load_evaluator

    evaluator = load_evaluator()
    instance = subject_instance("robot-3")
    photos = sample_subject_images(instance, 4)
    specs = evaluation_specs("robot", 8, seed=0, instance=instance)
    assert [kind for kind, _ in specs] == ["recontext", "position", "accessory", "colour"] * 2
    prompts = [evaluation_prompt(kind, spec, "<robo>", i) for i, (kind, spec) in enumerate(specs)]
    assert all("<robo> robot" in p for p in prompts)
    assert all(stated_attributes(p)["position"] == spec.position for p, (kind, spec) in zip(prompts, specs) if kind == "position")
    renders = [world.render(spec, 1000 + i) for i, (_, spec) in enumerate(specs)]
    assert prompt_fidelity(renders, prompts, evaluator) >= 0.9  # the world itself follows its prompts
    same = subject_fidelity([r for r, (kind, _) in zip(renders, specs) if kind != "colour"], photos, evaluator)
    other = subject_fidelity(sample_subject_images("robot-4", 4), photos, evaluator)
    assert same["subject_fidelity"] > 0.95 > other["subject_fidelity"]

    captions = world_captions(photos, "robot", evaluator)  # the photos described as the base was taught to read
    for caption, spec in zip(captions, subject_specs(instance, 4)):
        stated = stated_attributes(caption.format(trigger="<robo>"))
        assert "{trigger} robot" in caption and (stated["background"], stated["scene"]) == (spec.background, spec.scene)


def _unet_lora(lora, k: int) -> list:
    params = lora.user_parameters(k)
    return params["unet_A"] + params["unet_B"]


@pytest.mark.parametrize("users", [1, 2])
def test_base_only_runs_the_base_with_live_lora_and_leaves_it_trainable(tiny_sd_dir, users):
    """What the distilled prior regresses on: the base's prediction even while the LoRA is far from zero."""
    from adapters.train.lora import LoraSpec, attach

    base = load_base(tiny_sd_dir)
    unet = base.pipe.unet
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = unet(x, t, context).sample
    spec = LoraSpec(4, 4.0, 0.0, ("to_q", "to_k", "to_v", "to_out.0"), None, ((),) * users, ("mug",) * users, tuple(range(users)))
    with attach(base, spec) as lora, torch.no_grad(), lora.rows([0, users - 1]):
        for p in _unet_lora(lora, 0):
            p.add_(0.5)
        assert (unet(x, t, context).sample - expected).abs().max() > 1e-2  # the LoRA is live
        with lora.base_only():
            torch.testing.assert_close(unet(x[:1], t[:1], context[:1]).sample, expected[:1], rtol=1e-4, atol=1e-5)
        assert all(p.requires_grad for k in range(users) for p in _unet_lora(lora, k))
        assert (unet(x, t, context).sample - expected).abs().max() > 1e-2  # and live again after


def test_batched_multi_user_lora_matches_peft_per_user_loop_in_outputs_and_gradients(tiny_sd_dir):
    """Rows in equal runs per user take the batched path (bmm / grouped conv); peft's mixed-batch loop is the reference."""
    from adapters.train.lora import LoraSpec, attach, equal_runs

    assert equal_runs(["a", "a", "b", "b"]) == ["a", "b"] and equal_runs(["a", "b", "a", "b"]) is None
    assert equal_runs(["a", "a", "b"]) is None and equal_runs(["a", "__base__"]) is None
    base = load_base(tiny_sd_dir)
    unet = base.pipe.unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 4, 8, 8, generator=g), torch.tensor([10, 500, 900, 30, 250, 700])
    context = torch.randn(6, 77, unet.config.cross_attention_dim, generator=g)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")  # Linear, 1x1 and 3x3 Conv2d
    spec = LoraSpec(4, 8.0, 0.0, targets, None, ((),) * 3, ("mug",) * 3, (0, 1, 2))
    with attach(base, spec) as lora:
        params = [p for k in range(3) for p in _unet_lora(lora, k)]
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.2, generator=g)  # every user's B nonzero, all different
        results = []
        for batched in (True, False):
            lora.router.batched = batched
            with lora.rows([0, 0, 1, 1, 2, 2]):
                assert (lora.router.runs is not None) == batched  # the two sides really take different paths
                out = unet(x, t, context).sample
                grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)
            results.append((out, grads))
        (ours, our_grads), (peft, peft_grads) = results
        torch.testing.assert_close(ours, peft, rtol=1e-4, atol=1e-5)
        for mine, theirs in zip(our_grads, peft_grads):
            # A gradient sums many products, and the two paths add them in different orders, so a
            # near-zero element's fp32 error is a fraction of the tensor's scale, not of the element.
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4 * theirs.abs().max().item())
        assert all(grad.abs().sum() > 0 for grad in our_grads)  # every user's every LoRA weight got a gradient

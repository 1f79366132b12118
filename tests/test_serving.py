"""Serving users' adapters through the sampler: mentions, batching across users and threads, provenance."""

import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.base import load_base
from gen.concepts import UnknownConcept
from gen.errors import InvalidRequest
from gen.lora_runtime import AdapterDoesNotFit, RuntimeConfig
from gen.sampler import PromptTruncatedWarning, Request, Sampler
from gen.serving import ServingConfig

STEPS = dict(steps=2, guidance_scale=5.0)
ROOT = Path(__file__).resolve().parents[1]


class DictSource:
    """An in-memory AdapterSource: (user, concept) -> versions, oldest first."""

    def __init__(self):
        self.versions = {}

    def add(self, adapter):
        versions = self.versions.setdefault((adapter.user, adapter.concept), [])
        versions.append(replace(adapter, version=len(versions) + 1))

    def get(self, user, concept, version="latest"):
        versions = self.versions[(user, concept)]
        return versions[-1] if version == "latest" else versions[version - 1]

    def concepts(self, user):
        return sorted(c for u, c in self.versions if u == user)


def make(spec, user, concept, seed, trigger=None, class_word=None, rank=4, **extra):
    lora = random_adapter(spec, rank=rank, alpha=rank * 1.5, seed=seed, std=0.2)
    return replace(lora, user=user, concept=concept, trigger=trigger, class_word=class_word, **extra)


@pytest.fixture(scope="module")
def spec(tiny_sd_dir):
    return BaseSpec.from_base(load_base(tiny_sd_dir))


@pytest.fixture(scope="module")
def source(spec):
    src = DictSource()
    src.add(make(spec, "alice", "rex", 1, "sks", "dog"))
    src.add(make(spec, "alice", "cat", 2, "zwx", "cat", rank=8))
    src.add(make(spec, "alice", "watercolor", 3, "wtrclr style"))
    src.add(make(spec, "bob", "fox", 4, "qqz", "fox"))
    src.add(make(spec, "carol", "mug", 5, "vvk", "mug"))
    src.add(make(spec, "dave", "car", 6, "ppt", "car"))
    src.add(make(spec, "erin", "old", 7, "kkv", "dog", base_fingerprint=spec.weights_fingerprint))  # the earlier scheme's record
    src.add(make(spec, "erin", "foreign", 8, "kkw", "dog", base_fingerprint="0" * 16))
    return src


@pytest.fixture(scope="module")
def sampler(tiny_sd_dir, source):
    return Sampler(load_base(tiny_sd_dir), source)


def pixels(image):
    return np.asarray(image).astype(np.int16)


def same_image(a, b):
    return np.abs(pixels(a) - pixels(b)).max() <= 1


def diffusers_sampler(tiny_sd_dir, weighted):
    """A plain sampler whose UNet carries the adapters through diffusers/peft: the reference."""
    base = load_base(tiny_sd_dir)
    for i, (adapter, _) in enumerate(weighted):
        meta = {"r": adapter.rank, "lora_alpha": adapter.alpha, "target_modules": list(adapter.target_modules)}
        base.pipe.unet.load_lora_adapter(adapter.component_tensors("unet"), prefix=None, adapter_name=f"a{i}", metadata=meta)
    base.pipe.unet.set_adapters([f"a{i}" for i in range(len(weighted))], weights=[w for _, w in weighted])
    return Sampler(base)


def test_mentions_and_a_style_match_diffusers_with_the_same_adapters(sampler, source, tiny_sd_dir):
    ours = sampler.generate("a photo of <rex:0.8> with <cat:0.5>", user="alice", style="watercolor:0.6", seed=3, **STEPS)
    weighted = [(source.get("alice", c), w) for c, w in (("rex", 0.8), ("cat", 0.5), ("watercolor", 0.6))]
    reference = diffusers_sampler(tiny_sd_dir, weighted).generate("a photo of sks dog with zwx cat, wtrclr style", seed=3, **STEPS)
    assert same_image(ours.images[0], reference.images[0])
    plain = sampler.generate("a photo of sks dog with zwx cat, wtrclr style", seed=3, **STEPS)
    assert np.abs(pixels(ours.images[0]) - pixels(plain.images[0])).mean() > 2  # the adapters really act

    prov = ours.provenance[0]
    assert prov.user == "alice" and prov.prompt == "a photo of <rex:0.8> with <cat:0.5>"
    assert prov.adapters == (
        {"user": "alice", "concept": "rex", "version": 1, "weight": 0.8, "kind": "concept"},
        {"user": "alice", "concept": "cat", "version": 1, "weight": 0.5, "kind": "concept"},
        {"user": "alice", "concept": "watercolor", "version": 1, "weight": 0.6, "kind": "style"},
    )


@pytest.mark.parametrize("single", ["slot", "fused"])
def test_every_one_set_path_serves_the_image_the_bound_path_does(sampler, source, tiny_sd_dir, single):
    """The CPU default (bound) matches diffusers above; the single slot and fused weights must give that image too."""
    other = Sampler(load_base(tiny_sd_dir), source, ServingConfig(runtime=RuntimeConfig(single=single)))
    assert other.serving.runtime.single_path == single
    for prompt in ("a photo of <rex:0.8> with <cat:0.5>", "a <rex> on the beach"):  # composed, then a switch to one adapter
        ours = other.generate(prompt, user="alice", seed=3, **STEPS)
        assert same_image(ours.images[0], sampler.generate(prompt, user="alice", seed=3, **STEPS).images[0])


def test_unknown_concepts_and_other_users_concepts_are_refused(sampler):
    with pytest.raises(UnknownConcept, match=r"user 'alice' has no concept <rexx>; their concepts: <cat>, <rex>, <watercolor>"):
        sampler.generate("a photo of <rexx>", user="alice", **STEPS)
    with pytest.raises(UnknownConcept, match=r"user 'bob' has no concept <rex>; their concepts: <fox>"):
        sampler.generate("a photo of <rex>", user="bob", **STEPS)
    with pytest.raises(InvalidRequest, match="no user was given"):
        sampler.generate("a photo of <rex>", **STEPS)
    with pytest.raises(InvalidRequest, match="reserved token"):
        sampler.generate("a dog", negative_prompt="<bespoke-token-0>", user="alice", **STEPS)


def test_adapters_of_this_base_are_served_and_others_refused(sampler):
    """An adapter recorded with every weight's fingerprint (before the VAE was left out) is still this base's."""
    assert len(sampler.generate("a photo of <old>", user="erin", **STEPS).images) == 1
    with pytest.raises(AdapterDoesNotFit, match=f"erin/foreign v1 was trained on base 0{{16}}; this sampler serves base {sampler.base.fingerprint}"):
        sampler.generate("a photo of <foreign>", user="erin", **STEPS)


REQUESTS = [
    Request("a photo of <rex> on the beach", user="alice", num_images=2, seed=10, **STEPS),
    Request("a <fox:0.7> in the grass", user="bob", seed=20, **STEPS),
    Request("a red <mug>", user="carol", num_images=2, seed=30, **STEPS),
    Request("a blue car", seed=40, **STEPS),  # no adapter in the same batch
    Request("a <car> at the top", user="dave", seed=50, steps=3, guidance_scale=5.0),  # other steps: its own batch
]


def test_generate_many_mixes_users_and_each_image_equals_its_request_alone(sampler):
    batches = []
    run_batch = sampler._run_batch
    sampler._run_batch = lambda jobs: batches.append([j.request.user for j in jobs]) or run_batch(jobs)
    try:
        together = sampler.generate_many(REQUESTS)
    finally:
        del sampler._run_batch
    assert batches == [["alice", "bob", "carol", None], ["dave"]]  # four users' requests in one pipeline call
    for request, gen in zip(REQUESTS, together):
        alone = sampler.generate_many([request])[0]
        assert [p.seed for p in gen.provenance] == [p.seed for p in alone.provenance]
        assert [p.user for p in gen.provenance] == [request.user] * request.num_images
        assert all(same_image(a, b) for a, b in zip(gen.images, alone.images))
    assert sampler.serving.stats().hits > 0


def test_eight_threads_four_users(sampler):
    users = [("alice", "<rex>"), ("bob", "<fox>"), ("carol", "<mug:0.9>"), ("dave", "<car>")]
    requests = [Request(f"a photo of {users[i % 4][1]}", user=users[i % 4][0], seed=100 + i, **STEPS) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:  # each thread sends two requests, one after the other
        results = list(pool.map(lambda r: sampler.generate_many([r])[0], requests))
    for request, gen in zip(requests, results):
        prov = gen.provenance[0]
        assert (prov.user, prov.seed, prov.prompt) == (request.user, request.seed, request.prompt)
        assert prov.adapters[0]["user"] == request.user
        assert same_image(gen.images[0], sampler.generate_many([request])[0].images[0])


def test_sdxl_mixed_batch_with_text_encoder_adapters(tiny_sdxl_dir):
    base = load_base(tiny_sdxl_dir)
    spec = BaseSpec.from_base(base)
    source = DictSource()
    components = ("unet", "text_encoder", "text_encoder_2")
    for user, seed in (("alice", 1), ("bob", 2)):
        lora = random_adapter(spec, rank=4, seed=seed, std=0.2, components=components, targets=("to_q", "to_v", "q_proj", "v_proj"))
        source.add(replace(lora, user=user, concept="toy", trigger="sks", class_word="toy"))
    sampler = Sampler(base, source)
    requests = [Request("a <toy> car", user=u, seed=9, **STEPS) for u in ("alice", "bob")] + [Request("a sks toy car", seed=9, **STEPS)]
    together = sampler.generate_many(requests)
    for request, gen in zip(requests, together):
        assert same_image(gen.images[0], sampler.generate_many([request])[0].images[0])
    assert np.abs(pixels(together[0].images[0]) - pixels(together[2].images[0])).mean() > 2


def test_new_token_embeddings_match_tokens_added_by_hand(tiny_sd_dir, spec):
    hidden = spec.embedding_dims["text_encoder"]
    g = torch.Generator().manual_seed(0)
    source = DictSource()
    for user, seed in (("erin", 7), ("finn", 8)):  # both use the token strings <t0> <t1>: they must not collide
        emb = {"text_encoder": torch.randn(2, hidden, generator=g)}
        source.add(make(spec, user, "bot", seed, "<t0><t1>", "robot", new_tokens=("<t0>", "<t1>"), token_embeddings=emb))
    sampler = Sampler(load_base(tiny_sd_dir), source, ServingConfig(token_pool_size=4))
    requests = [Request("a <bot> on the left", user=u, seed=5, **STEPS) for u in ("erin", "finn")]
    together = sampler.generate_many(requests)
    for request, gen in zip(requests, together):
        adapter = source.get(request.user, "bot")
        reference = diffusers_sampler(tiny_sd_dir, [(adapter, 1.0)])
        pipe = reference.base.pipe
        pipe.tokenizer.add_tokens(list(adapter.new_tokens))
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[-2:] = adapter.token_embeddings["text_encoder"]
        expected = reference.generate("a <t0><t1> robot on the left", seed=5, **STEPS)
        assert same_image(gen.images[0], expected.images[0])
    assert np.abs(pixels(together[0].images[0]) - pixels(together[1].images[0])).mean() > 2


def test_a_placeholder_built_from_text_and_a_mention_fails_alone(tiny_sd_dir, spec):
    """A concept "0" without trigger reads "0": <bespoke-token-<0>> would reach the row lent to bob's token."""
    hidden = spec.embedding_dims["text_encoder"]
    source = DictSource()
    source.add(make(spec, "bob", "bot", 1, "<t0>", "robot", new_tokens=("<t0>",), token_embeddings={"text_encoder": torch.ones(1, hidden)}))
    source.add(make(spec, "alice", "0", 2))
    source.add(make(spec, "alice", "9", 3))
    source.add(make(spec, "alice", "bot", 4, "<t0>", "robot", new_tokens=("<t0>",), token_embeddings={"text_encoder": torch.ones(1, hidden)}))
    sampler = Sampler(load_base(tiny_sd_dir), source, ServingConfig(token_pool_size=4))
    forged = [Request("a <bespoke-token-<0>> photo", user="alice", seed=1, **STEPS), Request("<bot> <bespoke-token-<9>>", user="alice", seed=1, **STEPS)]
    out = sampler.generate_many([Request("a <bot>", user="bob", seed=1, **STEPS), *forged], return_exceptions=True)
    assert len(out[0].images) == 1
    for error in out[1:]:
        assert isinstance(error, InvalidRequest) and "reserved token" in str(error)
    assert len(sampler.generate("a <bot> and <bespoke-token-<bot>>", user="alice", seed=1, **STEPS).images) == 1  # its own token is fine


def test_a_cut_prompt_drops_the_adapters_of_the_mentions_it_cuts(sampler):
    prompt = "<rex> " + "dog " * 90 + "<cat>"
    with pytest.warns(PromptTruncatedWarning, match="dropped: .*<cat>"):
        gen = sampler.generate(prompt, user="alice", seed=1, versions={"cat": 1}, **STEPS)  # a pin of a cut mention goes too
    prov = gen.provenance[0]
    assert "<cat>" not in prov.prompt and [a["concept"] for a in prov.adapters] == ["rex"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded prompt fits: no second cut
        again = sampler.generate(**prov.generate_kwargs())
    assert same_image(again.images[0], gen.images[0])


class AnonymousSource(DictSource):
    """A source whose adapters say nothing about who they belong to (only their version)."""

    def get(self, user, concept, version="latest"):
        return replace(super().get(user, concept, version), user=None, concept=None)


class UnnumberedSource(DictSource):
    def get(self, user, concept, version="latest"):
        return replace(super().get(user, concept, version), version=None)


def test_a_source_must_number_its_versions(tiny_sd_dir, spec):
    """The version tells a new latest from the cached one; unnumbered, every latest shared one key (and slot),
    so a new one was never served while the old stayed cached."""
    source = UnnumberedSource()
    source.add(make(spec, "alice", "rex", 1, "sks", "dog"))
    sampler = Sampler(load_base(tiny_sd_dir), source)
    with pytest.raises(InvalidRequest, match="returned alice/rex without a version number"):
        sampler.generate("a <rex>", user="alice", seed=3, **STEPS)


def test_adapters_without_identity_are_served_under_the_requested_identity(tiny_sd_dir, spec):
    source = AnonymousSource()
    source.add(make(spec, "alice", "rex", 1, "sks", "dog"))
    source.add(make(spec, "bob", "fox", 2, "sks", "dog"))
    sampler = Sampler(load_base(tiny_sd_dir), source)
    requests = [Request("a <rex>", user="alice", seed=3, **STEPS), Request("a <fox>", user="bob", seed=3, **STEPS)]
    together = sampler.generate_many(requests)
    for request, gen in zip(requests, together):
        assert same_image(gen.images[0], sampler.generate_many([request])[0].images[0])
    assert not same_image(together[0].images[0], together[1].images[0])
    assert [g.provenance[0].adapters[0]["user"] for g in together] == ["alice", "bob"]
    assert together[1].provenance[0].adapters[0]["concept"] == "fox"


def test_real_registry_serves_new_versions_after_the_ttl(tiny_sd_dir, tmp_path):
    base = load_base(tiny_sd_dir)
    registry = Registry(tmp_path / "registry")
    spec = BaseSpec.from_base(base)
    alice = registry.for_user("alice")
    alice.put(random_adapter(spec, seed=1, std=0.2), base, "rex", trigger="sks", class_word="dog")
    sampler = Sampler(base, registry, ServingConfig(latest_ttl_s=0.0))
    first = sampler.generate("a photo of <rex>", user="alice", seed=1, **STEPS)
    alice.put(random_adapter(spec, seed=2, std=0.2), base, "rex", trigger="sks", class_word="dog")
    second = sampler.generate("a photo of <rex>", user="alice", seed=1, **STEPS)
    assert [first.provenance[0].adapters[0]["version"], second.provenance[0].adapters[0]["version"]] == [1, 2]
    assert np.abs(pixels(first.images[0]) - pixels(second.images[0])).mean() > 1
    with pytest.raises(UnknownConcept, match="user 'bob' has no concept <rex>; their concepts: none yet"):
        sampler.generate("a photo of <rex>", user="bob", **STEPS)


def test_benchmark_quick_mode_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--quick", "--step-smoke", "--compile", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"device", "models", "load_test"} <= result.keys()
    (model,) = result["models"].values()
    assert {"switch", "cold_load", "forward", "batch"} <= model.keys()
    assert {"speedup", "ratio_1", "ratio_2", "throughput_mixed_vs_one_user"} <= model["switch"].keys() | model["forward"].keys() | model["batch"].keys()
    assert {"p50_ms", "p95_ms", "throughput_rps", "hit_rate"} <= result["load_test"].keys()
    step = model["step"]  # off CUDA the graphs run eagerly: same outputs, nothing captured
    assert step["checks"]["captures"] == 0 and step["checks"]["graph_vs_eager_mixed"] == 0
    assert step["checks"]["graph_fused_vs_hooks"] < 1e-4 and step["checks"]["graph_slot_vs_hooks"] < 1e-4 and "diffusers_compiled_ms" not in step
    assert {"ratio_fused_1", "ratio_slot_1", "ratio_slot_2"} <= step["graphed_forward"].keys()
    assert {"step_ms", "throughput_mixed_vs_one_user"} <= step["slot"].keys()
    assert model["switch"]["ours_path"] == "bound" and model["switch"]["ours_slot_ms"] > 0  # the CPU default, and the slot path beside it
    assert "switch" in done.stdout

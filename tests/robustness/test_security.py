"""Security: no user's request ever loads another user's adapter, and nothing ever unpickles a user's file.

Isolation is checked where it could break, not only at the registry (whose own tests cover every
handle method): at the sampler (mentions, styles, pinned versions, ``generate_many`` mixing users,
the adapter cache, the shared token pool when two users' adapters bring the same new token), with
a faulty adapter source, and at the CLI. A spy on the registry's loader records whose records are
read for whose requests. Unpickling is checked by three tripwires (``no_unpickling``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from robustness_helpers import bad_inputs, refused, registry_state, short

from adapters.data import InvalidImages, load_images
from adapters.formats import detect_format, read_adapter
from adapters.registry import InvalidName, NotFound, Registry
from adapters.registry.api import UserRegistry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec, InvalidAdapter, load_safetensors, read_header
from gen.base import Base
from gen.concepts import UnknownConcept
from gen.errors import InvalidRequest
from gen.sampler import Generation, Request, Sampler
from gen.tiny import build_tiny_pipeline

STEPS = dict(steps=2, guidance_scale=5.0)


def _same(a, b) -> bool:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """alice (v1) and bob (v1, v2) own a concept named ``rex`` bringing the new token ``<rex>`` (different embeddings)."""
    pipe = build_tiny_pipeline("sd")
    twin = Base.from_pipeline(copy.deepcopy(pipe))  # the tiny tokenizer is not reproducible across builds: copy, don't rebuild
    base = Base.from_pipeline(pipe)
    spec = BaseSpec.from_base(base)
    registry = Registry(tmp_path_factory.mktemp("isolation") / "registry")
    hidden = spec.embedding_dims["text_encoder"]
    for seed, user in ((10, "alice"), (11, "bob"), (12, "bob")):
        emb = {"text_encoder": torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed))}
        adapter = replace(random_adapter(spec, seed=seed + 10, std=0.2), new_tokens=("<rex>",), token_embeddings=emb)
        registry.for_user(user).put(adapter, base, "rex", trigger="<rex>", class_word="dog")
    registry.for_user("alice").put(random_adapter(spec, seed=30, std=0.2), base, "ink", trigger="inky style")
    registry.for_user("bob").put(random_adapter(spec, seed=31, std=0.2), base, "fox", trigger="qqz", class_word="fox")
    yield Sampler(base, registry), registry, twin
    registry.close()


@pytest.fixture
def loads(monkeypatch):
    """Every registry read as (handle's user, record's user, concept, version)."""
    seen = []
    real = UserRegistry._load

    def spy(self, record):
        seen.append((self.user, record.user, record.concept, record.version))
        return real(self, record)

    monkeypatch.setattr(UserRegistry, "_load", spy)
    return seen


def test_same_concept_name_and_same_new_token_never_cross_users(world, loads, observe):
    sampler, registry, twin = world
    alice = Request("a photo of <rex> on the beach", user="alice", seed=4, **STEPS)
    bob = Request("a photo of <rex> on the beach", user="bob", seed=4, **STEPS)
    fresh = Sampler(twin, registry)  # the same base, nobody's adapter cached yet
    alice_alone = fresh.generate_many([alice])[0]
    bob_first = sampler.generate_many([bob])[0]  # bob's rex now in the cache, its token row lent
    both = sampler.generate_many([alice, bob, alice])  # one batch: both users' <rex> in it
    assert _same(both[0].images[0], alice_alone.images[0]) and _same(both[2].images[0], alice_alone.images[0])
    assert _same(both[1].images[0], bob_first.images[0])
    assert not _same(both[0].images[0], both[1].images[0])
    assert [g.provenance[0].adapters[0]["user"] for g in both] == ["alice", "bob", "alice"]
    assert [g.provenance[0].adapters[0]["version"] for g in both] == [1, 2, 1]
    assert all(handle == owner for handle, owner, _, _ in loads) and {o for _, o, _, _ in loads} == {"alice", "bob"}
    observe(
        "isolation", "alice and bob both own `<rex>`, each with a new token `<rex>` (different embeddings), in one batch, bob's cached first",
        "`Sampler.generate_many`", "each image equals that user's image served alone; every registry read is the requester's own",
        f"identical to alone; reads: {sorted(set(loads))}",
    )


def test_other_users_concepts_styles_and_versions_are_unreachable(world, loads, observe):
    sampler, registry, _ = world
    attempts = {
        "a mention of bob's `<fox>`": (lambda: sampler.generate("a <fox>", user="alice", **STEPS), UnknownConcept, r"user 'alice' has no concept <fox>; their concepts: <ink>, <rex>$"),
        "bob's `fox` as alice's style": (lambda: sampler.generate("a dog", user="alice", style="fox", **STEPS), UnknownConcept, r"has no concept <fox>"),
        "`<rex>` pinned to v2 (only bob's rex has a v2)": (lambda: sampler.generate("a <rex>", user="alice", versions={"rex": 2}, **STEPS), NotFound, r"concept 'rex' has no version or alias 2"),
        "user `Alice` (case differs)": (lambda: sampler.generate("a <rex>", user="Alice", **STEPS), UnknownConcept, r"user 'Alice' has no concept <rex>; their concepts: none yet"),
        "user `alice\\u200b` (zero-width space)": (lambda: sampler.generate("a <rex>", user="alice\u200b", **STEPS), InvalidName, r"contains '\\u200b'"),
    }
    for what, (call, exc, match) in attempts.items():
        observed = refused(call, exc, match)
        observe("isolation", what, "`Sampler.generate(user='alice')`", f"refused ({exc.__name__}); nothing of bob's is read or named", short(observed))
    assert all(owner != "bob" for _, owner, _, _ in loads)
    results = sampler.generate_many([Request("a <fox>", user="alice", **STEPS), Request("a <fox>", user="bob", **STEPS)], return_exceptions=True)
    assert isinstance(results[0], UnknownConcept) and isinstance(results[1], Generation)
    observe("isolation", "`<fox>` asked by alice and by bob in one `generate_many`", "`Sampler.generate_many(return_exceptions=True)`", "alice refused, bob served", "alice: UnknownConcept; bob: served")


def test_no_prompt_can_build_a_token_placeholder_to_reach_another_users_row(world, observe):
    """Placeholders are refused as typed, and also when text and a mention join into one: carol's concept
    ``0`` (no trigger) reads "0", so ``<bespoke-token-<0>>`` would expand to row 0 of the shared token pool."""
    sampler, registry, twin = world
    registry.for_user("carol").put(random_adapter(BaseSpec.from_base(twin), seed=40, std=0.2), twin, "0")
    bob = Request("a photo of <rex>", user="bob", seed=4, **STEPS)
    forged = Request("a <bespoke-token-<0>> photo", user="carol", seed=4, **STEPS)
    bob_alone = sampler.generate_many([bob])[0]  # bob's <rex> holds a row of the pool
    results = sampler.generate_many([forged, bob], return_exceptions=True)
    assert isinstance(results[0], InvalidRequest) and "reserved token" in str(results[0])
    assert _same(results[1].images[0], bob_alone.images[0])
    observe(
        "isolation", "`a <bespoke-token-<0>> photo` from carol, who owns a concept `0` without trigger, batched with bob's `<rex>`",
        "`Sampler.generate_many(return_exceptions=True)`", "carol refused alone (the expansion names a reserved token); bob served as alone",
        f"carol: {short(str(results[0]), 90)}; bob: identical to alone",
    )


def test_a_faulty_source_cannot_hand_over_another_users_adapter(world, observe):
    _, registry, _ = world

    class Leaky:
        """A broken source that ignores the user it is asked for."""

        def get(self, user, concept, version="latest"):
            return registry.get("bob", concept, version)

        def concepts(self, user):
            return registry.concepts("bob")

    sampler = Sampler(Base.from_pipeline(build_tiny_pipeline("sd")), Leaky())
    observed = refused(lambda: sampler.generate("a <fox>", user="alice", **STEPS), InvalidRequest, r"returned bob/fox v1 for user 'alice'; another user's adapter is never served")
    observe("isolation", "an AdapterSource that returns bob's adapter for alice", "`Sampler.generate`", "refused by the sampler itself", short(observed))


def test_cli_never_shows_or_exports_another_users_adapter(world, tmp_path, capsys, observe):
    from demo.cli import main

    _, registry, _ = world
    root = str(registry.root)
    for argv, what in (
        (["registry", "show", "alice", "fox"], "`bespoke registry show alice fox`"),
        (["registry", "export", "alice", "fox", str(tmp_path / "out")], "`bespoke registry export alice fox OUT`"),
        (["registry", "history", "alice", "fox"], "`bespoke registry history alice fox`"),
        (["registry", "delete", "alice", "fox", "--force"], "`bespoke registry delete alice fox --force`"),
    ):
        before = registry_state(registry.root)
        code = main([*argv, "--registry", root])
        err = capsys.readouterr().err
        assert code == 2 and "user 'alice' has no concept 'fox'" in err and registry_state(registry.root) == before
        observe("isolation", "bob's `fox` through alice's CLI commands", what, "exit 2, 'no concept' (as for one that does not exist); nothing changed", f"exit {code}: {short(err.strip(), 90)}")
    assert not (tmp_path / "out").exists()
    assert main(["registry", "list", "alice", "--json", "--registry", root]) == 0
    listed = capsys.readouterr().out
    assert '"user": "bob"' not in listed and '"concept": "fox"' not in listed
    observe("isolation", "alice lists her adapters", "`bespoke registry list alice`", "only alice's records", "only alice's records")


# --- nothing unpickles ------------------------------------------------------------------------------

PICKLES = ["pickled.bin", "pickled.ckpt", "pickle_in_disguise.safetensors", "torch_zip.safetensors"]


@pytest.mark.parametrize("name", PICKLES)
def test_pickles_are_never_unpickled_by_any_loader(corpus, sd, populated, name, observe, no_unpickling):
    base, spec = sd
    path = corpus / "adapters" / name
    loaders = {
        "adapters.validate.read_header": lambda: read_header(path),
        "adapters.validate.load_safetensors": lambda: load_safetensors(path),
        "adapters.formats.detect_format": lambda: detect_format(path),
        "adapters.formats.read_adapter": lambda: read_adapter(path, spec),
        "registry `put(path)`": lambda: populated.for_user("carol").put(path, base, "x"),
    }
    for entry, load in loaders.items():
        observed = refused(load, InvalidAdapter, r"pickle|zip")
        observe("no unpickling", f"`{name}`: {bad_inputs.adapter_cases(corpus)[name].what}", entry, "refused unopened; no unpickler runs, no code runs", short(observed, 110))
    photo = corpus / "images" / "pickle.png"
    observed = refused(lambda: load_images([photo]), InvalidImages, r"is a pickle file")
    if name == PICKLES[0]:
        observe("no unpickling", "`pickle.png`: a pickle named like a photo", "adapters.data.load_images", "refused; PIL never unpickles", short(observed, 110))

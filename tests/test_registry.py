"""The registry's operations, refusals, user isolation and crash safety (single process)."""

from __future__ import annotations

import os
import pickle
import stat
import unicodedata

import pytest
import torch

from adapters.formats import lora_delta, read_bespoke_metadata
from adapters.registry import (
    DamagedAdapter,
    InvalidName,
    InvalidRecord,
    NotFound,
    Registry,
    RegistryError,
    default_root,
)
from adapters.registry.errors import StorageError
from adapters.registry.index import _SqliteTxn
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseMismatch, BaseSpec, InvalidAdapter, UnsafeFile, read_header
from gen.adapter import AdapterSource, LoraAdapter
from gen.base import Base
from gen.tiny import build_tiny_pipeline

HASH = "ab" * 32


@pytest.fixture(scope="module")
def sd() -> tuple[Base, BaseSpec]:
    base = Base.from_pipeline(build_tiny_pipeline("sd"))
    return base, BaseSpec.from_base(base)


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "reg") as registry:
        yield registry


def same_tensors(a: LoraAdapter, b: LoraAdapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# --- put / get ------------------------------------------------------------------------------------


def test_put_then_get_returns_the_adapter_with_identity(reg, sd):
    base, spec = sd
    adapter = random_adapter(spec, alpha=8)
    record = reg.for_user("alice").put(
        adapter, base, "rex", trigger="sks", class_word="dog", training_config={"steps": 400, "lr": 1e-4},
        data_fingerprints=[HASH], metrics={"fidelity": 0.8}, tags=["dogs"],
    )
    assert (record.user, record.concept, record.version, record.aliases) == ("alice", "rex", 1, ("latest",))
    assert (record.rank, record.alpha, record.dtype, record.format) == (4, 8.0, "float32", "bespoke")
    assert record.base_fingerprint == base.fingerprint and record.size_bytes > 0
    assert record.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert record.training_config == {"steps": 400, "lr": 1e-4} and record.data_fingerprints == (HASH,)

    got = reg.for_user("alice").get("rex")
    assert (got.user, got.concept, got.version) == ("alice", "rex", 1)
    assert (got.trigger, got.class_word, got.rank, got.alpha) == ("sks", "dog", 4, 8.0)
    assert same_tensors(adapter, got)
    assert reg.for_user("alice").record("rex") == record


def test_blob_is_content_addressed_and_its_header_describes_it(reg, sd):
    base, spec = sd
    record = reg.for_user("alice").put(random_adapter(spec), base, "rex")
    path = reg.blobs.path(record.sha256)
    assert path == reg.root / "blobs" / record.sha256[:2] / f"{record.sha256}.safetensors"
    fields = read_bespoke_metadata(read_header(path).metadata)
    assert fields["user"] == "alice" and fields["concept"] == "rex" and fields["alpha"] == 8.0
    assert "lora_adapter_metadata" in read_header(path).metadata


def test_versions_are_monotonic_and_latest_follows(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    for seed in range(3):
        assert alice.put(random_adapter(spec, seed=seed), base, "rex").version == seed + 1
    assert alice.get("rex").version == 3
    assert alice.get("rex", 2).version == 2 and alice.get("rex", "2").version == 2
    assert same_tensors(alice.get("rex", 1), random_adapter(spec, seed=0))


def test_put_from_files_of_each_format(reg, sd, tmp_path):
    base, spec = sd
    alice = reg.for_user("alice")
    adapter = random_adapter(spec, alpha=2.5)
    alice.put(adapter, base, "rex")
    for fmt, out in [("diffusers", tmp_path / "d"), ("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors")]:
        record = alice.put(alice.export("rex", out, fmt), base, f"rex_{fmt}")
        assert record.format == fmt and record.alpha == 2.5
        assert same_tensors(alice.get(f"rex_{fmt}"), adapter)


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_alpha_not_rank_keeps_its_effect_through_put_get_export_import(reg, sd, tmp_path, fmt):
    base, spec = sd
    adapter = random_adapter(spec, rank=4, alpha=13.0)
    alice = reg.for_user("alice")
    alice.put(adapter, base, "rex")
    out = alice.export("rex", tmp_path / ("x.safetensors" if fmt == "kohya" else "x"), fmt)
    alice.put(out, base, "again")
    back = alice.get("again")
    for key in adapter.tensors:
        module = key.rsplit(".lora_", 1)[0]
        torch.testing.assert_close(lora_delta(back, module), lora_delta(adapter, module))


def test_import_refuses_pickles_without_running_them(reg, sd, tmp_path):
    base, _ = sd
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFile):
        reg.for_user("alice").put(path, base, "rex")
    assert not marker.exists() and reg.for_user("alice").list() == []


def test_put_refuses_an_adapter_for_another_base(reg, sd):
    base, _ = sd
    xl = BaseSpec.from_base(Base.from_pipeline(build_tiny_pipeline("sdxl")))
    with pytest.raises(BaseMismatch):
        reg.for_user("alice").put(random_adapter(xl), base, "rex")
    bad = random_adapter(sd[1])
    bad.tensors[next(iter(bad.tensors))] = torch.full_like(next(iter(bad.tensors.values())), float("nan"))
    with pytest.raises(InvalidAdapter, match="NaN"):
        reg.for_user("alice").put(bad, base, "rex")
    assert reg.for_user("alice").list() == []


def test_put_needs_a_concept(reg, sd):
    with pytest.raises(RegistryError, match="no concept"):
        reg.for_user("alice").put(random_adapter(sd[1]), sd[0])
    adapter = random_adapter(sd[1])
    adapter.concept = "named"
    assert reg.for_user("alice").put(adapter, sd[0]).concept == "named"


@pytest.mark.parametrize("kwargs, match", [
    ({"training_config": {"x": object()}}, "JSON-serializable"),
    ({"training_config": {"lr": float("nan")}}, "finite"),
    ({"data_fingerprints": ["/home/alice/photos/1.jpg"]}, "hex digest"),
    ({"data_fingerprints": HASH}, "single string"),
    ({"metrics": {"fid": float("inf")}}, "finite number"),
    ({"tags": ["a/b"]}, "tag name"),
    ({"parent_version": 0}, "positive integer"),
    ({"parent_version": 2**63}, "below 2\\*\\*63"),  # beyond SQLite's integers
    ({"metrics": {"steps": 10**400}}, "finite number"),  # beyond any float: math.isfinite overflows
    ({"training_config": ["lr", 1]}, "must be a mapping"),
])
def test_record_field_refusals(reg, sd, kwargs, match):
    with pytest.raises((InvalidRecord, InvalidName), match=match):
        reg.for_user("alice").put(random_adapter(sd[1]), sd[0], "rex", **kwargs)


@pytest.mark.parametrize("version", [2**63, "99999999999999999999", "\u00b2", "\u2460"])
def test_versions_beyond_sqlite_or_in_other_scripts_digits_are_simply_not_found(reg, sd, version):
    """str.isdigit() takes "²" and "①", which int() refuses; SQLite refuses integers from 2**63."""
    alice = reg.for_user("alice")
    alice.put(random_adapter(sd[1]), sd[0], "rex")
    for call in (lambda: alice.get("rex", version), lambda: alice.record("rex", version), lambda: alice.set_alias("rex", "prod", version)):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(NotFound):
        alice.delete("rex", version)
    assert [r.version for r in alice.history("rex")] == [1]


def test_huge_finite_weights_are_not_called_damaged(reg, sd):
    """A float32 sum of weights near 3e38 overflows to infinity: only NaN or infinity in the weights is damage."""
    from dataclasses import replace

    alice = reg.for_user("alice")
    adapter = random_adapter(sd[1])
    key = next(iter(adapter.tensors))
    alice.put(replace(adapter, tensors={**adapter.tensors, key: torch.full_like(adapter.tensors[key], 3e38)}), sd[0], "big")
    assert float(alice.get("big").tensors[key].min()) == pytest.approx(3e38)


def test_an_index_from_a_newer_version_is_refused_not_written(tmp_path, sd):
    import sqlite3

    Registry(tmp_path / "reg").close()
    with sqlite3.connect(tmp_path / "reg" / "index.sqlite") as conn:
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(StorageError, match="schema v7, newer than this version reads"):
        Registry(tmp_path / "reg")


def test_parent_version_must_exist(reg, sd):
    alice = reg.for_user("alice")
    with pytest.raises(NotFound, match="parent version 1"):
        alice.put(random_adapter(sd[1]), sd[0], "rex", parent_version=1)
    alice.put(random_adapter(sd[1]), sd[0], "rex")
    assert alice.put(random_adapter(sd[1], seed=1), sd[0], "rex", parent_version=1).parent_version == 1


# --- list / history / aliases / rollback ------------------------------------------------------------


def test_list_history_and_filters(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    alice.put(random_adapter(spec), base, "rex", tags=["dogs", "prod-ready"])
    alice.put(random_adapter(spec, seed=1), base, "rex", tags=["dogs"])
    alice.put(random_adapter(spec, seed=2), base, "mug")
    assert [(r.concept, r.version) for r in alice.list()] == [("mug", 1), ("rex", 1), ("rex", 2)]
    assert [r.version for r in alice.list(concept="rex")] == [1, 2]
    assert [(r.concept, r.version) for r in alice.list(tag="dogs")] == [("rex", 1), ("rex", 2)]
    assert [r.version for r in alice.list(tag="prod-ready")] == [1]
    assert [r.version for r in alice.history("rex")] == [2, 1]
    assert alice.concepts() == ["mug", "rex"] == reg.concepts("alice")
    with pytest.raises(NotFound, match="no concept 'dog'"):
        alice.history("dog")


def test_aliases(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    alice.put(random_adapter(spec), base, "rex", aliases=["prod"])
    alice.put(random_adapter(spec, seed=1), base, "rex")
    assert alice.get("rex", "prod").version == 1
    assert alice.set_alias("rex", "prod", 2).aliases == ("latest", "prod")
    assert alice.get("rex", "prod").version == 2
    alice.set_alias("rex", "canary", "prod")
    assert alice.get("rex", "canary").version == 2
    alice.remove_alias("rex", "canary")
    with pytest.raises(NotFound, match="no version or alias 'canary'"):
        alice.get("rex", "canary")
    with pytest.raises(NotFound):
        alice.set_alias("rex", "prod", 9)
    with pytest.raises(InvalidName, match="maintained by the registry"):
        alice.set_alias("rex", "latest", 1)
    with pytest.raises(InvalidName, match="is a number"):
        alice.set_alias("rex", "42", 1)


def test_rollback_latest_republishes_the_old_blob(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    v1 = alice.put(random_adapter(spec), base, "rex")
    alice.put(random_adapter(spec, seed=1), base, "rex")
    rolled = alice.rollback("rex")
    assert (rolled.version, rolled.parent_version, rolled.sha256) == (3, 1, v1.sha256)
    assert alice.get("rex").version == 3 and same_tensors(alice.get("rex"), random_adapter(spec))
    assert [r.version for r in alice.history("rex")] == [3, 2, 1]
    assert alice.rollback("rex", to_version=2).version == 4
    with pytest.raises(RegistryError, match="not a healthy version before"):
        alice.rollback("rex", to_version=4)


def test_rollback_of_an_alias_moves_it(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    alice.put(random_adapter(spec), base, "rex")
    alice.put(random_adapter(spec, seed=1), base, "rex", aliases=["prod"])
    assert alice.rollback("rex", alias="prod").version == 1
    assert alice.get("rex", "prod").version == 1 and alice.get("rex").version == 2
    with pytest.raises(RegistryError, match="no healthy version before v1"):
        alice.rollback("rex", alias="prod")


# --- delete and garbage collection ----------------------------------------------------------------


def test_delete_version_and_concept_collects_unused_blobs(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    v1 = alice.put(random_adapter(spec), base, "rex")
    v2 = alice.put(random_adapter(spec, seed=1), base, "rex")
    alice.rollback("rex", to_version=1)  # v3 shares v1's blob
    assert alice.delete("rex", 1) == [1]
    assert reg.blobs.exists(v1.sha256)  # still used by v3
    assert alice.delete("rex", 3) == [3]
    assert not reg.blobs.exists(v1.sha256) and reg.blobs.exists(v2.sha256)
    assert alice.put(random_adapter(spec), base, "rex").version == 4  # numbers are never reused
    assert alice.delete("rex") == [2, 4]
    assert alice.list() == [] and list(reg.blobs.iter_blobs()) == []
    assert alice.put(random_adapter(spec), base, "rex").version == 5
    with pytest.raises(NotFound):
        alice.delete("rex", 2)


def test_delete_refuses_aliased_versions_unless_forced(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    alice.put(random_adapter(spec), base, "rex", aliases=["prod"])
    with pytest.raises(RegistryError, match="aliased as 'prod'"):
        alice.delete("rex", "prod")
    with pytest.raises(RegistryError, match="aliased as 'prod'"):
        alice.delete("rex")
    assert alice.delete("rex", force=True) == [1]
    assert alice.list() == []


# --- names and isolation --------------------------------------------------------------------------

BAD_NAMES = ["../x", "/abs", "a/b", "a\\b", "a\0b", "", "x" * 300, ".hidden", "-flag", "a b", "a\nb", "café/x"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_everywhere(reg, sd, bad):
    base, spec = sd
    with pytest.raises(InvalidName, match="user name"):
        reg.for_user(bad)
    with pytest.raises(InvalidName, match="user name"):
        reg.get(bad, "rex")
    alice = reg.for_user("alice")
    with pytest.raises(InvalidName, match="concept name"):
        alice.put(random_adapter(spec), base, bad)
    with pytest.raises(InvalidName, match="tag name"):
        alice.put(random_adapter(spec), base, "rex", tags=[bad])
    with pytest.raises(InvalidName, match="alias name"):
        alice.put(random_adapter(spec), base, "rex", aliases=[bad])
    with pytest.raises(InvalidName):
        alice.get(bad)
    assert alice.list() == []


def test_names_are_nfc_normalized(reg, sd):
    base, spec = sd
    decomposed, composed = unicodedata.normalize("NFD", "café"), "café"
    assert decomposed != composed
    reg.for_user("zoë").put(random_adapter(spec), base, decomposed)
    assert reg.for_user(unicodedata.normalize("NFD", "zoë")).concepts() == [composed]
    assert reg.get("zoë", composed).concept == composed
    assert reg.for_user("東京").put(random_adapter(spec), base, "犬").concept == "犬"


def test_users_are_isolated(reg, sd, tmp_path):
    base, spec = sd
    alice, bob = reg.for_user("alice"), reg.for_user("bob")
    bob_v1 = bob.put(random_adapter(spec, seed=7), base, "rex", aliases=["prod"])

    assert alice.list() == [] and alice.concepts() == [] and alice.list(concept="rex") == []
    for attempt in (
        lambda: alice.get("rex"), lambda: alice.get("rex", 1), lambda: alice.get("rex", "prod"),
        lambda: alice.record("rex"), lambda: alice.history("rex"), lambda: alice.delete("rex", force=True),
        lambda: alice.set_alias("rex", "prod", 1), lambda: alice.remove_alias("rex", "prod"),
        lambda: alice.rollback("rex"), lambda: alice.export("rex", tmp_path / "out"),
        lambda: alice.put(random_adapter(spec), base, "rex", parent_version=1),
    ):
        with pytest.raises(NotFound):
            attempt()
    # alice's own "rex" is hers alone: a separate history that starts at 1.
    assert alice.put(random_adapter(spec), base, "rex").version == 1
    alice.delete("rex")
    assert [r.version for r in bob.history("rex")] == [1] and same_tensors(bob.get("rex"), random_adapter(spec, seed=7))
    assert reg.blobs.exists(bob_v1.sha256) and not (tmp_path / "out").exists()


def test_registry_is_an_adapter_source(reg, sd):
    base, spec = sd
    assert isinstance(reg, AdapterSource)
    reg.for_user("alice").put(random_adapter(spec), base, "rex")
    assert reg.get("alice", "rex", "latest").version == 1 and reg.concepts("alice") == ["rex"]
    with pytest.raises(NotFound):
        reg.get("bob", "rex")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("BESPOKE_REGISTRY", raising=False)
    assert default_root() == tmp_path / "home" / "registry"  # conftest points BESPOKE_HOME here
    monkeypatch.setenv("BESPOKE_REGISTRY", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    with Registry() as registry:
        assert registry.root == tmp_path / "elsewhere" and (registry.root / "index.sqlite").is_file()
    with Registry(tmp_path / "explicit") as registry:
        assert registry.root == tmp_path / "explicit"


# --- verify and crash safety ------------------------------------------------------------------------


def _corrupt(path) -> None:
    os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_quarantines_damaged_blobs_and_marks_their_records(reg, sd):
    base, spec = sd
    alice = reg.for_user("alice")
    good = alice.put(random_adapter(spec), base, "rex")
    bad = alice.put(random_adapter(spec, seed=1), base, "mug")
    assert reg.verify().ok
    _corrupt(reg.blobs.path(bad.sha256))

    report = reg.verify()
    assert not report.ok and report.quarantined == [bad.sha256]
    assert report.damaged_records == [("alice", "mug", 1, "blob content does not match its sha256")]
    assert not reg.blobs.exists(bad.sha256) and len(list((reg.root / "quarantine").iterdir())) == 1
    assert alice.record("mug").damaged == "blob content does not match its sha256"
    with pytest.raises(DamagedAdapter, match="damaged"):
        alice.get("mug")
    assert alice.get("rex").version == good.version
    assert not reg.verify().ok  # stays reported until dealt with
    alice.delete("mug")
    assert reg.verify().ok


def test_verify_reports_a_missing_blob(reg, sd):
    base, spec = sd
    record = reg.for_user("alice").put(random_adapter(spec), base, "rex")
    os.remove(reg.blobs.path(record.sha256))
    with pytest.raises(DamagedAdapter, match="cannot read the blob"):
        reg.for_user("alice").get("rex")
    report = reg.verify()
    assert report.damaged_records == [("alice", "rex", 1, "blob is missing")]


def test_crash_between_blob_and_commit_leaves_old_state(reg, sd, monkeypatch):
    base, spec = sd
    alice = reg.for_user("alice")
    alice.put(random_adapter(spec), base, "rex")

    def crash(self, record):
        raise KeyboardInterrupt("simulated crash after the blob was written")

    monkeypatch.setattr(_SqliteTxn, "insert", crash)
    with pytest.raises(KeyboardInterrupt):
        alice.put(random_adapter(spec, seed=1), base, "rex")
    monkeypatch.undo()
    assert [r.version for r in alice.list()] == [1]  # the counter bump rolled back too
    assert len(list(reg.blobs.iter_blobs())) == 2  # an orphan blob
    report = reg.verify()
    assert report.ok and report.orphans_removed == 1
    assert alice.put(random_adapter(spec, seed=1), base, "rex").version == 2


def test_crash_while_writing_a_blob_leaves_no_visible_trace(reg, sd, monkeypatch):
    base, spec = sd
    alice = reg.for_user("alice")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("adapters.registry.blobs.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        alice.put(random_adapter(spec), base, "rex")
    monkeypatch.undo()
    assert alice.list() == [] and list(reg.blobs.iter_blobs()) == [] and list(reg.blobs.tmp_dir.iterdir()) == []
    (reg.blobs.tmp_dir / "deadbeef.part").write_bytes(b"half a blob")  # as a SIGKILL would leave it
    report = reg.verify()
    assert report.ok and report.temp_files_removed == 1


@pytest.mark.parametrize("version", ["-1", "+0", -1])
def test_a_negative_version_is_named_as_a_version(reg, sd, version):
    """"-1" was taken for an alias and refused for its leading "-", which said nothing about versions."""
    alice = reg.for_user("alice")
    alice.put(random_adapter(sd[1]), sd[0], "rex")
    with pytest.raises(NotFound, match="versions start at 1"):
        alice.get("rex", version)

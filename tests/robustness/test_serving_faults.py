"""A damaged adapter blob while serving: that request fails with a clear error, everyone else is served.

Damage kinds: a truncated blob, a garbled header, NaN written into the tensor data, a deleted blob,
and a blob replaced by a pickle. In one ``generate_many`` call with ``return_exceptions=True`` the
damaged request gets a ``DamagedAdapter`` in its place and the other users' images are exactly
what they get alone; without it the error is raised before anything runs. ``verify`` then finds
each damaged blob, quarantines it and marks the record, and serving still goes on.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
from robustness_helpers import refused, short

from adapters.registry import DamagedAdapter, Registry
from adapters.registry.synthetic import random_adapter
from gen.base import Base
from gen.sampler import Generation, Request, Sampler
from gen.tiny import build_tiny_pipeline

STEPS = dict(steps=2, guidance_scale=5.0)
ALICE = Request("a photo of <rex>", user="alice", seed=1, **STEPS)
BOB = Request("a <fox:0.8> in the grass", user="bob", seed=2, **STEPS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with alice's and bob's adapters, a sampler over it, and their images served alone."""
    base = Base.from_pipeline(build_tiny_pipeline("sd"))
    registry = Registry(tmp_path_factory.mktemp("serving") / "registry")
    registry.for_user("alice").put(random_adapter_for(base, 1), base, "rex", trigger="sks", class_word="dog")
    registry.for_user("bob").put(random_adapter_for(base, 2), base, "fox", trigger="qqz", class_word="fox")
    sampler = Sampler(base, registry)
    alone = {r.user: sampler.generate_many([r])[0].images[0] for r in (ALICE, BOB)}
    yield base, registry, sampler, alone
    registry.close()


def random_adapter_for(base, seed):
    from adapters.validate import BaseSpec

    return random_adapter(BaseSpec.from_base(base), seed=seed, std=0.2)


def _raise(error: BaseException):
    raise error


def _writable(path):
    os.chmod(path, 0o644)
    return path


def _truncate(path):
    data = _writable(path).read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _garble_header(path):
    data = bytearray(_writable(path).read_bytes())
    data[8:72] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _nan_in_data(path):
    """Overwrite the first tensor's first value with NaN: the file still parses, its values are wrong."""
    data = bytearray(_writable(path).read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    first = min((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    start = 8 + header_len + first["data_offsets"][0]
    data[start : start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


def _delete(path):
    path.unlink()


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle(path, corpus):
    _writable(path).write_bytes(pickle.dumps({"w": _Exploit(corpus / "UNPICKLED")}))


DAMAGE = {
    "truncated": (_truncate, "the blob lost its last 100 bytes", r"cannot read the blob of 'mug_truncated' v1"),
    "garbled_header": (_garble_header, "64 bytes of the header overwritten", r"cannot read the blob of 'mug_garbled_header' v1"),
    "nan_in_data": (_nan_in_data, "a NaN written into the tensor data", r"holds NaN or infinite values"),
    "deleted": (_delete, "the blob file deleted", r"cannot read the blob of 'mug_deleted' v1"),
    "pickle": (None, "the blob replaced by a pickle whose __reduce__ runs os.mkdir", r"cannot read the blob of 'mug_pickle' v1"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_one_damaged_blob_fails_only_its_request(served, kind, corpus, observe, no_unpickling):
    base, registry, sampler, alone = served
    concept = f"mug_{kind}"
    record = registry.for_user("carol").put(random_adapter_for(base, 3), base, concept, trigger="vvk", class_word="mug")
    damage, what, match = DAMAGE[kind]
    path = registry.blobs.path(record.sha256)
    damage(path) if damage is not None else _pickle(path, corpus)
    carol = Request(f"a red <{concept}>", user="carol", seed=3, **STEPS)

    results = sampler.generate_many([ALICE, carol, BOB], return_exceptions=True)
    assert isinstance(results[0], Generation) and isinstance(results[2], Generation)
    assert isinstance(results[1], DamagedAdapter) and "run `bespoke registry verify`" in str(results[1])
    observed = refused(lambda: _raise(results[1]), DamagedAdapter, match)
    for request, result in ((ALICE, results[0]), (BOB, results[2])):
        assert result.provenance[0].user == request.user
        assert np.abs(np.asarray(result.images[0], np.int16) - np.asarray(alone[request.user], np.int16)).max() <= 1
    with pytest.raises(DamagedAdapter):  # without return_exceptions the failure is raised, before anything runs
        sampler.generate_many([ALICE, carol])
    assert not sampler._pending  # nothing left queued behind it
    observe(
        "serving", f"carol's blob damaged: {what}", "`Sampler.generate_many([alice, carol, bob], return_exceptions=True)`",
        "carol's request fails with DamagedAdapter; alice's and bob's images equal their images served alone",
        f"{short(observed, 120)}; the other two: identical to alone",
    )

    report = registry.verify()
    assert record.sha256 in report.quarantined or kind == "deleted"
    reason = next(why for user, c, v, why in report.damaged_records if (user, c) == ("carol", concept))
    assert registry.for_user("carol").record(concept).damaged == reason
    after = sampler.generate_many([ALICE, carol], return_exceptions=True)
    assert isinstance(after[0], Generation) and isinstance(after[1], DamagedAdapter) and "is damaged" in str(after[1])
    observe(
        "registry verify", f"carol's blob damaged: {what}", "`Registry.verify()`",
        "finds it, quarantines the blob, marks the record; serving goes on", f"damaged record: {short(reason, 70)}; next request: {short(str(after[1]), 70)}",
    )

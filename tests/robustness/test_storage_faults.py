"""The registry's storage failing under it: a locked index, a full disk, a read-only root.

Each gives a registry error naming the cause (``RegistryBusy`` or ``StorageError``, the latter also
an ``OSError``) within a bounded time, and leaves the registry exactly as it was: no record, no
blob, no temp file, and every other user's adapters still readable.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from robustness_helpers import refused, registry_state, short

from adapters.registry import Registry
from adapters.registry.errors import RegistryBusy, StorageError
from adapters.registry.synthetic import random_adapter

NOBODY = 65534


def test_locked_index_gives_a_bounded_wait_then_a_clear_error(populated, sd, observe):
    base, spec = sd
    before = registry_state(populated.root)
    impatient = Registry(populated.root, busy_timeout_s=0.3)
    holder = sqlite3.connect(populated.root / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, holding the lock
    try:
        started = time.monotonic()
        observed = refused(lambda: impatient.for_user("carol").put(random_adapter(spec), base, "rex"), RegistryBusy, r"locked by another process \(waited 0.3 s\)")
        waited = time.monotonic() - started
        assert 0.25 <= waited < 5
        assert impatient.for_user("alice").get("rex").version == 1  # WAL: readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert registry_state(populated.root) == before
    assert impatient.for_user("carol").put(random_adapter(spec), base, "rex").version == 1  # and it works once released
    impatient.close()
    observe(
        "storage", "index locked by another connection (BEGIN EXCLUSIVE)", "registry `put`",
        "waits the busy timeout, then RegistryBusy; reads go on; nothing written",
        f"{short(observed, 220)} after {waited:.2f} s; reads served; registry unchanged",
    )


def test_full_disk_while_writing_a_blob(populated, sd, monkeypatch, observe):
    base, spec = sd
    before = registry_state(populated.root)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("adapters.registry.blobs.os.fsync", no_space)
    with pytest.raises(OSError):  # a StorageError is an OSError too, for generic handlers
        populated.for_user("carol").put(random_adapter(spec), base, "rex")
    observed = refused(lambda: populated.for_user("carol").put(random_adapter(spec), base, "rex"), StorageError, r"No space left on device\); nothing was stored")
    monkeypatch.undo()
    assert registry_state(populated.root) == before  # the temp file is gone, no record, no blob
    assert populated.get("bob", "rex").version == 1
    observe("storage", "disk full (ENOSPC) while the blob is written", "registry `put`", "StorageError; no temp file, blob or record", f"{short(observed, 220)}; registry unchanged")


def test_full_disk_when_the_record_commits(populated, sd, observe):
    base, spec = sd
    before = registry_state(populated.root)
    conn = populated.index._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own way to run out of space
    try:
        big = {"notes": "x" * (200 << 10)}  # needs new pages
        observed = refused(
            lambda: populated.for_user("carol").put(random_adapter(spec), base, "rex", training_config=big), StorageError, r"is full .*nothing was stored"
        )
    finally:
        conn.execute("PRAGMA max_page_count = 1073741823")
    assert registry_state(populated.root) == before  # the blob written before the commit was removed again
    observe(
        "storage", "disk full when the index commits (SQLite max_page_count)", "registry `put`",
        "StorageError; transaction rolled back; the blob written for it removed", f"{short(observed, 220)}; registry unchanged",
    )


def test_full_disk_during_export_leaves_no_partial_file(populated, tmp_path, monkeypatch, observe):
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    out = tmp_path / "export"
    observed = refused(lambda: populated.for_user("alice").export("rex", out), StorageError, r"No space left on device")
    monkeypatch.undo()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    observe("storage", "disk full during an export (half the file written)", "registry `export`", "StorageError; no partial file left", f"{short(observed, 220)}; no file left")


@contextmanager
def _read_only(root: Path):
    """Make ``root`` read-only for this process for real: as root, by dropping to ``nobody`` (root ignores modes)."""
    as_root = os.geteuid() == 0
    paths = [root, *root.rglob("*")]
    if as_root:
        for p in paths:
            os.chown(p, NOBODY, NOBODY)
    for p in paths:
        os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~0o222)
    try:
        if as_root:
            os.seteuid(NOBODY)
        try:
            yield
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        for p in paths:
            os.chmod(p, stat.S_IMODE(p.stat().st_mode) | 0o200)


def test_read_only_root(sd, observe):
    base, spec = sd
    top = Path(tempfile.mkdtemp(prefix="bespoke-ro-"))  # not under pytest's 0700 temp dir, so `nobody` can reach it
    try:
        os.chmod(top, 0o755)
        with Registry(top / "registry") as registry:
            registry.for_user("alice").put(random_adapter(spec), base, "rex")
        before = registry_state(top / "registry")
        try:
            with _read_only(top):
                try:
                    registry = Registry(top / "registry")
                except StorageError as e:  # SQLite could not open the WAL index read-only
                    opened, wrote = f"StorageError on open: {e}", None
                else:
                    with registry:
                        assert registry.for_user("alice").get("rex").version == 1  # reads still served
                        wrote = refused(lambda: registry.for_user("alice").put(random_adapter(spec, seed=1), base, "rex"), StorageError, r"read-only|Permission denied")
                        opened = "opened; reads served"
                created = refused(lambda: Registry(top / "elsewhere"), StorageError, r"cannot create the registry folder .*Permission denied")
        except PermissionError as e:  # seteuid refused (no CAP_SETUID): say so rather than pass
            pytest.skip(f"cannot drop privileges to test a read-only root: {e}")
        assert registry_state(top / "registry") == before and not (top / "elsewhere").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)
    observed = opened if wrote is None else f"{opened}; put: {wrote}"
    observe(
        "storage", "read-only registry root (real file modes; as root, checked as `nobody`)", "`Registry(root)`, `get`, `put`",
        "reads served (or StorageError on open if SQLite cannot read it read-only); writes: StorageError; nothing changed", short(observed, 220),
    )
    observe("storage", "registry root to be created under a read-only folder", "`Registry(root)`", "StorageError naming the cause", short(created))

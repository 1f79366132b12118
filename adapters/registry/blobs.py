"""Content-addressed blob storage: ``blobs/<sha256[:2]>/<sha256>.safetensors``.

The registry only talks to :class:`BlobStore`, so the same code can later sit on an object
store (any fsspec filesystem) instead of :class:`LocalBlobStore`.

Local writes are crash-safe: the bytes go to a temp file in ``tmp/`` on the same filesystem,
are fsynced, renamed into place, and the shard directory is fsynced, so after a crash a blob
is either complete under its name or absent. The registry writes blobs while holding the
index's write lock, so any temp file or unreferenced blob seen under that lock is debris from
a crash and safe to remove.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

_SHA256 = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".safetensors"


class BlobStore(Protocol):
    """Where adapter files live, addressed by the sha256 of their bytes."""

    def put(self, sha256: str, data: bytes) -> None:
        """Store ``data`` durably under ``sha256``; a no-op when it is already there."""

    def open(self, sha256: str) -> BinaryIO: ...

    def path(self, sha256: str) -> Path:
        """A local file holding the blob, for memory-mapping (a remote store would return a cached copy)."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...

    def iter_blobs(self) -> Iterator[str]:
        """Every stored blob's sha256."""

    def quarantine(self, sha256: str) -> Path:
        """Move a damaged blob out of the way (kept for inspection); returns where it went."""

    def clean_temp(self) -> int:
        """Remove leftovers of interrupted writes; returns how many. Call only under the write lock."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """Blobs in a local folder (``root/blobs``), temp files in ``root/tmp``, quarantine in ``root/quarantine``."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (self.blob_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.blob_dir / sha256[:2] / f"{sha256}{SUFFIX}"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def put(self, sha256: str, data: bytes) -> None:
        final = self.path(sha256)
        if final.is_file():
            return
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self.blob_dir)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{sha256[:16]}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)  # blobs are immutable; guard against accidental edits
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def delete(self, sha256: str) -> None:
        path = self.path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def iter_blobs(self) -> Iterator[str]:
        for path in self.blob_dir.glob(f"??/*{SUFFIX}"):
            sha = path.name[: -len(SUFFIX)]
            if _SHA256.fullmatch(sha) and path.parent.name == sha[:2]:
                yield sha

    def quarantine(self, sha256: str) -> Path:
        target = self.quarantine_dir / f"{sha256}.{time.strftime('%Y%m%dT%H%M%S')}{SUFFIX}"
        os.replace(self.path(sha256), target)
        _fsync_dir(self.quarantine_dir)
        return target

    def clean_temp(self) -> int:
        removed = 0
        for path in self.tmp_dir.iterdir():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

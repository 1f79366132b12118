"""Verification and garbage collection of a registry's blobs and records.

Verify rehashes every blob without holding the write lock (so serving and training go on),
then, under the lock, quarantines the damaged blobs, marks the records that use them, checks
every record against its blob's header, and removes debris: temp files and blobs that no record
references. Writers hold the lock while they write blobs, so under the lock any such file is
left over from a crash, never a write in flight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from adapters.formats import read_bespoke_metadata
from adapters.registry.blobs import BlobStore
from adapters.registry.index import Index
from adapters.registry.records import AdapterRecord
from adapters.validate import InvalidAdapter, Limits, read_header

_CHUNK = 1 << 20
# Fields that the blob header and the record must agree on.
_MATCHED_FIELDS = ("user", "concept", "rank", "alpha", "base_fingerprint")


@dataclass
class VerifyReport:
    """What verify checked, found and cleaned."""

    blobs_checked: int = 0
    records_checked: int = 0
    quarantined: list[str] = field(default_factory=list)  # sha256 of blobs moved to quarantine
    damaged_records: list[tuple[str, str, int, str]] = field(default_factory=list)  # user, concept, version, reason
    orphans_removed: int = 0
    temp_files_removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.quarantined and not self.damaged_records

    def lines(self) -> list[str]:
        out = [
            f"checked {self.blobs_checked} blobs and {self.records_checked} records; "
            f"removed {self.orphans_removed} unreferenced blobs and {self.temp_files_removed} temp files"
        ]
        out += [f"quarantined blob {sha}" for sha in self.quarantined]
        out += [f"damaged: {u}/{c} v{v}: {why}" for u, c, v, why in self.damaged_records]
        out.append("ok" if self.ok else "damaged records found")
        return out


def _check_blob(blobs: BlobStore, sha: str, limits: Limits) -> tuple[str | None, dict]:
    """(why the blob is damaged or None, its bespoke header fields)."""
    digest = hashlib.sha256()
    with blobs.open(sha) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha:
        return "blob content does not match its sha256", {}
    try:
        return None, read_bespoke_metadata(read_header(blobs.path(sha), limits).metadata)
    except InvalidAdapter as e:
        return f"blob is not a valid adapter file: {e}", {}


def _check_record(record: AdapterRecord, blobs: BlobStore, checked: dict[str, tuple[str | None, dict]], limits: Limits) -> str | None:
    if record.damaged:
        return record.damaged
    if record.sha256 not in checked:  # committed after the unlocked pass
        if not blobs.exists(record.sha256):
            return "blob is missing"
        checked[record.sha256] = _check_blob(blobs, record.sha256, limits)
    reason, header = checked[record.sha256]
    if reason:
        return reason
    for name in _MATCHED_FIELDS:
        if header.get(name) != getattr(record, name):
            return f"record's {name} {getattr(record, name)!r} does not match its blob's {header.get(name)!r}"
    return None


def verify(index: Index, blobs: BlobStore, limits: Limits = Limits()) -> VerifyReport:
    """Rehash every blob and check every record; quarantine, mark and clean (see module docstring)."""
    report = VerifyReport()
    checked: dict[str, tuple[str | None, dict]] = {}
    for sha in list(blobs.iter_blobs()):
        try:
            checked[sha] = _check_blob(blobs, sha, limits)
        except FileNotFoundError:  # deleted by a concurrent delete
            continue
        report.blobs_checked += 1
    with index.write() as tx:
        for sha, (reason, _) in checked.items():
            if reason and blobs.exists(sha):
                blobs.quarantine(sha)
                report.quarantined.append(sha)
        for record in tx.all_records():
            report.records_checked += 1
            reason = _check_record(record, blobs, checked, limits)
            if reason:
                if reason != record.damaged:
                    tx.mark_damaged(record.user, record.concept, record.version, reason)
                report.damaged_records.append((record.user, record.concept, record.version, reason))
        referenced = tx.referenced_shas()
        for sha in list(blobs.iter_blobs()):
            if sha not in referenced:
                blobs.delete(sha)
                report.orphans_removed += 1
        report.temp_files_removed = blobs.clean_temp()
    return report

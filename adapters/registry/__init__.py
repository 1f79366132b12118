"""The adapter registry: per-user, versioned LoRA adapters with crash-safe storage.

Layout of a registry root (default ``$BESPOKE_REGISTRY`` or ``<cache dir>/registry``)::

    index.sqlite                      records, aliases, version counters (SQLite, WAL)
    blobs/<sha[:2]>/<sha>.safetensors content-addressed adapter files (diffusers layout)
    tmp/                              in-flight writes; leftovers are removed by verify
    quarantine/                       blobs that failed verification

Modules, one job each: ``names`` (name rules), ``records`` (the record), ``blobs`` (BlobStore),
``index`` (Index over SQLite), ``maintenance`` (verify and garbage collection), ``api`` (Registry).
"""

from adapters.registry.api import Registry, UserRegistry, default_root
from adapters.registry.blobs import BlobStore, LocalBlobStore
from adapters.registry.errors import DamagedAdapter, InvalidName, InvalidRecord, NotFound, RegistryError
from adapters.registry.index import Index, SqliteIndex
from adapters.registry.maintenance import VerifyReport
from adapters.registry.records import AdapterRecord, RecordInfo

__all__ = [
    "AdapterRecord", "BlobStore", "DamagedAdapter", "Index", "InvalidName", "InvalidRecord", "LocalBlobStore",
    "NotFound", "RecordInfo", "Registry", "RegistryError", "SqliteIndex", "UserRegistry", "VerifyReport", "default_root",
]

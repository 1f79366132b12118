"""The registry: per-user, versioned LoRA adapters over a blob store and an index.

Isolation is in the API's shape: everything a user can do goes through
``registry.for_user(name)``, a handle bound to one validated user name, and every index query
it makes filters on that name. Another user's concepts are never listed, read, overwritten or
deleted, and asking for them gives the same :class:`NotFound` as a concept that does not exist.
:class:`Registry` itself also offers ``get(user, concept, version)`` and ``concepts(user)``, so it
satisfies :class:`gen.adapter.AdapterSource` and the sampler can take it directly.

Versions are numbered 1, 2, 3... per user and concept, assigned inside the write transaction and
never reused, even after a delete. ``latest`` always names the highest version; users may add
aliases such as ``prod``. A rollback of ``latest`` publishes the old blob again as a new version
(history stays append-only and every cache keyed by version stays valid); a rollback of a user
alias just moves it.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.formats import encode_adapter, read_adapter, write_adapter
from adapters.registry.blobs import BlobStore, LocalBlobStore, sha256_hex
from adapters.registry.errors import DamagedAdapter, NotFound, RegistryError, StorageError
from adapters.registry.index import Index, SqliteIndex
from adapters.registry.maintenance import VerifyReport, verify
from adapters.registry.names import validate_alias, validate_name
from adapters.registry.records import MAX_VERSION, AdapterRecord, RecordInfo
from adapters.validate import EMBEDDING_PREFIX, BaseSpec, Limits, check_text, lora_dtype, validate_adapter
from gen.adapter import LoraAdapter
from gen.paths import cache_dir

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from gen.base import Base

INDEX_NAME = "index.sqlite"
ENV_VAR = "BESPOKE_REGISTRY"
VersionRef = int | str  # a version number, "latest", or an alias


def default_root() -> Path:
    """``$BESPOKE_REGISTRY``, else ``<cache dir>/registry``."""
    explicit = os.environ.get(ENV_VAR)
    return Path(explicit).expanduser() if explicit else cache_dir() / "registry"


def _spec(base: Base | BaseSpec) -> BaseSpec:
    return base if isinstance(base, BaseSpec) else BaseSpec.from_base(base)


def _ref(version: VersionRef) -> VersionRef:
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise NotFound(f"version must be a number, 'latest' or an alias, not {version!r}")
    if isinstance(version, str) and version.isascii() and version.lstrip("+-").isdigit():  # not "²": str.isdigit takes it, int() does not
        version = int(version)  # "-1" too: as an alias it was refused for its "-", which says nothing of versions
    if isinstance(version, int):
        if version < 1:
            raise NotFound(f"version {version} does not exist; versions start at 1")
        if version > MAX_VERSION:  # beyond SQLite's integers: no such version can exist
            raise NotFound(f"version {version} does not exist")
        return version
    return version if version == "latest" else validate_name("alias", version)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Registry:
    """A registry rooted at a folder: ``index.sqlite``, ``blobs/``, ``tmp/``, ``quarantine/``.

    One instance per process (or per thread pool); it is thread-safe, and any number of
    processes may open the same root at once. Do not carry an open instance across ``fork``.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, limits: Limits = Limits(), busy_timeout_s: float = 60.0) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.limits = limits
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.blobs: BlobStore = LocalBlobStore(self.root)
        except OSError as e:
            raise StorageError(f"cannot create the registry folder {self.root} ({e.strerror or e})") from e
        self.index: Index = SqliteIndex(self.root / INDEX_NAME, busy_timeout_s)

    def for_user(self, user: str) -> UserRegistry:
        """A handle that can only see and touch ``user``'s records."""
        return UserRegistry(self, validate_name("user", user))

    def get(self, user: str, concept: str, version: VersionRef = "latest") -> LoraAdapter:
        return self.for_user(user).get(concept, version)

    def concepts(self, user: str) -> list[str]:
        return self.for_user(user).concepts()

    def verify(self) -> VerifyReport:
        """Rehash every blob, check every record, quarantine damage, remove debris (an operator task)."""
        return verify(self.index, self.blobs, self.limits)

    def _sweep(self, shas: set[str]) -> None:
        """Delete blobs no record uses any more. Under the write lock, so a put cannot be reusing one."""
        if shas:
            with self.index.write() as tx:
                for sha in shas:
                    if not tx.is_referenced(sha):
                        self.blobs.delete(sha)

    def _discard(self, sha: str) -> None:
        """Best effort: remove a blob written for a version that never committed (else ``verify`` removes it)."""
        try:
            self._sweep({sha})
        except (RegistryError, OSError):
            pass

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UserRegistry:
    """One user's view of a :class:`Registry`; obtain it with ``registry.for_user(user)``."""

    def __init__(self, registry: Registry, user: str) -> None:
        self._registry = registry
        self._index = registry.index
        self.user = user

    # --- reading ---

    def record(self, concept: str, version: VersionRef = "latest") -> AdapterRecord:
        """The record of one version (``version``: a number, ``"latest"`` or an alias)."""
        concept = validate_name("concept", concept)
        record = self._index.record(self.user, concept, _ref(version))
        if record is None:
            raise self._not_found(concept, version)
        return record

    def get(self, concept: str, version: VersionRef = "latest") -> LoraAdapter:
        """The adapter, tensors read from its blob.

        A blob that cannot be parsed, or whose values are no longer finite, raises
        :class:`DamagedAdapter`. The blob is not rehashed on every read (that would cost more than
        the read itself for large adapters): ``verify`` does that, and quarantines what it finds.
        """
        return self._load(self.record(concept, version))

    def list(self, concept: str | None = None, tag: str | None = None) -> list[AdapterRecord]:
        """Every version of this user's adapters, by concept then version, optionally filtered."""
        concept = None if concept is None else validate_name("concept", concept)
        tag = None if tag is None else validate_name("tag", tag)
        return self._index.records(self.user, concept, tag)

    def history(self, concept: str) -> list[AdapterRecord]:
        """All versions of one concept, newest first."""
        records = self.list(concept)
        if not records:
            raise self._not_found(validate_name("concept", concept), None)
        return records[::-1]

    def concepts(self) -> list[str]:
        return self._index.concepts(self.user)

    # --- writing ---

    def put(
        self,
        source: LoraAdapter | str | os.PathLike,
        base: Base | BaseSpec,
        concept: str | None = None,
        *,
        trigger: str | None = None,
        class_word: str | None = None,
        training_config: Mapping | None = None,
        data_fingerprints: Sequence[str] = (),
        metrics: Mapping[str, float] | None = None,
        tags: Sequence[str] = (),
        parent_version: int | None = None,
        aliases: Sequence[str] = (),
    ) -> AdapterRecord:
        """Store a new version and return its record.

        ``source`` is a :class:`LoraAdapter` or a diffusers/peft/kohya file or folder (format
        detected). Either way it is validated against ``base`` (a loaded ``Base`` or its
        :class:`BaseSpec`) before anything is written. ``concept`` defaults to the adapter's own;
        ``trigger``/``class_word`` override the adapter's.
        """
        spec = _spec(base)
        if isinstance(source, LoraAdapter):
            adapter, fmt = source, "bespoke"
            validate_adapter(adapter, spec, self._registry.limits)
        else:
            adapter, fmt = read_adapter(source, spec, self._registry.limits)
        for name, value in (("trigger", trigger), ("class word", class_word)):
            check_text(name, value)
        adapter = replace(adapter, trigger=trigger or adapter.trigger, class_word=class_word or adapter.class_word)
        if concept is None and adapter.concept is None:
            raise RegistryError("no concept name given and the adapter names none")
        concept = validate_name("concept", concept or adapter.concept)
        info = RecordInfo(training_config or {}, data_fingerprints, metrics or {}, tags, parent_version)
        aliases = tuple(dict.fromkeys(validate_alias(a) for a in aliases))
        payload = encode_adapter(adapter, {"user": self.user, "concept": concept})
        sha = sha256_hex(payload)
        wrote_blob = False
        try:
            with self._index.write() as tx:
                if info.parent_version is not None and tx.record(self.user, concept, info.parent_version) is None:
                    raise NotFound(f"parent version {info.parent_version} of {concept!r} does not exist")
                version = tx.next_version(self.user, concept)
                wrote_blob = not self._registry.blobs.exists(sha)
                try:
                    self._registry.blobs.put(sha, payload)  # durable before the record commits
                except OSError as e:
                    raise StorageError(f"cannot store {concept!r}: writing its blob failed ({e.strerror or e}); nothing was stored") from e
                record = AdapterRecord(
                    user=self.user, concept=concept, version=version, sha256=sha, size_bytes=len(payload), format=fmt,
                    rank=adapter.rank, alpha=float(adapter.alpha), target_modules=tuple(adapter.target_modules),
                    dtype=lora_dtype(adapter), base_fingerprint=adapter.base_fingerprint, trigger=adapter.trigger,
                    class_word=adapter.class_word, new_tokens=tuple(adapter.new_tokens),
                    training_config=info.training_config, data_fingerprints=info.data_fingerprints, metrics=info.metrics,
                    tags=info.tags, created_at=_now(), parent_version=info.parent_version,
                )
                tx.insert(record)
                for alias in aliases:
                    tx.set_alias(self.user, concept, alias, version)
        except Exception:  # rolled back (a full disk at commit, say): the new blob would be an orphan
            if wrote_blob:
                self._registry._discard(sha)
            raise
        return replace(record, aliases=("latest", *sorted(aliases)))

    def set_alias(self, concept: str, alias: str, version: VersionRef) -> AdapterRecord:
        """Point ``alias`` (e.g. ``prod``) at a version; returns that version's record."""
        concept, alias = validate_name("concept", concept), validate_alias(alias)
        with self._index.write() as tx:
            target = tx.record(self.user, concept, _ref(version))
            if target is None:
                raise self._not_found(concept, version)
            tx.set_alias(self.user, concept, alias, target.version)
        return self.record(concept, target.version)

    def remove_alias(self, concept: str, alias: str) -> None:
        concept, alias = validate_name("concept", concept), validate_alias(alias)
        with self._index.write() as tx:
            if not tx.remove_alias(self.user, concept, alias):
                raise self._not_found(concept, alias)

    def rollback(self, concept: str, to_version: int | None = None, alias: str = "latest") -> AdapterRecord:
        """Make ``alias`` name an earlier version (default: the one before its current target).

        For ``latest`` the earlier blob is published again as a new version whose parent is the
        version rolled back to; for a user alias the alias is moved. Returns the record ``alias``
        now names.
        """
        concept = validate_name("concept", concept)
        alias = alias if alias == "latest" else validate_alias(alias)
        with self._index.write() as tx:
            current = tx.record(self.user, concept, alias)
            if current is None:
                raise self._not_found(concept, alias)
            earlier = [r for r in tx.records(self.user, concept) if r.version < current.version and not r.damaged]
            if to_version is None:
                if not earlier:
                    raise RegistryError(f"{concept!r} has no healthy version before v{current.version} to roll back to")
                target = earlier[-1]
            else:
                target = next((r for r in earlier if r.version == to_version), None)
                if target is None:
                    raise RegistryError(f"v{to_version} of {concept!r} is not a healthy version before v{current.version} ({alias})")
            if alias != "latest":
                tx.set_alias(self.user, concept, alias, target.version)
                new_version = target.version
            else:
                new_version = tx.next_version(self.user, concept)
                tx.insert(replace(target, version=new_version, created_at=_now(), parent_version=target.version, aliases=()))
        return self.record(concept, new_version)

    def delete(self, concept: str, version: VersionRef | None = None, *, force: bool = False) -> list[int]:
        """Delete one version, or the whole concept when ``version`` is None; returns the versions deleted.

        A version that a user alias points at is kept unless ``force`` (then the alias goes too).
        Blobs no longer used by any record are removed. Version numbers are never reused.
        """
        concept = validate_name("concept", concept)
        with self._index.write() as tx:
            if version is None:
                doomed = tx.records(self.user, concept)
            else:
                one = tx.record(self.user, concept, _ref(version))
                doomed = [one] if one else []
            if not doomed:
                raise self._not_found(concept, version)
            held = [(a, r.version) for r in doomed for a in r.aliases if a != "latest"]
            if held and not force:
                alias, v = held[0]
                raise RegistryError(f"v{v} of {concept!r} is aliased as {alias!r}; move or remove the alias first, or force the delete")
            shas = set()
            for record in doomed:
                shas |= tx.delete(self.user, concept, record.version)
        self._registry._sweep(shas)
        return [r.version for r in doomed]

    def export(self, concept: str, out: str | os.PathLike, fmt: str = "diffusers", version: VersionRef = "latest") -> Path:
        """Write a version as diffusers (folder), peft (folder) or kohya (``.safetensors`` file); returns the path."""
        record = self.record(concept, version)
        try:
            return write_adapter(self._load(record), out, fmt, record.export_fields())
        except OSError as e:
            raise StorageError(f"cannot export {concept!r} v{record.version} to {os.fspath(out)} ({e.strerror or e})") from e

    # --- internals ---

    def _load(self, record: AdapterRecord) -> LoraAdapter:
        if record.damaged:
            raise DamagedAdapter(f"v{record.version} of {record.concept!r} is damaged ({record.damaged}); roll back or re-import it")
        try:
            tensors = load_file(self._registry.blobs.path(record.sha256))
        except (OSError, SafetensorError) as e:
            raise DamagedAdapter(f"cannot read the blob of {record.concept!r} v{record.version} ({e}); run `bespoke registry verify`") from e
        # One summing pass (no temporaries): NaN and infinity survive a sum. The sums are checked together: one check
        # instead of one per tensor (~1 ms of a cold load). A sum can also overflow on huge finite values, so a tensor
        # whose sum is not finite is checked element by element before it is called damaged.
        sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()]) if tensors else torch.zeros(0)
        suspects = [] if bool(torch.isfinite(sums).all()) else [k for k, s in zip(tensors, sums.tolist()) if not math.isfinite(s)]
        bad = next((k for k in suspects if not bool(torch.isfinite(tensors[k]).all())), None)
        if bad is not None:  # validated finite when stored, so the blob changed since
            raise DamagedAdapter(f"the blob of {record.concept!r} v{record.version} holds NaN or infinite values ({bad}); it is damaged: run `bespoke registry verify`")
        embeddings = {k[len(EMBEDDING_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(EMBEDDING_PREFIX)]}
        return LoraAdapter(
            tensors=tensors, rank=record.rank, alpha=record.alpha, target_modules=record.target_modules,
            base_fingerprint=record.base_fingerprint, trigger=record.trigger, class_word=record.class_word,
            new_tokens=record.new_tokens, token_embeddings=embeddings,
            user=record.user, concept=record.concept, version=record.version,
        )

    def _not_found(self, concept: str, version: VersionRef | None) -> NotFound:
        if version is None or not self._index.records(self.user, concept):
            return NotFound(f"user {self.user!r} has no concept {concept!r}")
        return NotFound(f"concept {concept!r} has no version or alias {version!r}")

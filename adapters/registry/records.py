"""What the registry knows about one adapter version, and the caller-supplied part of it.

The full record lives in the index (one row per version): a single source of truth, written in
the same transaction that makes the version visible. The blob's safetensors header carries the
short fields that describe the adapter itself (rank, alpha, targets, base, trigger, owner and
concept; see :func:`adapters.formats.bespoke_metadata`), so a blob read alone still says what
it is. Version numbers are not in the blob: they are assigned inside the write transaction,
and one blob may back several versions (a rollback re-publishes an old blob).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.registry.errors import InvalidRecord
from adapters.registry.names import validate_name

MAX_VERSION = 2**63 - 1  # SQLite's largest integer: no version number can be above it

MAX_JSON_BYTES = 256 << 10  # per field: training config, metrics, data fingerprints
MAX_TAGS = 32
_FINGERPRINT = re.compile(r"[0-9a-f]{16,128}")


@dataclass(frozen=True)
class AdapterRecord:
    """One version of one user's concept."""

    user: str
    concept: str
    version: int
    sha256: str  # of the blob file
    size_bytes: int
    format: str  # how it arrived: "bespoke" (a LoraAdapter), "diffusers", "peft" or "kohya"
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dtype: str
    base_fingerprint: str
    trigger: str | None = None
    class_word: str | None = None
    new_tokens: tuple[str, ...] = ()
    training_config: dict[str, Any] = field(default_factory=dict)
    data_fingerprints: tuple[str, ...] = ()  # hashes of the training images, never the images
    metrics: dict[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    created_at: str = ""  # ISO 8601, UTC
    parent_version: int | None = None
    aliases: tuple[str, ...] = ()  # "latest" when this is the newest version, plus user-set ones
    damaged: str | None = None  # why verify quarantined its blob; None when healthy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def export_fields(self) -> dict[str, Any]:
        """Identity and lineage written into exported files' headers (``bespoke.<field>``)."""
        return {
            "user": self.user,
            "concept": self.concept,
            "version": self.version,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "parent_version": self.parent_version,
            "tags": list(self.tags) or None,
        }


@dataclass(frozen=True)
class RecordInfo:
    """How a version was made, as the caller tells it; checked and normalized on construction."""

    training_config: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprints: Sequence[str] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Sequence[str] = ()
    parent_version: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "training_config", _json_object("training config", self.training_config))
        set_(self, "data_fingerprints", _fingerprints(self.data_fingerprints))
        set_(self, "metrics", _metrics(self.metrics))
        set_(self, "tags", _tags(self.tags))
        if self.parent_version is not None and (isinstance(self.parent_version, bool) or not isinstance(self.parent_version, int) or not 1 <= self.parent_version <= MAX_VERSION):
            raise InvalidRecord(f"parent version {self.parent_version!r} is not a positive integer (below 2**63)")


def _json_object(what: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is not None and not isinstance(value, Mapping):
        raise InvalidRecord(f"{what} must be a mapping of names to values, not {type(value).__name__}")
    value = dict(value or {})
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidRecord(f"{what} must be JSON-serializable with finite numbers ({e})") from e
    if len(text.encode()) > MAX_JSON_BYTES:
        raise InvalidRecord(f"{what} is {len(text.encode())} bytes as JSON; the limit is {MAX_JSON_BYTES}")
    return json.loads(text)


def _fingerprints(values: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise InvalidRecord("data fingerprints must be a list of hex digests, not a single string")
    out = tuple(values or ())
    for v in out:
        if not (isinstance(v, str) and _FINGERPRINT.fullmatch(v)):
            shown = repr(v)[:40]
            raise InvalidRecord(f"data fingerprint {shown} is not a lowercase hex digest (16-128 digits); store hashes of images, never images")
    if 66 * len(out) > MAX_JSON_BYTES:
        raise InvalidRecord(f"{len(out)} data fingerprints is too many to record")
    return out


def _metrics(values: Mapping[str, float] | None) -> dict[str, float]:
    out = {}
    for name, value in dict(values or {}).items():
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidRecord(f"metric name {name!r} must be text of 1-128 characters")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise InvalidRecord(f"metric {name!r} = {value!r} is not a finite number")
        out[name] = float(value)
    return _json_object("metrics", out)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _tags(values: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    tags = tuple(dict.fromkeys(validate_name("tag", t) for t in values or ()))
    if len(tags) > MAX_TAGS:
        raise InvalidRecord(f"{len(tags)} tags; the limit is {MAX_TAGS}")
    return tags

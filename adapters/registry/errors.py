"""Refusals raised by the registry; each names the problem in one line."""

from gen.errors import BespokeError


class RegistryError(BespokeError):
    """Something the registry refuses to do, or cannot find."""


class InvalidName(RegistryError):
    """A user, concept, alias or tag name that could be mistaken for a path or is malformed."""


class InvalidRecord(RegistryError):
    """Record fields (training config, metrics, data fingerprints, ...) that are malformed or too large."""


class NotFound(RegistryError):
    """No such concept, version or alias for this user (another user's records are never visible)."""


class DamagedAdapter(RegistryError):
    """A record whose blob failed verification and was quarantined."""


class RegistryBusy(RegistryError):
    """Another process held the index's lock for longer than the busy timeout; nothing was changed, retry later."""


class StorageError(RegistryError, OSError):
    """The registry's storage refused a read or write (read-only, no permission, disk full); nothing was changed.

    Also an :class:`OSError`, so callers that handle storage failures generically still catch it.
    """

"""Who may log in to a hosted demo: a users file (or ``$BESPOKE_DEMO_USERS``) read into a password check.

Format, one user per line (blank lines and ``#`` comments ignored)::

    alice:correct horse battery staple
    bob:pbkdf2_sha256$200000$9f1c...$4be2...

The part after the first ``:`` is the password, either as typed or as a hash printed by
``bespoke demo --hash-password`` (PBKDF2-SHA256, salted), so a shared file need not hold
plain passwords. In ``$BESPOKE_DEMO_USERS`` entries may also be separated by commas.

User names follow the registry's rules (letters, digits, ``_ - . @ +``), because the name a user
logs in with is the name their adapters are stored under: each logged-in user sees and uses only
their own concepts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import unicodedata
from pathlib import Path

from adapters.registry.errors import InvalidName
from adapters.registry.names import validate_name
from gen.errors import BespokeError

ENV_VAR = "BESPOKE_DEMO_USERS"
HASH_SCHEME = "pbkdf2_sha256"
HASH_ITERATIONS = 200_000


class AuthConfigError(BespokeError):
    """The users file or ``$BESPOKE_DEMO_USERS`` cannot be read or is malformed."""


def hash_password(password: str, iterations: int = HASH_ITERATIONS) -> str:
    """A salted PBKDF2-SHA256 hash in the users-file format."""
    if not password:
        raise AuthConfigError("the password is empty")
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
    return f"{HASH_SCHEME}${iterations}${salt}${digest}"


def _iterations(stored: str) -> int | None:
    """The PBKDF2 iteration count of a stored hash; None for a plain password (or a malformed hash)."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != HASH_SCHEME or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    return int(parts[1])


def _matches(stored: str, password: str) -> bool:
    if stored.startswith(HASH_SCHEME + "$"):
        try:
            _, iterations, salt, digest = stored.split("$")
            computed = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations)).hex()
        except ValueError:
            return False
        return hmac.compare_digest(computed, digest)
    return hmac.compare_digest(stored.encode(), password.encode())


class Users:
    """A password check for ``gr.Blocks.launch(auth=...)``: ``users(name, password) -> bool``."""

    def __init__(self, entries: dict[str, str]):
        if not entries:
            raise AuthConfigError("no users defined; add lines like 'alice:password'")
        # Names are kept, and looked up, in NFC: "zoë" typed as o + combining diaeresis is the same user.
        self._entries = {unicodedata.normalize("NFC", name): stored for name, stored in entries.items()}
        # Unknown names, and users with a plain password, are also checked against a decoy hash as costly
        # as the costliest stored one, so a login takes as long whichever kind of name it is, or none.
        costs = [n for n in map(_iterations, self._entries.values()) if n]
        self._decoy = hash_password(secrets.token_hex(8), max(costs)) if costs else None

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __call__(self, username: str, password: str) -> bool:
        stored = self._entries.get(unicodedata.normalize("NFC", username))
        if self._decoy is not None and (stored is None or _iterations(stored) is None):
            _matches(self._decoy, password)  # the cost of a hash, for a plain password or no user at all
        return stored is not None and _matches(stored, password)

    @classmethod
    def parse(cls, text: str, where: str, *, commas: bool = False) -> Users:
        """Read ``name:password`` entries; ``where`` names the source in error messages."""
        lines = text.replace(",", "\n").splitlines() if commas else text.splitlines()
        entries: dict[str, str] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, password = line.partition(":")
            if not sep or not password:
                raise AuthConfigError(f"{where}, entry {number}: expected 'name:password'")
            try:
                name = validate_name("user", name.strip())
            except InvalidName as e:
                raise AuthConfigError(f"{where}, entry {number}: {e}") from None
            if name in entries:
                raise AuthConfigError(f"{where}, entry {number}: user {name!r} is defined twice")
            entries[name] = password
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Users:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AuthConfigError(f"cannot read the users file {path}: {e}") from None
        return cls.parse(text, str(path))

    @classmethod
    def from_env(cls) -> Users | None:
        text = os.environ.get(ENV_VAR)
        return None if not text else cls.parse(text, f"${ENV_VAR}", commas=True)


def load_users(path: str | os.PathLike | None) -> Users | None:
    """The users file when given, else ``$BESPOKE_DEMO_USERS``, else None (no login, one local user)."""
    return Users.from_file(path) if path else Users.from_env()

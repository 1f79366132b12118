"""Validation of the names users choose: users, concepts, aliases and tags.

Names end up in SQL (always as parameters), in file headers and in CLI output; a name is never
used to build a path, but refusing path-like names anyway keeps them safe to use as one later
(exports named after concepts, per-user folders on an object store). Rules: NFC-normalized
Unicode; letters, digits and combining marks of any script plus ``_ - . @ +``; starts with a
letter, digit or ``_``; at most 64 characters. So ``../x``, ``/abs``, ``a/b``, NUL, empty and
over-long names are refused, each with an error naming the bad name.
"""

from __future__ import annotations

import unicodedata

from adapters.registry.errors import InvalidName

MAX_NAME_LENGTH = 64
RESERVED_ALIASES = ("latest",)  # maintained by the registry, never set by hand
_PUNCTUATION = set("_-.@+")


def _allowed(char: str, first: bool) -> bool:
    category = unicodedata.category(char)
    if category[0] in "LN" or char == "_":
        return True
    return not first and (category[0] == "M" or char in _PUNCTUATION)


def validate_name(kind: str, name: object) -> str:
    """The NFC form of ``name`` if it is a valid ``kind`` name (user, concept, alias, tag), else :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name must be text, not {type(name).__name__}")
    shown = repr(name if len(name) <= 80 else name[:77] + "...")
    normalized = unicodedata.normalize("NFC", name)
    if not normalized:
        raise InvalidName(f"{kind} name is empty")
    if len(normalized) > MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} name {shown} is {len(normalized)} characters; the limit is {MAX_NAME_LENGTH}")
    for i, char in enumerate(normalized):
        if not _allowed(char, i == 0):
            what = "NUL" if char == "\0" else repr(char)
            raise InvalidName(
                f"{kind} name {shown} contains {what}; use letters, digits and _ - . @ + (starting with a letter, digit or _)"
            )
    return normalized


def validate_alias(alias: object) -> str:
    """An alias is a name that cannot be mistaken for a version number or for ``latest``."""
    alias = validate_name("alias", alias)
    if alias.isascii() and alias.isdigit():
        raise InvalidName(f"alias {alias!r} is a number and would be read as a version; choose a name")
    if alias in RESERVED_ALIASES:
        raise InvalidName(f"alias {alias!r} is maintained by the registry and cannot be set")
    return alias

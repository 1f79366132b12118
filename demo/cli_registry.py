"""``bespoke registry ...``: the adapter registry from the command line.

A thin layer over :mod:`adapters.registry`: every subcommand opens the registry (``--registry``,
else ``$BESPOKE_REGISTRY``, else the cache dir), calls one API method and prints the result.
User errors surface as :class:`gen.errors.BespokeError`, which the main CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from adapters.format_names import FORMATS


def _open(args: argparse.Namespace):
    from adapters.registry import Registry

    return Registry(args.registry)


def _version(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


def _print_records(records, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        print("(no adapters)")
        return
    rows = [("CONCEPT", "VERSION", "ALIASES", "RANK", "ALPHA", "SIZE", "FORMAT", "CREATED", "STATUS")]
    for r in records:
        status = f"damaged: {r.damaged}" if r.damaged else "ok"
        rows.append((r.concept, str(r.version), ",".join(r.aliases) or "-", str(r.rank), f"{r.alpha:g}", _size(r.size_bytes), r.format, r.created_at[:19], status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        _print_records(reg.for_user(args.user).list(concept=args.concept, tag=args.tag), args.json)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        _print_records(reg.for_user(args.user).history(args.concept), args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        print(json.dumps(reg.for_user(args.user).record(args.concept, _version(args.version)).to_dict(), indent=2))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        user = reg.for_user(args.user)
        if args.remove:
            user.remove_alias(args.concept, args.alias)
            print(f"removed alias {args.alias} of {args.concept}")
        else:
            record = user.set_alias(args.concept, args.alias, _version(args.version))
            print(f"{args.concept}@{args.alias} -> v{record.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        record = reg.for_user(args.user).rollback(args.concept, args.to, args.alias)
        source = f" (a copy of v{record.parent_version})" if args.alias == "latest" else ""
        print(f"{args.concept}@{args.alias} -> v{record.version}{source}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        version = None if args.version is None else _version(args.version)
        deleted = reg.for_user(args.user).delete(args.concept, version, force=args.force)
        print(f"deleted {args.concept} " + ", ".join(f"v{v}" for v in deleted))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        print(reg.for_user(args.user).export(args.concept, args.out, args.format, _version(args.version)))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from adapters.formats import detect_format
    from gen.base import load_base

    detect_format(args.path)  # refuse unsafe or unknown files before spending time loading the base
    base = load_base(args.base, device="cpu", dtype="float32", allow_network=args.allow_network)
    with _open(args) as reg:
        record = reg.for_user(args.user).put(
            args.path, base, args.concept, trigger=args.trigger, class_word=args.class_word, tags=args.tag, aliases=args.alias
        )
        print(f"imported {record.format} adapter as {record.concept} v{record.version} (rank {record.rank}, alpha {record.alpha:g})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        report = reg.verify()
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def add_registry_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``registry`` and its subcommands to the main CLI's subparsers; returns the ``registry`` parser."""
    registry = subparsers.add_parser("registry", help="manage per-user LoRA adapters", description="Manage per-user LoRA adapters: versions, aliases, export, import, verification.")
    actions = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="registry folder (default: $BESPOKE_REGISTRY, else <cache dir>/registry)")
    user = argparse.ArgumentParser(add_help=False, parents=[common])
    user.add_argument("user", help="whose adapters")
    concept = argparse.ArgumentParser(add_help=False, parents=[user])
    concept.add_argument("concept", help="concept name, e.g. rex")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON records")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, parents: list) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=parents)
        p.set_defaults(func=func)
        return p

    p = add("list", cmd_list, "list a user's adapter versions", [user, as_json])
    p.add_argument("--concept", default=None, help="only this concept")
    p.add_argument("--tag", default=None, help="only versions with this tag")

    add("history", cmd_history, "show every version of a concept, newest first", [concept, as_json])

    p = add("show", cmd_show, "print one version's full record as JSON", [concept])
    p.add_argument("version", nargs="?", default="latest", help="number or alias (default: latest)")

    p = add("alias", cmd_alias, "point an alias such as prod at a version, or remove it", [concept])
    p.add_argument("alias", help="alias name, e.g. prod")
    p.add_argument("version", nargs="?", default="latest", help="number or alias to point at (default: latest)")
    p.add_argument("--remove", action="store_true", help="remove the alias instead")

    p = add("rollback", cmd_rollback, "make latest (or an alias) name an earlier version", [concept])
    p.add_argument("--to", type=int, default=None, help="version to roll back to (default: the one before)")
    p.add_argument("--alias", default="latest", help="alias to roll back (default: latest, which republishes the old version as a new one)")

    p = add("delete", cmd_delete, "delete a version, or a whole concept", [concept])
    p.add_argument("version", nargs="?", default=None, help="number or alias (default: every version)")
    p.add_argument("--force", action="store_true", help="also delete versions that aliases point at")

    p = add("export", cmd_export, "write a version as a diffusers, peft or kohya adapter", [concept])
    p.add_argument("out", help="output folder (diffusers, peft) or .safetensors file (kohya)")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="file convention (default: diffusers)")
    p.add_argument("--version", default="latest", help="number or alias (default: latest)")

    p = add("import", cmd_import, "validate and store an adapter file or folder (format detected)", [concept])
    p.add_argument("path", help="a diffusers or peft folder, or a diffusers or kohya .safetensors file")
    p.add_argument("--base", default="builtin", help="the base it must fit: 'builtin', a diffusers folder or a hub id")
    p.add_argument("--allow-network", action="store_true", help="allow downloading a hub id")
    p.add_argument("--trigger", default=None, help="trigger token(s), overriding the file's")
    p.add_argument("--class-word", default=None, help="class word, e.g. dog")
    p.add_argument("--tag", action="append", default=[], help="tag (repeatable)")
    p.add_argument("--alias", action="append", default=[], help="alias to point at the new version (repeatable)")

    add("verify", cmd_verify, "rehash every blob, check every record, quarantine damage (exit 1 if any)", [common])
    return registry

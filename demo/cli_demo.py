"""``bespoke demo``: start the Gradio app, for one person (no login) or a team (``--auth``).

    bespoke demo                                   # http://127.0.0.1:7860, built-in base, one local user
    bespoke demo --auth users.txt --host 0.0.0.0   # a team: each user logs in and sees only their concepts
    bespoke demo --hash-password                   # print a users-file hash for a password read from stdin
"""

from __future__ import annotations

import argparse
import getpass
import sys
import warnings
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    if args.hash_password:
        from demo.auth import hash_password

        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
        print(hash_password(password))
        return 0

    from demo.auth import ENV_VAR, load_users
    from gen.base import load_base

    users = load_users(args.auth)
    if users is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"serving on {args.host} without --auth or ${ENV_VAR}: everyone who can reach the port shares one user's concepts", stacklevel=1)

    from demo.app import launch
    from demo.service import DemoService, DemoSettings

    settings = DemoSettings(outputs=Path(args.outputs), registry=Path(args.registry) if args.registry else None, auth=users is not None)
    service = DemoService(lambda: load_base(args.base, device=args.device, dtype=args.dtype, allow_network=args.allow_network), settings)
    n = len(users.names) if users is not None else 0
    who = f"{n} user{'s' if n != 1 else ''} (login required)" if users is not None else "one local user, no login"
    print(f"bespoke demo: base {args.base} ({service.base.fingerprint}), {who}, outputs in {service.outputs}")
    try:
        launch(service, users=users, host=args.host, port=args.port)
    finally:
        service.close()
    return 0


def port_arg(text: str) -> int:
    """A ``--port`` value, 1-65535: refused by argparse (exit 2) before the base loads; 70000 once reached Gradio's bind() as a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a whole number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {value}")
    return value


def add_demo_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the main CLI's subparsers."""
    from demo.cli import _add_base_args

    p = subparsers.add_parser(
        "demo", help="start the Gradio demo: personalize, generate and manage concepts in a browser",
        description="Start the Gradio demo. Without --auth (or $BESPOKE_DEMO_USERS) there is one local user and no login.",
    )
    _add_base_args(p)
    p.add_argument("--auth", default=None, metavar="USERS_FILE", help="users file, one 'name:password' per line (default: $BESPOKE_DEMO_USERS, else no login)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for a team)")
    p.add_argument("--port", type=port_arg, default=7860, help="port (default: 7860)")
    p.add_argument("--registry", default=None, help="registry folder (default: $BESPOKE_REGISTRY, else <cache dir>/registry)")
    p.add_argument("--outputs", default="outputs/demo", help="the only folder the app writes to and serves from (default: outputs/demo)")
    p.add_argument("--hash-password", action="store_true", help="read a password from stdin, print its users-file hash, and exit")
    p.set_defaults(func=cmd_demo)

"""An ASGI guard in front of Gradio's file routes: the demo serves only files under its own folders.

Gradio serves files through ``/gradio_api/file=<path>`` (and ``/gradio_api/file/<path>``): from
``allowed_paths``, from its upload/cache folder and from its examples cache, and it streams any
public ``http(s)`` URL given there through the server. A hosted demo needs none of that breadth,
so before Gradio sees the request this guard refuses (403) every file request whose path, once
resolved (``..`` and symlinks included), is not inside one of the demo's roots: the outputs
folder and Gradio's upload folder (which the demo places inside the outputs folder). URLs and
``/proxy=`` requests are refused outright. This is defence in depth on top of Gradio's own checks
(path-traversal advisories were fixed through 6.16; the project requires ``gradio>=6.16,<7``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

_FILE_ROUTE = re.compile(r"^(?:/.*?)?/(?:gradio_api/)?file(?:=|/)(?P<target>.*)$", re.DOTALL)
_PROXY_ROUTE = re.compile(r"^(?:/.*?)?/(?:gradio_api/)?proxy=", re.DOTALL)
_URL_LIKE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]+:|//|\\\\)")


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    for root in roots:
        try:
            path.relative_to(root)
            return True
        except ValueError:
            continue
    return False


def file_allowed(target: str, roots: Sequence[str | Path]) -> bool:
    """Whether a file route's ``target`` names a file inside one of ``roots`` (after resolving it)."""
    if not target or "\0" in target or _URL_LIKE.match(target):
        return False
    try:
        path = Path(target).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        resolved = path.resolve()
        resolved_roots = [Path(r).resolve() for r in roots]
    except (OSError, RuntimeError, ValueError):
        return False
    return _inside(resolved, resolved_roots)


class OutputsOnly:
    """ASGI middleware: file requests outside ``roots()`` and proxy requests get 403 before Gradio runs."""

    def __init__(self, app, roots: Callable[[], Sequence[str | Path]]):
        self.app = app
        self.roots = roots

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            path = scope.get("path", "")
            match = _FILE_ROUTE.match(path)
            refused = bool(_PROXY_ROUTE.match(path)) or (match is not None and not file_allowed(match["target"], self.roots()))
            if refused:
                await _forbidden(send)
                return
        await self.app(scope, receive, send)


async def _forbidden(send) -> None:
    body = b"File not allowed."
    await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

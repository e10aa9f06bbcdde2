"""Optional API keys: ``Authorization: Bearer KEY`` on every route but the open ones.

Keys come from an environment variable (comma-separated) and/or a file (one per line).
With no key configured the API is open; a configured file that is missing or holds no key
stops the ingress from starting rather than leaving the API open by mistake.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from hdm_platform.serve.errors import APIError, error_response
from hdm_platform.serve.settings import ApiKeySettings

__all__ = ["BearerAuthMiddleware", "load_api_keys"]


def _file_keys(path: Path) -> set[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"api_keys.file: cannot read {path}: {error}") from None
    keys = {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}
    if not keys:
        raise ValueError(f"api_keys.file: {path} holds no key")
    return keys


def load_api_keys(
    settings: ApiKeySettings, environ: Mapping[str, str] = os.environ
) -> frozenset[str]:
    """The accepted keys; empty means the API is open."""
    keys: set[str] = set()
    if settings.env_var:
        keys |= {key.strip() for key in environ.get(settings.env_var, "").split(",")} - {""}
    if settings.file:
        keys |= _file_keys(Path(settings.file).expanduser())
    return frozenset(keys)


class BearerAuthMiddleware:
    """ASGI middleware answering 401 (JSON, ``WWW-Authenticate: Bearer``) unless the request
    carries one of ``keys`` or asks for one of ``open_paths`` (relative to the route prefix).

    ``on_reject`` is called once per refused request (the ingress counts them).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Collection[str],
        open_paths: Collection[str],
        on_reject: Callable[[], None],
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    # compare_digest for each key: the time taken says nothing about a key.
                    return any(hmac.compare_digest(token.strip(), key) for key in self.keys)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        self.on_reject()
        response = error_response(
            APIError(
                "unauthorized",
                "this API needs a key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )
        await response(scope, receive, send)

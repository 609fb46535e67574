"""
ACEXY_TOKEN access control, in front of every route but ``/healthz``.

Players cannot send headers from a playlist, so the token is accepted as
``?token=`` as well as ``Authorization: Bearer``. It is compared in constant
time and never logged (the proxy logs no URLs; the access log is off by
default, and the content parser drops ``token`` so it never reaches an engine).
"""

from __future__ import annotations

import hmac
from typing import Any

from twisted.web.resource import IResource
from zope.interface import implementer

OPEN_PATHS = frozenset({b"/healthz"})


@implementer(IResource)
class TokenGuard:
    isLeaf = True

    def __init__(self, inner: Any, token: str) -> None:
        self._inner = inner
        self._token = token.encode("ascii")

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # pragma: no cover - leaf
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # pragma: no cover - leaf
        raise NotImplementedError

    def render(self, request: Any) -> Any:
        if request.path in OPEN_PATHS or self._allowed(request):
            return self._inner.render(request)
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="acexy"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"missing or wrong token: add ?token=... or an Authorization: Bearer header\n"

    def _allowed(self, request: Any) -> bool:
        given = [t for t in request.args.get(b"token", []) if t]
        auth = request.getHeader(b"authorization") or b""
        if auth[:7].lower() == b"bearer ":
            given.append(auth[7:].strip())
        ok = False
        for candidate in given:  # compare every candidate: no early exit on a match
            ok |= hmac.compare_digest(candidate, self._token)
        return ok

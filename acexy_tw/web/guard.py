"""
ACEXY_TOKEN access control, in front of every route but ``/healthz``.

Players cannot send headers from a playlist, so the token is accepted as
``?token=`` (URL-encoded there: a token with ``& # + %`` is sent as ``%26 %23
%2B %25``) as well as ``Authorization: Bearer`` (as it is). Every candidate
(each ``token=`` value and the Bearer credential) is compared in constant time
against the configured token, and the request is let through when one of them
matches (``?token=<wrong>&token=<right>`` passes, on the right one). It is
never logged: log lines go through :func:`acexy_tw.logs.redact`
(``token=<redacted>``), the access log is off by default, and the content
parser drops ``token`` so it never reaches an engine.

``request.acexy_token``
    Set on every request let through: the decoded token text that matched
    (the configured token), or None when the path is open (``/healthz``).
    Without ACEXY_TOKEN there is no guard and it stays None (the default of
    :class:`acexy_tw.web.server.AcexyRequest`). Routes that hand out URLs
    (HLS playlists) read it to put the token into them.

A refusal is ``401`` with ``WWW-Authenticate``; its short text body is left
out for ``HEAD`` (Twisted would otherwise log a warning naming the whole
request line).
"""

from __future__ import annotations

import hmac
from typing import Any, Optional

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
        if request.path in OPEN_PATHS:
            request.acexy_token = None
            return self._inner.render(request)
        matched = self._matching(request)
        if matched is not None:
            request.acexy_token = matched
            return self._inner.render(request)
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="acexy"')
        if request.method == b"HEAD":
            return b""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"missing or wrong token: add ?token=... or an Authorization: Bearer header\n"

    def _matching(self, request: Any) -> Optional[str]:
        """The candidate that is the token (decoded), or None."""
        given = [t for t in request.args.get(b"token", []) if t]
        auth = request.getHeader(b"authorization") or b""
        if auth[:7].lower() == b"bearer ":
            given.append(auth[7:].strip())
        ok = False
        for candidate in given:  # compare every candidate: no early exit on a match
            ok |= hmac.compare_digest(candidate, self._token)
        return self._token.decode("ascii") if ok else None

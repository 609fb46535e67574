"""
The dashboard: one self-contained HTML page (inline CSS and script, no
external assets) served at ``GET /``. It polls ``/ace/status`` (same origin,
relative URL, passing on a ``?token=`` the page was opened with) every 2 s
and renders it with text nodes only (the history graphs as inline SVG built
with DOM calls). Its stop buttons ``POST /ace/stop`` (same origin, token
passed on); its links and copied URLs are the proxy's own stream URLs. No
inline event handlers: the policy below allows only the page's own script.

The page ships as package data (``acexy_tw/web/dashboard.html``) and is read
once, on first use.
"""

import base64
import hashlib
import re
from functools import lru_cache
from importlib.resources import files

__all__ = ["page", "content_security_policy"]

RESOURCE = "dashboard.html"


@lru_cache(maxsize=None)
def page() -> bytes:
    """The dashboard's HTML (UTF-8), read once from the package."""
    return files(__package__).joinpath(RESOURCE).read_bytes()


@lru_cache(maxsize=None)
def content_security_policy() -> str:
    """
    A Content-Security-Policy for the page: only its own inline script and
    style (by hash), fetches to the same origin, nothing else. Optional — the
    page works without it — but it makes the "text only, nothing external"
    promise enforced by the browser.
    """
    html = page().decode("utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(
            "'sha256-%s'" % base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode("ascii")
            for b in bodies
        )

    return (
        "default-src 'none'; "
        f"script-src {hashes('script')}; "
        f"style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

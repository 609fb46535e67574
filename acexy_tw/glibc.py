"""
glibc, when the process runs on it: the allocator's controls the proxy uses
(``malloc_trim`` in :mod:`acexy_tw.streaming.budget`, ``mallopt`` in
:mod:`acexy_tw.streaming.upstream`). Elsewhere (musl, macOS) there is none and
both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

__all__ = ["libc"]


@functools.lru_cache(maxsize=None)
def libc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (loaded once), else None."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.gnu_get_libc_version  # glibc only: musl's allocator has neither control
    except (OSError, AttributeError):
        return None
    return lib

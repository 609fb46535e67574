"""
``twistd acexy``: options and ``makeService``.

Every setting is an option and an environment variable (flag beats env beats
default, see :mod:`acexy_tw.config`); a boolean one is a plain switch
(``--m3u8``). A bad value stops start-up with one line naming the variable and
the value (:class:`ConfigExit`), not a usage dump and not a traceback: it is a
configuration mistake, not a command-line one. An ``ACEXY_*`` variable that is
no setting is a warning naming the closest one, never an error.
``twistd acexy --version`` prints acexy-tw's version (``twistd --version``
stays Twisted's).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Optional

from twisted.python import usage

from acexy_tw._twisted_compat import leave_tls_unloaded  # imports neither the reactor nor pyOpenSSL
from acexy_tw.config import (
    Config,
    ConfigError,
    load_config,
    option_flags,
    option_parameters,
    unknown_env_warnings,
)
from acexy_tw import logs
from acexy_tw.logs import get_logger, set_level

log = get_logger(__name__)


class ConfigExit(SystemExit):
    """Start-up stopped by a bad setting; ``str()`` is the message, exit status 1."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(f"acexy: configuration error: {error}")
        self.error = error


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "AceStream proxy: one engine session per content, shared by every player. "
        "Settings come from ACEXY_* environment variables or these options."
    )
    optParameters = option_parameters()
    optFlags = option_flags() + [
        ["demo", None, "Run a simulated AceStream engine in-process and use it (try it with VLC/mpv/curl)."],
    ]

    config: Optional[Config] = None

    def opt_version(self) -> None:
        """Print acexy-tw's version and exit."""
        from twisted import __version__ as twisted_version

        from acexy_tw._version import __version__

        print(
            f"acexy-tw {__version__.public()} "
            f"(Twisted {twisted_version}, Python {platform.python_version()})"
        )
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.config = load_config(os.environ, self, demo=bool(self["demo"]))
        except ConfigError as e:
            raise ConfigExit(e) from None


#: Listening endpoint types that never speak TLS.
_PLAIN_LISTEN = ("tcp:", "tcp6:", "unix:", "systemd:")


def uses_tls(config: Config) -> bool:
    """Whether anything this configuration listens on or connects to speaks TLS."""
    return (
        not config.listen.startswith(_PLAIN_LISTEN)
        or config.engine_scheme == "https"
        or (config.orch_url or "").startswith("https:")
    )


def makeService(options: Options, reactor: Any = None) -> Any:
    if reactor is None:  # twistd: nothing has imported the reactor yet
        if options.config is not None and not uses_tls(options.config):
            leave_tls_unloaded()
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from acexy_tw.service import make_service

    config = options.config
    if config is None:  # options built without parseOptions (tests)
        config = load_config(os.environ, options, demo=bool(options.get("demo")))
    # twistd starts its log observers after this returns; what is logged now is
    # kept and written then.
    set_level(config.log_level)
    # the observer twistd builds next (--logger acexy_tw.logs.observer) writes
    # this format, to twistd's --logfile when one is given
    logs.configure(config.log_format, getattr(options, "parent", None))
    for warning in unknown_env_warnings(os.environ):
        log.warn("ignoring {warning}", warning=warning)
    try:
        return make_service(config, reactor)
    except ConfigError as e:
        raise ConfigExit(e) from None

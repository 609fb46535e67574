"""acexy-tw: an AceStream proxy on Twisted."""

from acexy_tw._version import __version__

__all__ = ["__version__"]

"""
Provides acexy_tw version information.
"""

# This file is auto-generated! Do not edit!
# Use `python -m incremental.update acexy_tw` to change this file.

from incremental import Version

__version__ = Version("acexy_tw", 26, 11, 0)
__all__ = ["__version__"]

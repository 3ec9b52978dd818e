"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2.

Raise :class:`UserError` (a ``ValueError``) for bad arguments, profiles, paths or files; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with what the user asked for (an argument, a profile, a path), with how to fix it."""

"""The project's error types: a user's mistake, told apart from a bug.

Every `UserError` is something the person running dabdetr can fix (a wrong path, a file that
is not what it claims to be, a folder that would be overwritten, an unwritable place); its
message names the thing and the fix. The CLI prints it as one line and exits 2. `UserError`
is a `ValueError`, so code that catches ValueError keeps working.
"""

from __future__ import annotations

__all__ = ["BadDataError", "BadImageError", "BadWeightsError", "OutputExistsError", "UnwritableError",
           "UserError"]


class UserError(ValueError):
    """A mistake in what the user gave (argument, file, folder); the message says the fix."""


class BadWeightsError(UserError):
    """A weights source that cannot be read as DAB-DETR weights (missing, corrupt, not ours)."""


class BadImageError(UserError, OSError):
    """An image file that cannot be decoded (also an OSError, as PIL's own errors are)."""


class OutputExistsError(UserError):
    """Writing would replace something the user made; pass --force (force=True) to allow it."""


class UnwritableError(UserError, OSError):
    """A place that cannot be written: permission denied, read-only, or a full disk."""


class BadDataError(UserError):
    """A dataset file (e.g. a COCO annotation file) that is missing, unreadable or invalid."""

"""The one error type of the data package.

Every problem with user inputs, downloaded sources or prepared datasets raises `DataError`, whose
message names the file (and the field, line or shard inside it) so a user can fix it without a
traceback. It subclasses `ValueError` so callers that validate configs can catch both alike.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing data: the message names the file and the field, line or shard at fault."""

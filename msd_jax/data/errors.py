"""Error type for bad input data.

Every message names the offending file or folder, the field (what was being checked) and what
was expected, so that a user can fix the data without reading the code.
"""

from __future__ import annotations

from msd_jax.trust import InputError


class DataError(InputError):
    """Bad input data: missing/empty folders, undecodable images, inconsistent classes, ...

    An InputError, so a ``ValueError`` handler still catches it.
    """

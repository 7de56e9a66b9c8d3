"""How a batch run names its prediction-set version in Redis.

Apart from `online.py` (numpy, pyarrow, redis) so that the batch flow's `start`, which
only names the version, imports none of them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime


def new_version(run_id: str, at: datetime | None = None) -> str:
    """Sortable by start time, so an older run can never overwrite a newer pointer."""
    at = at or datetime.now(UTC)
    tag = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")
    return f"{at:%Y%m%dT%H%M%S%f}Z-{tag}"

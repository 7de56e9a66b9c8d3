"""BATCHSCORE_STEP_RETRIES for the flows' `@retry` decorators, read without pydantic.

The count is needed when a flow file is imported, and every Metaflow process imports it:
the launcher, each task, each card. `Settings()` would import pydantic and
pydantic-settings in all of them (~0.2 s each, three of them on the batch flow's serial
path for nothing else); this reads the one variable the same way (the environment first,
any letter case, an empty value meaning unset; then the project's `.env` through
python-dotenv, as pydantic-settings does) and applies the same bounds.
`Settings.step_retries` stays its definition; a test checks the two agree.
"""

from __future__ import annotations

import os

from batchscore.project import project_root

NAME = "BATCHSCORE_STEP_RETRIES"
DEFAULT, MOST = 2, 4  # Metaflow allows at most 4 retries


def step_retries() -> int:
    """The @retry count for the flows' idempotent steps (default 2, at most 4)."""
    value = next((v for k, v in os.environ.items() if k.upper() == NAME and v), None)
    if value is None:
        env_file = project_root() / ".env"
        if env_file.is_file():
            from dotenv import dotenv_values

            found = {k.upper(): v for k, v in dotenv_values(env_file).items()}
            value = found.get(NAME) or None
    if value is None:
        return DEFAULT
    try:
        retries = int(value.strip())
    except ValueError:
        raise ValueError(f"{NAME}={value!r}: not a whole number") from None
    if not 0 <= retries <= MOST:
        raise ValueError(f"{NAME}={retries}: must be between 0 and {MOST}")
    return retries

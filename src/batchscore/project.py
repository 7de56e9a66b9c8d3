"""Where the project is: the folder whose `.env` and relative paths every process shares."""

from __future__ import annotations

from pathlib import Path

# What marks the project's folder, as `.metaflow` marks Metaflow's local datastore.
PROJECT_MARKERS = ("pyproject.toml", ".git", ".env")


def project_root(start: Path | None = None) -> Path:
    """The nearest folder, from `start` (the working directory) up, that holds
    pyproject.toml, .git or .env; `start` itself when none does (an installed package
    used from any folder)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return start

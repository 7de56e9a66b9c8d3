"""Imported by the flows before Metaflow: gives Metaflow a user name it accepts.

Metaflow records a user on every run, reads `METAFLOW_USER` when it is first imported, and
refuses to run without a name or as `root`, the user of containers and CI. So that
`python metaflow/<flow>.py run` works anywhere, as root too: an unset or `root`
METAFLOW_USER becomes the login name, or `batchscore` when that is root or unknown.
A usable METAFLOW_USER is kept. This is the rule's one home: the flows and the tests'
conftest import this module before Metaflow; the Makefile and `.ci/run` set nothing.
"""

from __future__ import annotations

import getpass
import os

FALLBACK_USER = "batchscore"


def ensure_metaflow_user() -> str:
    """The user name Metaflow will record, set in the environment when it was not usable."""
    user = os.environ.get("METAFLOW_USER", "")
    if user and user != "root":
        return user
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a container's uid without a passwd entry
        user = ""
    if not user or user == "root":
        user = FALLBACK_USER
    os.environ["METAFLOW_USER"] = user
    return user


ensure_metaflow_user()

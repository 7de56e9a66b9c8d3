"""The METAFLOW_USER rule has one home, `orchestration/metaflow_user.py`: Metaflow gets a
name it accepts whoever runs the flows, and nothing else spells the rule again."""

from __future__ import annotations

import ast
import getpass
import re

import pytest
from conftest import ROOT

from batchscore.orchestration.metaflow_user import FALLBACK_USER, ensure_metaflow_user


def _login(name: str | None):
    def getuser() -> str:
        if name is None:
            raise KeyError("uid 1000 has no passwd entry")  # a container's bare uid
        return name

    return getuser


@pytest.mark.parametrize(
    ("given", "login", "expected"),
    [
        ("ana", "root", "ana"),  # a usable name is kept
        (None, "ben", "ben"),  # unset: the login name
        ("", "ben", "ben"),
        ("root", "ben", "ben"),  # Metaflow refuses root
        ("root", "root", FALLBACK_USER),  # root in a container or CI
        (None, None, FALLBACK_USER),  # a uid without a name
    ],
)
def test_metaflow_gets_a_name_it_accepts(monkeypatch, given, login, expected):
    if given is None:
        monkeypatch.delenv("METAFLOW_USER", raising=False)
    else:
        monkeypatch.setenv("METAFLOW_USER", given)
    monkeypatch.setattr(getpass, "getuser", _login(login))
    assert ensure_metaflow_user() == expected
    import os

    assert os.environ["METAFLOW_USER"] == expected


def test_the_rule_is_spelled_only_in_its_module():
    """The Makefile, CI script and tests set no METAFLOW_USER of their own."""
    setters = re.compile(r"METAFLOW_USER\s*(:?=|\]\s*=)|export METAFLOW_USER")
    for path in (ROOT / "Makefile", ROOT / ".ci" / "run", ROOT / "tests" / "conftest.py"):
        assert not setters.search(path.read_text()), path
    flows = sorted((ROOT / "metaflow").glob("*.py"))
    assert flows
    for flow in flows:  # the flows import the rule before anything else
        imports = (ast.Import, ast.ImportFrom)
        first = next(n for n in ast.parse(flow.read_text()).body if isinstance(n, imports))
        assert isinstance(first, ast.Import), flow
        assert [a.name for a in first.names] == ["batchscore.orchestration.metaflow_user"], flow

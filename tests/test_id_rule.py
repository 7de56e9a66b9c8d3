"""The id rule has one home (`batchscore.rows.keys`): every id the batch flow can publish
is reachable over HTTP, and every id it refuses is refused there too."""

from __future__ import annotations

import re

import pandas as pd
import pyarrow as pa
import pytest

from batchscore.rows.errors import InputError
from batchscore.rows.keys import bad_ids, id_keys, is_usable_id

IDS = [
    "007",
    "a-1",
    "back\\slash",  # published by the batch, once refused by the service (issue 19)
    "dots.and/slashes",
    "ünïcödé",
    "",
    "a:b",
    "has space",
    "tab\there",
    "no\u00a0break",
    "star*",
    "what?",
    "[x]",
]


def _published(value: str) -> bool:
    """What the batch flow does with this id: a key, or an InputError."""
    try:
        return id_keys(pd.Series([value], dtype=object), "rows.csv", "customer") == [value]
    except InputError:
        return False


def _served(value: str) -> bool:
    """What the HTTP service does with it, as a lookup id and as a requested key."""
    from batchscore.service.app import ApiError, _check_key, _id_keys

    answers = []
    lookup = lambda: _id_keys([{"customer": value}], "customer")  # noqa: E731
    for call in (lookup, lambda: _check_key(value, "k")):
        try:
            call()
            answers.append(True)
        except ApiError:
            answers.append(False)
    assert answers[0] == answers[1], value
    return answers[0]


@pytest.mark.parametrize("value", IDS, ids=repr)
def test_the_service_takes_exactly_the_ids_the_batch_publishes(value):
    assert _served(value) == _published(value)


def test_a_backslash_id_is_reachable_over_http():
    assert _published("back\\slash") and _served("back\\slash")


def test_scalar_and_column_spellings_of_the_rule_agree_on_every_code_point():
    chars = [chr(c) for c in range(0x3100) if not 0xD800 <= c <= 0xDFFF]
    ids = [f"id{c}" for c in chars]
    column = bad_ids(pa.array(ids)).tolist()
    assert [not is_usable_id(i) for i in ids] == column
    assert column == [bool(re.search(r"[\s:*?\[\]]", i)) for i in ids]
    assert not is_usable_id("") and bad_ids(pa.array(["", None])).tolist() == [True, True]

"""The row-key contract, pinned by golden vectors any client can reproduce."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from batchscore.rows.errors import InputError
from batchscore.rows.keys import (
    feature_bytes,
    hash_rows,
    id_keys,
    row_key,
    row_keys,
)

# hex(SHA-256(float64 little-endian of each value, concatenated)): written out literally so
# that a change of the contract (byte order, width, separator, rounding) fails this test.
GOLDEN = [
    ([1.0, 2.0, 3.0], "a68de4b5e96a60c8ceb3c7b7ef93461725bdbbff3516b136585a743b5c0ec664"),
    ([17.99, 10.38, 122.8], "5071986d2df8d03158260ebdd0975deaec30c0f2214635ee132ab81aea5e08cd"),
    ([0.0, 0.0, 0.0], "9d908ecfb6b256def8b49a7c504e6c889c4b0e41fe6ce3e01863dd7b61a20aa0"),
    ([0.1, -2.5, 1e300], "864d61115ccae37853e8ea0d9566fca065b25992e9a2eddb0b8f73681c683530"),
]


def reference_key(values: list[float]) -> str:
    """An independent implementation, as a client in another language would write it."""
    normalised = [0.0 if v == 0 else float(v) for v in values]
    return hashlib.sha256(struct.pack(f"<{len(values)}d", *normalised)).hexdigest()


@pytest.mark.parametrize(("values", "expected"), GOLDEN)
def test_golden_vectors(values, expected):
    assert reference_key(values) == expected
    assert row_key(values) == expected
    assert row_keys(np.array([values])) == [expected]


def test_row_keys_of_a_matrix_equal_row_key_of_each_row():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(50, 7)) * 1000
    keys = row_keys(matrix)
    assert keys == [row_key(list(row)) for row in matrix]
    assert keys == [reference_key(list(row)) for row in matrix]
    assert len(set(keys)) == 50
    # A DataFrame keys like its values; non-contiguous / big-endian input too.
    assert row_keys(pd.DataFrame(matrix)) == keys
    assert row_keys(np.asfortranarray(matrix)) == keys
    assert row_keys(matrix.astype(">f8")) == keys


def test_integers_and_float32_key_as_their_float64_value():
    assert row_key([1, 2, 3]) == GOLDEN[0][1]
    assert row_keys(np.array([[1, 2, 3]], dtype="int64")) == [GOLDEN[0][1]]
    assert row_keys(np.array([[1.0, 2.0, 3.0]], dtype="float32")) == [GOLDEN[0][1]]


def test_negative_zero_keys_like_zero():
    assert row_key([-0.0, 0.0, -0.0]) == row_key([0.0, 0.0, 0.0]) == GOLDEN[2][1]
    assert row_keys(np.array([[1.0, -0.0, 3.0]])) == row_keys(np.array([[1.0, 0.0, 3.0]]))
    assert struct.pack("<d", feature_bytes(np.array([[-0.0]]))[0, 0]) == b"\0" * 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected(bad):
    with pytest.raises(InputError, match="row 2, feature 3"):
        row_keys(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, bad]]))
    with pytest.raises(InputError):
        row_key([bad, 1.0, 2.0])


def test_column_order_matters():
    assert row_key([1.0, 2.0, 3.0]) != row_key([3.0, 2.0, 1.0])
    assert row_key([1.0, 2.0, 3.0]) != row_key([2.0, 1.0, 3.0])
    # and so does the number of columns: a trailing zero is not "the same row"
    assert row_key([1.0, 2.0, 3.0]) != row_key([1.0, 2.0, 3.0, 0.0])


def test_keys_are_lowercase_hex_sha256():
    key = row_key([17.99, 10.38, 122.8])
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")


def test_id_keys_pass_clean_ids_through():
    assert id_keys(pd.Series(["a-1", "B_2", "3"])) == ["a-1", "B_2", "3"]
    assert id_keys(pd.Series([10, 20])) == ["10", "20"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a:b",
        "has space",
        " lead",
        "tab\there",
        "star*",
        "what?",
        "br[ack]et",
        None,
        "no\u00a0break",  # Unicode whitespace, as Python's \s sees it
        "em\u2003space",
        "line\u2028sep",
    ],
)
def test_id_keys_reject_unusable_ids_naming_the_row(bad):
    ids = pd.Series(["ok-1", "ok-2", bad], dtype=object)
    with pytest.raises(InputError, match=r"rows.csv: column 'customer', row 3") as info:
        id_keys(ids, "rows.csv", "customer")
    assert "id" in str(info.value)


def test_hash_rows_is_row_keys_as_an_arrow_array():
    matrix = np.random.default_rng(3).normal(size=(20_000, 4))
    keys = hash_rows(matrix)
    assert keys.type == pa.string()
    expected = [hashlib.sha256(r.astype("<f8").tobytes()).hexdigest() for r in matrix]
    assert keys.to_pylist() == expected
    assert len(hash_rows(np.empty((0, 4)))) == 0


def test_hash_rows_past_the_int32_offset_limit_gives_large_strings(monkeypatch, redis_client):
    """Arrow `string` holds at most 2 GiB of text: 64-byte keys wrap its int32 offsets past
    ~33.5M rows in one call. The limit is lowered here so that 101 rows cross it."""
    from batchscore.online.store import OnlineStore
    from batchscore.rows import keys as keys_module
    from batchscore.versions import new_version

    matrix = np.random.default_rng(4).normal(size=(101, 3))
    expected = [hashlib.sha256(r.astype("<f8").tobytes()).hexdigest() for r in matrix]
    monkeypatch.setattr(keys_module, "_STRING_BYTES", 64 * 100)
    keys = hash_rows(matrix)
    assert keys.type == pa.large_string()
    assert keys.to_pylist() == expected

    # Such keys go through the batch path's writer unchanged.
    store = OnlineStore(redis_client, prefix="t")
    version = new_version("Flow/1")
    store.stage(version, {"model": "m", "classes": ["n", "y"]})
    from batchscore.batch.predictions import LoadedModel

    proba = np.full(len(keys), 0.25)
    outputs = [(LoadedModel("m", None, "0" * 64), np.zeros(len(keys), int), proba)]
    assert store.write(version, 0, keys, outputs) == len(keys)
    assert store.get_many([expected[-1]], version)[0]["proba"] == 0.25
    store.discard(version)


def test_one_id_rule_for_keys_and_quarantine_equal_to_pythons_whitespace():
    # `bad_ids` (Arrow's RE2) must refuse exactly what Python's `\s` calls whitespace:
    # every code point, so that quarantine and `id_keys` agree on what cannot be a key.
    import re

    from batchscore.rows.keys import bad_ids

    chars = [chr(c) for c in range(0x3100) if not 0xD800 <= c <= 0xDFFF]
    expected = [bool(re.search(r"[\s:*?\[\]]", f"id{c}")) for c in chars]
    assert bad_ids(pa.array([f"id{c}" for c in chars])).tolist() == expected

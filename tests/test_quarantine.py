"""Quarantine: which rows are set aside, and why, whatever the input's column types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv
import pytest

from batchscore.rows.errors import InputError
from batchscore.rows.validation import partition_rows


def test_bad_cells_are_named_by_row_column_and_reason():
    table = pa.table(
        {
            "a": pa.array(["1.5", "abc", None, "inf", " 2 ", "1e3", ""]),
            "b": pa.array([1.0, 2, np.nan, 4, 5, None, 7]),
            "id": pa.array(["007", "008", "009", "010", "011", "012", "013"]),
        }
    )
    part = partition_rows(table, ["a", "b"], "in.csv", first_row=101, keep=["id"])
    assert part.good.to_pydict() == {"a": [1.5, 2.0], "b": [1.0, 5.0], "id": ["007", "011"]}
    assert part.rejected.to_pylist() == [
        {"row": 102, "column": "a", "value": "abc", "reason": "not a number"},
        {"row": 103, "column": "a", "value": "", "reason": "missing value"},
        {"row": 104, "column": "a", "value": "inf", "reason": "not a finite number (NaN or inf)"},
        {"row": 106, "column": "b", "value": "", "reason": "missing value"},
        {"row": 107, "column": "a", "value": "", "reason": "missing value"},
    ]


def test_text_parses_to_the_same_float64_as_the_csv_reader():
    """Row keys must not depend on whether a column was read as text or as numbers."""
    texts = ["0.1", "1e-300", "123456789.123456789", "-0.0", "2.2250738585072014e-308"]
    part = partition_rows(pa.table({"x": texts}), ["x"], "in.csv")
    numbers = pa.csv.read_csv(pa.py_buffer(("x\n" + "\n".join(texts)).encode())).column("x")
    assert part.good.column("x").to_pylist() == numbers.to_pylist()


def test_a_missing_column_still_rejects_the_whole_input():
    with pytest.raises(InputError, match="missing feature column"):
        partition_rows(pa.table({"a": [1.0]}), ["a", "b"], "in.csv")


def test_a_bad_id_sets_its_row_aside_instead_of_rejecting_the_input():
    # With BATCHSCORE_ID_COLUMN, an empty id or one holding a space, ':' or a glob
    # character cannot be a key: in quarantine mode that row is set aside like a bad cell,
    # named by the id column (checked first), and leading zeros of the good ids are kept.
    table = pa.table(
        {
            "a": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]),
            "customer": pa.array(["0007", "", None, "a:b", "0011", "x y"]),
        }
    )
    part = partition_rows(
        table, ["a"], "in.csv", first_row=1, keep=["customer"], id_column="customer"
    )
    assert part.good.to_pydict() == {"a": [1.0, 5.0], "customer": ["0007", "0011"]}
    reason = "id is empty or holds whitespace, ':' or a glob character"
    assert [
        (r["row"], r["column"], r["value"], r["reason"]) for r in part.rejected.to_pylist()
    ] == [
        (2, "customer", "", reason),
        (3, "customer", "", reason),
        (4, "customer", "a:b", reason),
        (6, "customer", "x y", reason),  # the id is reported, not the NaN beside it
    ]


def test_plan_shards_quarantines_bad_ids_and_keys_the_rest_by_id(tmp_path, settings_for):
    import csv

    from batchscore.batch.shards import plan_shards
    from batchscore.storage.object_store import ObjectStore

    settings = settings_for(
        {"BATCHSCORE_HOME": str(tmp_path / "home"), "BATCHSCORE_ID_COLUMN": "customer"}
    )
    path = tmp_path / "in.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "a", "b"])
        writer.writerows([["0007", 1, 2], ["", 3, 4], ["0009", 5, "x"], ["0010", 7, 8]])
    plan = plan_shards(str(path), ["a", "b"], None, "Flow/1", settings, "quarantine")
    assert (plan.rows_read, plan.rows_rejected) == (4, 2)
    store = ObjectStore.from_settings(settings)
    rejected = store.get_bytes(plan.rejected_uri).decode()
    assert '2,"customer","","id is empty' in rejected and '3,"b","x","not a number"' in rejected
    ids = [
        pa.ipc.open_file(pa.py_buffer(store.get_bytes(uri))).read_all().column("customer")
        for uri in plan.shards
    ]
    assert [i for column in ids for i in column.to_pylist()] == ["0007", "0010"]

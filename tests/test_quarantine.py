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


class Half:
    """A model whose probability is always one half."""

    classes_ = np.array([0, 1])

    def predict_proba(self, features):
        return np.full((len(features), 2), 0.5)


@pytest.mark.services
def test_shards_quarantine_and_ingest_merges_their_rejected_rows_in_file_order(
    tmp_path, settings_for, redis_url, redis_prefix
):
    # Two shards, each reading its own byte range of one CSV: each sets its bad rows
    # aside, and the merge numbers them by their row in the file, in input order.
    import csv

    from batchscore.batch.bundle import ModelBundle
    from batchscore.batch.predictions import LoadedModel
    from batchscore.batch.scoring import score_shard
    from batchscore.batch.shards import merge_rejected, plan_shards
    from batchscore.online.store import OnlineStore
    from batchscore.storage.object_store import ObjectStore

    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_ID_COLUMN": "customer",
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        }
    )
    path = tmp_path / "in.csv"
    rows = [[f"{n:04d}", n, n + 1] for n in range(1, 41)]
    rows[1][0] = ""  # row 2: a bad id
    rows[2][2] = "x"  # row 3: not a number
    rows[33][1] = "inf"  # row 34, in the second shard
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "a", "b"])
        writer.writerows(rows)
    plan = plan_shards(str(path), ["a", "b"], None, "Flow/1", settings, "quarantine", max_tasks=2)
    assert len(plan.shards) == 2 and all(s.pieces[0].kind == "csv" for s in plan.shards)
    bundle = ModelBundle("t", [LoadedModel("half", Half(), "ab" * 32)], ["a", "b"], ("n", "y"))
    online = OnlineStore.from_settings(settings)
    online.stage("v1", {"model": "half"})
    results = [score_shard(s.index, s, bundle, "v1", settings) for s in plan.shards]
    assert sum(r.keys_written for r in results) == 37
    assert all(r.rejected_uri for r in results)  # each shard found a bad row

    merged = merge_rejected(plan, results, settings)
    assert (merged.rows_read, merged.rows_rejected) == (40, 3)
    store = ObjectStore.from_settings(settings)
    rejected = pa.csv.read_csv(pa.py_buffer(store.get_bytes(merged.rejected_uri)))
    assert rejected.column("row").to_pylist() == [2, 3, 34]
    assert rejected.column("column").to_pylist() == ["customer", "b", "a"]
    assert set(rejected.column("file").to_pylist()) == {str(path)}
    assert not any(store.exists(r.rejected_uri) for r in results)  # the parts are merged
    found = online.get_many(["0034", "0035"], version="v1")
    assert found[0] is None and found[1]["proba"] == 0.5


def test_a_boolean_column_is_one_or_zero_under_quarantine_as_everywhere():
    # The one row rule: a boolean feature is the number 1 or 0 (reject, quarantine, HTTP).
    table = pa.table({"a": pa.array([True, False, None]), "b": [1.0, 2.0, 3.0]})
    part = partition_rows(table, ["a", "b"], "in.parquet")
    assert part.good.to_pydict() == {"a": [1.0, 0.0], "b": [1.0, 2.0]}
    assert part.rejected.to_pylist() == [
        {"row": 3, "column": "a", "value": "", "reason": "missing value"}
    ]


def test_a_column_that_cannot_hold_numbers_names_the_column_and_file():
    table = pa.table({"a": pa.array([b"x"], pa.binary()), "b": [1.0]})
    with pytest.raises(InputError, match=r"in.parquet: column 'a' is of type binary"):
        partition_rows(table, ["a", "b"], "in.parquet")

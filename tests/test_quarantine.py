"""Quarantine: which rows are set aside, and why, whatever the input's column types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv
import pytest

from batchscore.data import InputError, partition_rows


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

"""The one row check: which rows can be scored, and why the others cannot.

Feature columns must be present and hold finite numbers; `to_feature_*` raise on the
first bad cell, `partition_rows` sets bad rows aside with their reason (quarantine), and
`is_number` checks one value of a JSON request (the HTTP service). One rule for all:
a number is an integer or a float, finite; a boolean is the number 1 or 0 (as scikit-learn
and pandas train on it); text is not a number unless it is one written as text (CSV).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.rows.errors import InputError

if TYPE_CHECKING:  # imported where used: the batch flow's `load_data` needs no pandas
    import pandas as pd

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- schema check


def _check_columns(
    columns: Sequence[str],
    feature_columns: Sequence[str],
    source: str,
    first_row: int,
    allowed_extra: Sequence[str],
) -> None:
    missing = [c for c in feature_columns if c not in columns]
    if missing:
        raise InputError(
            f"{source}: missing feature column(s) {missing}; the model needs "
            f"{len(feature_columns)} columns: {list(feature_columns)}"
        )
    extra = [c for c in columns if c not in feature_columns and c not in allowed_extra]
    if extra and first_row == 1:
        log.warning("%s: ignoring column(s) the model does not use: %s", source, extra)


Locate = Callable[[int], str]  # a row's index in a block -> "row 12" (or a byte offset)


def _rows_from(first_row: int) -> Locate:
    return lambda index: f"row {first_row + index}"


def _not_finite(source: str, column: str, where: str, value: float) -> InputError:
    return InputError(
        f"{source}: column {column!r}, {where}: {value} is not a finite number "
        "(rows with NaN or inf are rejected)"
    )


def is_number(value: object) -> bool:
    """Whether one value of a request row (JSON) is a number under the row rule: an int or
    a float; a bool is 1 or 0. Finiteness is checked on the whole request, as a float64."""
    return isinstance(value, int | float)  # bool is an int


def to_feature_frame(
    frame: pd.DataFrame,
    feature_columns: Sequence[str],
    source: str,
    first_row: int = 1,
    allowed_extra: Sequence[str] = (),
    locate: Locate | None = None,
) -> pd.DataFrame:
    """The feature columns, in training order, as finite float64; anything else is an error.

    Columns beyond the features (and `allowed_extra`, such as the id column) are ignored
    with a warning: a scoring table often carries labels or metadata beside its features.
    """
    import pandas as pd

    locate = locate or _rows_from(first_row)
    _check_columns(list(frame.columns), feature_columns, source, first_row, allowed_extra)
    features = frame.loc[:, list(feature_columns)]
    for column in feature_columns:
        values = features[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            numbers = pd.to_numeric(values, errors="coerce")
            bad = numbers.isna() & values.notna()
            if bad.any():
                at = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(
                    f"{source}: column {column!r}, {locate(at)}: "
                    f"{values.iloc[at]!r} is not a number"
                )
            features[column] = numbers
    matrix = features.to_numpy(dtype="float64")
    finite = np.isfinite(matrix)
    if not finite.all():
        row, col = (int(i[0]) for i in np.nonzero(~finite))
        raise _not_finite(source, feature_columns[col], locate(row), matrix[row, col])
    return pd.DataFrame(matrix, columns=list(feature_columns), index=frame.index)


def to_feature_table(
    table: pa.Table,
    feature_columns: Sequence[str],
    source: str,
    first_row: int = 1,
    allowed_extra: Sequence[str] = (),
    locate: Locate | None = None,
) -> pa.Table:
    """`to_feature_frame` for Arrow tables: the same checks and errors, without the copies
    into and out of pandas when every feature column is already numeric (the usual case).
    `locate` names a row from its index in the table (default: `row <first_row + index>`)."""
    locate = locate or _rows_from(first_row)
    _check_columns(table.column_names, feature_columns, source, first_row, allowed_extra)
    columns = [table.column(name) for name in feature_columns]
    if not all(pa.types.is_integer(c.type) or pa.types.is_floating(c.type) for c in columns):
        features = table.select(list(feature_columns)).to_pandas()
        frame = to_feature_frame(features, feature_columns, source, first_row, locate=locate)
        return pa.Table.from_pandas(frame, preserve_index=False)
    # Like pandas, integers beyond 2**53 round to the nearest float64. The check reads
    # each chunk in place: no copy of the table is made when it is already float64, and
    # pandas is not imported (Arrow's own `to_numpy` of a chunk imports it: ~0.2 s of the
    # batch flow's `load_data`).
    columns = [pc.cast(c, pa.float64(), safe=False) for c in columns]
    first_bad: tuple[int, int] | None = None
    for index, column in enumerate(columns):
        offset = 0
        for chunk in column.chunks:
            bad = np.flatnonzero(_not_finite_or_missing(chunk))
            if len(bad):
                if first_bad is None or offset + bad[0] < first_bad[0]:
                    first_bad = (offset + int(bad[0]), index)
                break
            offset += len(chunk)
    if first_bad is not None:
        row, index = first_bad
        value = columns[index][row].as_py()
        value = float("nan") if value is None else value
        raise _not_finite(source, feature_columns[index], locate(row), value)
    return pa.table(dict(zip(feature_columns, columns, strict=True)))


def _not_finite_or_missing(chunk: pa.Array) -> np.ndarray:
    """Per value of a float64 chunk, True where it is null, NaN or infinite; read in place."""
    data = chunk.buffers()[1]
    if data is None:  # no values at all (an empty or all-null chunk may carry none)
        return np.ones(len(chunk), dtype=bool)
    values = np.frombuffer(data, np.float64, len(chunk), 8 * chunk.offset)
    bad = ~np.isfinite(values)
    if chunk.null_count:
        bad |= ~np.asarray(chunk.is_valid())
    return bad


# ------------------------------------------------------------------------ quarantine

# A decimal or scientific number as Arrow's CSV reader would parse it (and inf/nan, which
# parse, then fail the finite check with their own reason).
_NUMBER = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$"


@dataclass(frozen=True)
class Partition:
    """An input block split into rows that can be scored and rows that cannot."""

    good: pa.Table  # the feature columns as finite float64, plus any extra columns kept
    rejected: pa.Table  # row (1-based data row), column, value (as text), reason


def partition_rows(
    table: pa.Table,
    feature_columns: Sequence[str],
    source: str,
    first_row: int = 1,
    keep: Sequence[str] = (),
    id_column: str | None = None,
) -> Partition:
    """Keep the rows whose every feature is a finite number (and whose id, with an id
    column, can be a key); name why each other row is not.

    Structural problems (a missing column) still raise: they reject the whole input, not
    rows of it. A row is reported once, at its first bad column: the id, then the
    features in training order.
    """
    from batchscore.rows.keys import BAD_ID_REASON, bad_ids

    _check_columns(table.column_names, feature_columns, source, first_row, keep)
    bad = np.zeros(table.num_rows, dtype=bool)
    where = np.empty(table.num_rows, dtype=object)  # the first bad column's name
    reasons = np.empty(table.num_rows, dtype=object)
    if id_column and id_column in table.column_names:
        fresh = bad_ids(table.column(id_column))
        where[fresh], reasons[fresh] = id_column, BAD_ID_REASON
        bad |= fresh
    columns = []
    for name in feature_columns:
        values, problems = _as_finite(table.column(name).combine_chunks(), source, name)
        fresh = (problems != None) & ~bad  # noqa: E711 - numpy element-wise
        where[fresh] = name
        reasons[fresh] = problems[fresh]
        bad |= fresh
        columns.append(values)
    good_mask = pa.array(~bad)
    good = pa.table(
        {
            **dict(zip(feature_columns, columns, strict=True)),
            **{name: table.column(name) for name in keep if name in table.column_names},
        }
    ).filter(good_mask)
    rows = np.flatnonzero(bad)
    names = [str(where[row]) for row in rows]
    shown = [
        _cell_text(table.column(name), int(row)) for name, row in zip(names, rows, strict=True)
    ]
    rejected = pa.table(
        {
            "row": pa.array(rows + first_row, pa.int64()),
            "column": pa.array(names, pa.string()),
            "value": pa.array(shown, pa.string()),
            "reason": pa.array(list(reasons[rows]), pa.string()),
        }
    )
    return Partition(good, rejected)


def _as_finite(column: pa.Array, source: str, name: str) -> tuple[pa.Array, np.ndarray]:
    """The column as float64 (bad cells null) and, per row, why it is bad (None: fine)."""
    problems = np.full(len(column), None, dtype=object)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_trim_whitespace(column)
        number = pc.fill_null(pc.match_substring_regex(text, _NUMBER, ignore_case=True), False)
        blank = pc.fill_null(pc.equal(text, ""), True)  # an empty cell is a missing value
        not_number = np.asarray(pc.and_(pc.invert(number), pc.invert(blank)))
        problems[not_number] = "not a number"
        # Arrow's text-to-float64 cast is the parser its CSV reader uses: keys stay exact.
        column = pc.cast(pc.if_else(number, text, pa.scalar(None, pa.string())), pa.float64())
    elif pa.types.is_boolean(column.type):  # the row rule: a boolean is 1 or 0
        column = pc.cast(column, pa.float64())
    elif not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise InputError(
            f"{source}: column {name!r} is of type {column.type}, which cannot hold numbers"
        )
    else:
        column = pc.cast(column, pa.float64(), safe=False)
    values = column.to_numpy(zero_copy_only=False)
    missing = np.asarray(column.is_null()) & (problems == None)  # noqa: E711
    problems[missing] = "missing value"
    infinite = ~np.isfinite(values) & ~np.asarray(column.is_null())
    problems[infinite] = "not a finite number (NaN or inf)"
    return column, problems


def _cell_text(column: pa.ChunkedArray, row: int) -> str:
    value = column[row].as_py()
    return "" if value is None else str(value)

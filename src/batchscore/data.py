"""Datasets, table I/O (CSV, Parquet) and the input schema check.

Tables are read in batches so memory follows the batch size, not the table. Every
problem with an input is an `InputError` naming the file, and the column and data row
(1-based, header excluded) where one applies.
"""

from __future__ import annotations

import logging
import re
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscore.config import Settings
from batchscore.store import ObjectStore, StoreError

if TYPE_CHECKING:  # imported where used: the batch flow's `load_data` needs no pandas
    import pandas as pd

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("breast_cancer",)
READ_BLOCK_BYTES = 16 << 20


class InputError(ValueError):
    """The input cannot be used as given; the message says where and why."""


@dataclass(frozen=True)
class Dataset:
    """Features (numeric, in training order) and binary labels, 1 = the positive class."""

    name: str
    features: pd.DataFrame
    labels: np.ndarray
    classes: tuple[str, str]  # (negative, positive), as named in the source

    @property
    def positive_class(self) -> str:
        return self.classes[1]


def load_dataset(
    source: str,
    target: str | None = None,
    positive_class: str | None = None,
    settings: Settings | None = None,
) -> Dataset:
    """The built-in breast-cancer data, or any numeric CSV/Parquet table with a binary label."""
    if source == "breast_cancer":
        return _breast_cancer()
    if not target:
        raise InputError(f"{source}: a file dataset needs --target, the name of its label column")
    frame = read_frame(source, settings)
    if target not in frame.columns:
        raise InputError(f"{source}: no label column {target!r}; columns: {list(frame.columns)}")
    labels, classes = _binary_labels(frame[target], source, target, positive_class)
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise InputError(f"{source}: no feature columns besides the label {target!r}")
    return Dataset(
        name=dataset_name(source),
        features=to_feature_frame(features, list(features.columns), source),
        labels=labels,
        classes=classes,
    )


def dataset_name(source: str) -> str:
    """A short, path-safe name for a dataset: `breast_cancer`, or the file's stem."""
    if source in BUILTIN_DATASETS:
        return source
    stem = Path(urlparse(source).path).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "dataset"


def _breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    # scikit-learn codes malignant as 0; the positive class here is malignant (the finding).
    labels = (bunch.target.to_numpy() == 0).astype(np.int8)
    return Dataset(
        name="breast_cancer",
        features=bunch.data.astype("float64"),
        labels=labels,
        classes=("benign", "malignant"),
    )


# Recognised text pairs, (negative, positive), compared case-insensitively.
YES_NO_PAIRS = (
    ("no", "yes"),
    ("n", "y"),
    ("false", "true"),
    ("f", "t"),
    ("negative", "positive"),
    ("neg", "pos"),
)


def _binary_labels(
    column: pd.Series, source: str, target: str, positive_class: str | None
) -> tuple[np.ndarray, tuple[str, str]]:
    """Labels as 0/1 with 1 = the positive class: `positive_class` if given; else 1 (or the
    larger number) for numeric labels, True for booleans, the yes-like label of a recognised
    yes/no pair. Any other pair of text labels is ambiguous: `fraud`/`legit` sorted would
    make `legit` positive, so it needs `--positive_class`."""
    # An empty cell is a missing label too (Arrow reads it as "" in a text column).
    missing = (column.isna() | (column.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0]) + 1
        raise InputError(f"{source}: column {target!r}, row {row}: the label is missing")
    values = column.astype(str)
    classes = sorted(values.unique(), key=_natural_key)
    if len(classes) != 2:
        shown = classes[:10]
        raise InputError(
            f"{source}: column {target!r} must hold exactly two classes, found {len(classes)}: "
            f"{shown}"
        )
    if positive_class:
        if positive_class not in classes:
            raise InputError(f"{source}: positive class {positive_class!r} not in {classes}")
        negative = classes[0] if classes[1] == positive_class else classes[1]
        classes = [negative, positive_class]
    else:
        classes = _default_classes(classes, source, target)
    labels = (values == classes[1]).to_numpy().astype(np.int8)
    return labels, (classes[0], classes[1])


def _default_classes(classes: list[str], source: str, target: str) -> list[str]:
    """(negative, positive) when no `--positive_class` is given; `classes` is sorted."""
    numbers = [_natural_key(c) for c in classes]
    if all(kind == 0 for kind, _ in numbers):  # numeric; booleans arrive as True/False
        if numbers[0][1] == 1:  # 1 is positive whatever the other label (-1, 2, ...)
            return [classes[1], classes[0]]
        return classes  # no 1: the larger number
    lowered = tuple(c.lower() for c in classes)
    for negative, positive in YES_NO_PAIRS:
        if set(lowered) == {negative, positive}:
            return sorted(classes, key=lambda c: c.lower() == positive)
    raise InputError(
        f"{source}: column {target!r} holds the text labels {classes[0]!r} and {classes[1]!r}: "
        f"say which one is positive with --positive_class (e.g. --positive_class {classes[1]})"
    )


def _natural_key(value: str) -> tuple[int, float | str]:
    """Numbers sort numerically (so 0/1 puts 1 positive), everything else as text."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


# --------------------------------------------------------------------------- table I/O


def table_format(name: str, head: bytes = b"") -> str:
    """`parquet` or `csv`, from the file name or, failing that, the first bytes."""
    lower = name.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz", ".txt")):
        return "csv"
    if head.startswith(b"PAR1"):
        return "parquet"
    return "csv"


@contextmanager
def local_file(source: str, settings: Settings | None = None) -> Iterator[Path]:
    """A local, seekable path for a source given as path, file://, s3:// or http(s):// URL."""
    parsed = urlparse(source)
    if parsed.scheme == "s3":
        bucket_root = f"s3://{parsed.netloc}"
        store = ObjectStore.from_url(bucket_root, settings or Settings())
        try:
            with store.local_copy(parsed.path.lstrip("/")) as path:
                yield path
        except StoreError as exc:
            raise InputError(str(exc)) from exc
        return
    if parsed.scheme in ("http", "https"):
        suffix = "".join(Path(parsed.path).suffixes)
        with tempfile.TemporaryDirectory(prefix="batchscore-") as tmp:
            path = Path(tmp) / f"download{suffix}"
            try:
                urllib.request.urlretrieve(source, path)  # noqa: S310 - the user's own URL
            except OSError as exc:
                raise InputError(f"{source}: cannot download: {exc}") from exc
            yield path
        return
    path = Path(parsed.path if parsed.scheme == "file" else source)
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    yield path


def iter_tables(
    source: str,
    settings: Settings | None = None,
    batch_rows: int = 100_000,
    numeric_columns: Sequence[str] = (),
    text_columns: Sequence[str] = (),
) -> Iterator[pa.Table]:
    """The table in Arrow tables of at most `batch_rows` rows, whatever its format and place.

    `numeric_columns` are parsed as float64 (correctly rounded, so row keys match any
    client's); a value that is not a number raises an `InputError` naming column and row.
    `text_columns` (ids) are read from a CSV as written: `007` stays `007`, not 7.
    """
    with local_file(source, settings) as path:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        if not head:
            raise InputError(f"{source}: the file is empty")
        kind = table_format(str(path), head)
        if kind == "csv" and b"\0" in head and not str(path).endswith(".gz"):
            raise InputError(f"{source}: not a CSV or Parquet file (binary content)")
        if kind == "parquet":
            yield from _parquet_tables(path, source, batch_rows)
        else:
            yield from _csv_tables(path, source, batch_rows, numeric_columns, text_columns)


def iter_frames(
    source: str,
    settings: Settings | None = None,
    batch_rows: int = 100_000,
    numeric_columns: Sequence[str] = (),
    text_columns: Sequence[str] = (),
) -> Iterator[pd.DataFrame]:
    """`iter_tables`, as DataFrames."""
    for table in iter_tables(source, settings, batch_rows, numeric_columns, text_columns):
        yield table.to_pandas()


def read_frame(
    source: str, settings: Settings | None = None, text_columns: Sequence[str] = ()
) -> pd.DataFrame:
    """The whole table as one DataFrame (for training-sized data)."""
    import pandas as pd

    frames = list(iter_frames(source, settings, text_columns=text_columns))
    if not frames:
        raise InputError(f"{source}: the table has a header but no rows")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _parquet_tables(path: Path, source: str, batch_rows: int) -> Iterator[pa.Table]:
    """Row groups decoded whole (columns in parallel, ~2x faster here than
    `iter_batches`), regrouped into tables of `batch_rows` without copying; memory
    follows the batch plus one row group."""
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{source}: not a readable Parquet file: {exc}") from exc
    pending: list[pa.Table] = []
    pending_rows = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        while table.num_rows:
            take = min(batch_rows - pending_rows, table.num_rows)
            pending.append(table.slice(0, take))
            pending_rows += take
            table = table.slice(take)
            if pending_rows == batch_rows:
                yield pa.concat_tables(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.concat_tables(pending)


_ARROW_CELL_ERROR = re.compile(r"column #(\d+): Row #(\d+): (.*)", re.DOTALL)


def _csv_tables(
    path: Path,
    source: str,
    batch_rows: int,
    numeric_columns: Sequence[str],
    text_columns: Sequence[str] = (),
) -> Iterator[pa.Table]:
    types = {**{c: pa.float64() for c in numeric_columns}, **{c: pa.string() for c in text_columns}}
    convert = pacsv.ConvertOptions(column_types=types)
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=READ_BLOCK_BYTES),
            convert_options=convert,
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise InputError(f"{source}: the file is empty") from exc
        located = _locate_bad_number(path, source, numeric_columns)
        raise (located or InputError(f"{source}: not a readable CSV file: {exc}")) from exc
    columns = reader.schema.names
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            located = _locate_bad_number(path, source, numeric_columns)
            raise (located or _csv_cell_error(exc, source, columns)) from exc
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= batch_rows:
            table = pa.Table.from_batches(pending, reader.schema)
            yield table.slice(0, batch_rows).combine_chunks()
            rest = table.slice(batch_rows)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending, reader.schema).combine_chunks()


def _locate_bad_number(
    path: Path, source: str, numeric_columns: Sequence[str]
) -> InputError | None:
    """The first value of `numeric_columns` that is not a number, with its column and row.

    Arrow's streaming reader names neither the column nor the row of a conversion error,
    so on that (error-only) path the file is read again with those columns as text.
    """
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in numeric_columns}, strings_can_be_null=True
    )
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=READ_BLOCK_BYTES),
            convert_options=convert,
        )
        rows = 0
        for batch in reader:
            bad = [
                (index, name)
                for name in numeric_columns
                if name in batch.schema.names
                for index in [_first_not_number(batch.column(name))]
                if index is not None
            ]
            if bad:
                index, name = min(bad)
                value = batch.column(name)[index].as_py()
                return InputError(
                    f"{source}: column {name!r}, row {rows + index + 1}: {value!r} is not a number"
                )
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        return None
    return None


def _first_not_number(column: pa.Array) -> int | None:
    """Index of the first value Arrow cannot parse as float64 (bisection over casts)."""

    def parses(values: pa.Array) -> bool:
        try:
            values.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
        return True

    if parses(column):
        return None
    low, high = 0, len(column)  # the first bad index lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if parses(column.slice(low, middle - low)):
            low = middle
        else:
            high = middle
    return low


def _csv_cell_error(exc: pa.ArrowInvalid, source: str, columns: list[str]) -> InputError:
    match = _ARROW_CELL_ERROR.search(str(exc))
    if not match:
        return InputError(f"{source}: not a readable CSV file: {exc}")
    column = columns[int(match.group(1))]
    # Arrow counts the header as row 1 of the file; we count data rows from 1.
    row = int(match.group(2)) - 1
    return InputError(f"{source}: column {column!r}, row {row}: {match.group(3).strip()}")


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


def _not_finite(source: str, column: str, row: int, value: float) -> InputError:
    return InputError(
        f"{source}: column {column!r}, row {row}: {value} is not a finite number "
        "(rows with NaN or inf are rejected)"
    )


def to_feature_frame(
    frame: pd.DataFrame,
    feature_columns: Sequence[str],
    source: str,
    first_row: int = 1,
    allowed_extra: Sequence[str] = (),
) -> pd.DataFrame:
    """The feature columns, in training order, as finite float64; anything else is an error.

    Columns beyond the features (and `allowed_extra`, such as the id column) are ignored
    with a warning: a scoring table often carries labels or metadata beside its features.
    """
    import pandas as pd

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
                    f"{source}: column {column!r}, row {first_row + at}: "
                    f"{values.iloc[at]!r} is not a number"
                )
            features[column] = numbers
    matrix = features.to_numpy(dtype="float64")
    finite = np.isfinite(matrix)
    if not finite.all():
        row, col = (int(i[0]) for i in np.nonzero(~finite))
        raise _not_finite(source, feature_columns[col], first_row + row, matrix[row, col])
    return pd.DataFrame(matrix, columns=list(feature_columns), index=frame.index)


def to_feature_table(
    table: pa.Table,
    feature_columns: Sequence[str],
    source: str,
    first_row: int = 1,
    allowed_extra: Sequence[str] = (),
) -> pa.Table:
    """`to_feature_frame` for Arrow tables: the same checks and errors, without the copies
    into and out of pandas when every feature column is already numeric (the usual case)."""
    _check_columns(table.column_names, feature_columns, source, first_row, allowed_extra)
    columns = [table.column(name) for name in feature_columns]
    if not all(pa.types.is_integer(c.type) or pa.types.is_floating(c.type) for c in columns):
        features = table.select(list(feature_columns)).to_pandas()
        frame = to_feature_frame(features, feature_columns, source, first_row)
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
        raise _not_finite(source, feature_columns[index], first_row + row, value)
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
    from batchscore.keys import BAD_ID_REASON, bad_ids

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
        values, problems = _as_finite(table.column(name).combine_chunks())
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


def _as_finite(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
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
    elif not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise InputError(f"column of type {column.type} cannot hold feature values")
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

"""Table I/O: CSV and Parquet, local or remote, read in batches.

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
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscore.config import Settings
from batchscore.rows.errors import InputError
from batchscore.storage.object_store import ObjectStore, StoreError

if TYPE_CHECKING:  # imported where used: the batch flow's `load_data` needs no pandas
    import pandas as pd

log = logging.getLogger(__name__)

READ_BLOCK_BYTES = 16 << 20


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

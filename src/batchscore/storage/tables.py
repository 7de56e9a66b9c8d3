"""Table I/O: CSV and Parquet, local or remote, read in batches.

Tables are read in batches so memory follows the batch size, not the table. Every
problem with an input is an `InputError` naming the file, and the column and data row
(1-based, header excluded) where one applies.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscore.config import Settings
from batchscore.rows.errors import InputError
from batchscore.storage.object_store import ObjectStore, StoreError
from batchscore.storage.sources import HTTP_TIMEOUT_SECONDS, http_error, http_request, resolve

if TYPE_CHECKING:  # imported where used: the batch flow's `load_data` needs no pandas
    import pandas as pd

log = logging.getLogger(__name__)

READ_BLOCK_BYTES = 16 << 20
_SKIP_BYTES = 64 << 10  # read while looking for the line start after a range's offset


# ------------------------------------------------------------------- ranges of a file


def csv_header(handle: BinaryIO, source: str) -> tuple[list[str], int]:
    """A CSV's column names and the byte where its data starts, from its first line only."""
    head = b""
    while b"\n" not in head:
        chunk = handle.read(_SKIP_BYTES)
        if not chunk:
            break
        head += chunk
    line, newline, _ = head.partition(b"\n")
    if not line.strip():
        raise InputError(f"{source}: the file is empty")
    if b"\0" in head[:4096]:
        raise InputError(f"{source}: not a CSV or Parquet file (binary content)")
    if line.count(b'"') % 2:
        raise InputError(f"{source}: the header holds a quoted line break, which is not supported")
    try:
        names = pacsv.read_csv(
            pa.py_buffer(line + b"\n"),
            read_options=pacsv.ReadOptions(use_threads=False),
        ).column_names
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: not a readable CSV file: {exc}") from exc
    return names, len(line) + len(newline)


def csv_blocks(
    handle: BinaryIO, start: int, end: int, data_start: int, block_bytes: int = READ_BLOCK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """The whole lines of a CSV that start in `[start, end)`, as (offset, bytes) blocks.

    A range that does not open on a line start begins at the first line after its offset
    (the line in progress belongs to the range before), and reads through the line that
    crosses its end: ranges cut anywhere cover every line exactly once, as Spark's splits
    do. Only the range (plus that one line) is read.
    """
    position = max(start, data_start)
    if position > data_start:  # does a line begin exactly at `position`?
        handle.seek(position - 1)
        while True:
            chunk = handle.read(_SKIP_BYTES)
            if not chunk:
                return
            newline = chunk.find(b"\n")
            if newline >= 0:
                position += newline
                break
            position += len(chunk)
    handle.seek(position)
    carry = b""
    while position < end:
        # Up to the range's end and a little more for the line crossing it: no more.
        reading = position + len(carry)
        chunk = handle.read(min(block_bytes, max(end - reading, 0) + _SKIP_BYTES))
        if not chunk:
            if carry:
                yield position, carry
            return
        data = carry + chunk
        last = end - 1 - position  # index of the range's last byte in `data`
        if last < len(data):
            newline = data.find(b"\n", last)
            if newline >= 0:
                yield position, data[: newline + 1]
                return
            carry = data  # the line crossing the end goes on
            continue
        newline = data.rfind(b"\n")
        if newline < 0:
            carry = data
            continue
        yield position, data[: newline + 1]
        carry, position = data[newline + 1 :], position + newline + 1


def quoted_line_break(data: bytes) -> int | None:
    """Offset in `data` of the first line holding an unbalanced quote (a value with a line
    break in it), or None. Ranges are cut at line breaks, so such a file is refused."""
    if b'"' not in data:
        return None
    offset = 0
    for line in data.split(b"\n"):
        if line.count(b'"') % 2:
            return offset
        offset += len(line) + 1
    return None


def parse_csv_block(
    data: bytes, columns: Sequence[str], types: dict[str, pa.DataType], include: Sequence[str]
) -> pa.Table:
    """Complete CSV lines (no header) as a table of the `include` columns."""
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=list(columns), block_size=READ_BLOCK_BYTES),
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(include), strings_can_be_null=False
        ),
    )


def line_offsets(data: bytes) -> np.ndarray:
    """Byte offset in `data` of each non-empty line, in order: the rows the CSV reader
    returns for it (it skips empty lines)."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(data)]])
    width = stops - starts
    carriage = np.zeros(len(starts), dtype=bool)
    inside = width > 0
    carriage[inside] = np.frombuffer(data, np.uint8)[starts[inside]] == 13
    empty = (width == 0) | ((width == 1) & carriage)
    return starts[~empty]


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
    """A local, seekable path for a source given as path, file://, s3:// or http(s):// URL
    (`${NAME}` references resolved here, where it is opened; errors name it as given)."""
    parsed = urlparse(resolve(source))
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
                request = http_request(source)
                with (
                    urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response,  # noqa: S310
                    open(path, "wb") as out,
                ):
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                raise http_error(source, exc) from exc
            yield path
        return
    path = Path(parsed.path if parsed.scheme == "file" else resolve(source))
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

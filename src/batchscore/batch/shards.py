"""Plan a batch input into shards from its metadata; read and check one shard's rows.

`plan_shards` (the flow's `load_data`) reads no row: it lists the input's files and reads
their Parquet footers and CSV header lines, then cuts the input into pieces (row ranges
of Parquet files, byte ranges of CSV files aligned to line starts) and groups them into
shards. Each scoring task reads its own pieces straight from the store, a block at a time
(`read_shard`), and checks every row there: nothing is copied, no task reads the whole
input, and a task's memory follows the block, not the shard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from batchscore.config import Settings
from batchscore.rows.errors import InputError
from batchscore.sizing import machine_cores, remote, shard_rows_for_memory
from batchscore.storage.sources import SourceFile

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

BAD_ROWS = ("reject", "quarantine")
BLOCK_ROWS = 50_000  # rows per block read from a Parquet piece
_SAMPLE_BYTES = 64 << 10  # a CSV's first data bytes, to estimate its row count for sizing
REJECTED_COLUMNS = ("file", "row", "column", "value", "reason")


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input file: rows `[start, end)` of a Parquet file, or the
    lines of a CSV that begin in bytes `[start, end)`."""

    id: int  # position in the input (pieces of one file are numbered in file order)
    file: SourceFile
    kind: str  # "parquet", "csv" or "csv.gz" (read whole: gzip cannot seek)
    start: int
    end: int
    columns: tuple[str, ...]
    data_start: int = 0  # CSV: the byte after the header line

    @property
    def numbered(self) -> bool:
        """Rows have their number in the file (else a CSV range names the byte offset)."""
        return self.kind != "csv" or self.start <= self.data_start


@dataclass(frozen=True)
class Shard:
    """What one scoring task reads: its pieces in input order, and how to check them."""

    index: int
    pieces: tuple[Piece, ...]
    feature_columns: tuple[str, ...]
    id_column: str | None
    quarantine: bool
    folder: str  # `batch/<run>`: where a quarantining shard writes its rejected rows


@dataclass(frozen=True)
class ShardPlan:
    """The input planned into shards; after the run (`merge_rejected`), what was read."""

    shards: list[Shard]
    rows_read: int  # planned: Parquet rows plus a CSV estimate; merged: exact
    rows_rejected: int = 0
    rejected_uri: str | None = None  # `batch/<run>/rejected.csv`: file, row, column, value, reason
    files: int = 1
    pieces: list[Piece] | None = None


@dataclass(frozen=True)
class _FileInfo:
    file: SourceFile
    kind: str
    columns: tuple[str, ...]
    rows: int  # exact for Parquet, estimated for CSV
    data_start: int = 0


def plan_shards(
    input_uri: str,
    feature_columns: list[str],
    shard_rows: int | None,
    run_id: str,
    settings: Settings,
    bad_rows: str = "reject",
    max_tasks: int | None = None,
) -> ShardPlan:
    """Cut the input into shards from metadata alone; no row is read or copied.

    Structural problems are found here and reject the input whole, naming the file: no
    such file, not a table, a header without rows, a missing feature or id column, files
    of one input whose columns differ. Bad values are found by the shards (`read_shard`).
    `shard_rows` None: locally one shard per core (`max_tasks`; one per BLOCK_ROWS rows
    for a smaller input), each streaming its pieces in turn, so the run's memory does not
    follow the input's size; in a pod (Kubernetes, AWS Batch) shards of
    `sizing.SHARD_FEATURE_BYTES`, run side by side. With
    `shard_rows`, one shard (task) per about that many rows, as asked. `max_tasks` groups
    the pieces into at most that many shards.
    """
    from batchscore.storage.sources import list_files

    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, not {bad_rows!r}")
    if shard_rows is not None and shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, not {shard_rows}")
    infos = [_describe(file, settings) for file in list_files(input_uri, settings)]
    _check_columns(infos, feature_columns, settings.id_column, input_uri)
    total = sum(info.rows for info in infos)
    if not total:
        raise InputError(f"{_shown(input_uri)}: the table has a header but no rows")
    cores = machine_cores()
    if max_tasks is None and shard_rows is None and not remote():
        # A task per core, but none for less than a block: a task costs ~1.3 s of CPU to
        # start (scikit-learn's imports), while a block scores in ~0.2 s. The test split
        # (114 rows) as one task instead of two: 6.4-6.8 CPU-s a run instead of 8.5-9.3.
        max_tasks = min(cores, math.ceil(total / BLOCK_ROWS))  # total > 0: at least one
    if shard_rows is None:
        per_task = shard_rows_for_memory(len(feature_columns))
        parts = math.ceil(total / per_task) if remote() else max(1, max_tasks or cores)
    else:
        parts = math.ceil(total / shard_rows)
    parts = max(1, min(parts, total))
    pieces = _cut(infos, parts)
    tasks = min(len(pieces), max_tasks) if max_tasks else len(pieces)
    folder = f"batch/{run_id.replace('/', '-')}"
    shards = [
        Shard(
            index,
            tuple(group),
            tuple(feature_columns),
            settings.id_column,
            bad_rows == "quarantine",
            folder,
        )
        for index, group in enumerate(_group(pieces, tasks))
    ]
    log.info(
        "%s: %d file(s), ~%d rows, %d piece(s) in %d shard(s) (%d cores)",
        _shown(input_uri), len(infos), total, len(pieces), len(shards), cores,
    )  # fmt: skip
    return ShardPlan(shards, total, files=len(infos), pieces=pieces)


def _shown(uri: str) -> str:
    from batchscore.storage.sources import masked

    return masked(uri)


def _describe(file: SourceFile, settings: Settings) -> _FileInfo:
    """A file's format, columns and (estimated) rows, from its footer or header line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchscore.storage.sources import open_source, resolve
    from batchscore.storage.tables import csv_header, table_format

    if not file.size:
        raise InputError(f"{file.shown}: the file is empty")
    name = resolve(file.uri).split("?", 1)[0]  # its suffix, even under `${SIGNED_URL}`
    with open_source(file, settings) as handle:
        head = handle.read(4)
        kind = table_format(name, head)
        handle.seek(0)
        if kind == "parquet":
            try:
                meta = pq.ParquetFile(handle).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{file.shown}: not a readable Parquet file: {exc}") from exc
            return _FileInfo(
                file, "parquet", tuple(meta.schema.to_arrow_schema().names), meta.num_rows
            )
        if name.lower().endswith(".gz"):
            return _gzip_info(file, handle)
        columns, data_start = csv_header(handle, file.shown)
        handle.seek(data_start)
        sample = handle.read(_SAMPLE_BYTES)
    if not sample.strip():
        return _FileInfo(file, "csv", tuple(columns), 0, data_start)
    # Rows estimated from the first 64 KiB's line length: for sizing the shards only.
    per_row = len(sample) / max(1, sample.count(b"\n"))
    rows = max(1, round((file.size - data_start) / per_row))
    return _FileInfo(file, "csv", tuple(columns), rows, data_start)


def _gzip_info(file: SourceFile, handle) -> _FileInfo:
    """A gzip CSV cannot be cut into ranges: one piece, its columns from the first line."""
    import gzip

    from batchscore.storage.tables import csv_header

    with gzip.GzipFile(fileobj=handle) as text:
        columns, data_start = csv_header(text, file.shown)
        text.seek(data_start)
        has_rows = bool(text.read(_SAMPLE_BYTES).strip())
    # About 4x compression for numbers as text: for sizing only.
    rows = max(1, file.size * 4 // max(1, data_start)) if has_rows else 0
    return _FileInfo(file, "csv.gz", tuple(columns), rows, 0)


def _check_columns(
    infos: list[_FileInfo], feature_columns: Sequence[str], id_column: str | None, source: str
) -> None:
    first = infos[0]
    for info in infos[1:]:
        if set(info.columns) != set(first.columns):
            missing = sorted(set(first.columns) - set(info.columns))
            extra = sorted(set(info.columns) - set(first.columns))
            raise InputError(
                f"{info.file.shown}: its columns differ from {first.file.shown}'s "
                f"(missing {missing}, extra {extra}); every file of one input needs the same"
            )
    missing = [c for c in feature_columns if c not in first.columns]
    if missing:
        raise InputError(
            f"{first.file.shown}: missing feature column(s) {missing}; the model needs "
            f"{len(feature_columns)} columns: {list(feature_columns)}"
        )
    if id_column and id_column not in first.columns:
        raise InputError(
            f"{first.file.shown}: no id column {id_column!r} (BATCHSCORE_ID_COLUMN); "
            f"columns: {list(first.columns)}"
        )
    extra = [c for c in first.columns if c not in feature_columns and c != id_column]
    if extra:
        log.warning("%s: ignoring column(s) the model does not use: %s", source, extra)


def _cut(infos: list[_FileInfo], parts: int) -> list[Piece]:
    """The input's rows cut into `parts` about equal pieces, never across a file."""
    total = sum(info.rows for info in infos)
    bounds = [round(total * k / parts) for k in range(parts + 1)]
    pieces: list[Piece] = []
    offset = 0
    for info in infos:
        rows = info.rows
        cuts = [b - offset for b in bounds if offset < b < offset + rows]
        offset += rows
        if not rows:
            continue
        if info.kind == "csv.gz":
            cuts = []
        edges = [0, *cuts, rows]
        for low, high in zip(edges, edges[1:], strict=False):
            if info.kind == "parquet":
                start, end = low, high
            elif info.kind == "csv":
                span = info.file.size - info.data_start
                start = info.data_start + (span * low // rows if low else 0)
                end = info.data_start + span * high // rows if high < rows else info.file.size
            else:
                start, end = 0, info.file.size
            if end > start:
                pieces.append(
                    Piece(
                        len(pieces), info.file, info.kind, start, end, info.columns, info.data_start
                    )
                )
    return pieces


def _group(pieces: list[Piece], tasks: int) -> list[list[Piece]]:
    """Consecutive pieces into `tasks` groups of about equal size (bytes or rows)."""
    if tasks >= len(pieces):
        return [[piece] for piece in pieces]
    sizes = [piece.end - piece.start for piece in pieces]
    # Each piece weighs its span (Parquet rows, CSV bytes): balanced for an input of one
    # format; a mixed one is only roughly balanced, which costs time, never correctness.
    weights = [size / max(1, sum(sizes)) for size in sizes]
    groups: list[list[Piece]] = [[] for _ in range(tasks)]
    done = 0.0
    for piece, weight in zip(pieces, weights, strict=True):
        slot = min(tasks - 1, int((done + weight / 2) * tasks))
        groups[slot].append(piece)
        done += weight
    return [group for group in groups if group]


# ------------------------------------------------------------------------- reading


@dataclass
class Block:
    """Checked rows of one piece, ready to key and score."""

    features: pa.Table  # the feature columns as finite float64, good rows only
    ids: pa.Array | None  # the id column as text (with BATCHSCORE_ID_COLUMN)
    rejected: pa.Table | None  # quarantine: piece, row (in the piece), column, value, reason
    rows: int  # rows read, good and rejected
    piece: int


def read_shard(shard: Shard, settings: Settings) -> Iterator[Block]:
    """A shard's rows, a block at a time, each row checked by the one row rule.

    Under `reject` the first bad row raises an `InputError` naming the file, the column
    and the row (its number in the file, or for a CSV range after the first its byte
    offset); under `quarantine` bad rows come back in `Block.rejected`.
    """
    from batchscore.storage.sources import open_source

    for piece in shard.pieces:
        with open_source(piece.file, settings) as handle:
            if piece.kind == "parquet":
                blocks = _parquet_blocks(handle, piece, shard)
            elif piece.kind == "csv":
                blocks = _csv_blocks(handle, piece, shard)
            else:
                blocks = _gzip_blocks(handle, piece, shard)
            read = 0
            for table, locate in blocks:
                yield _check(table, locate, read, piece, shard)
                read += table.num_rows


def _needed(shard: Shard) -> list[str]:
    return [*shard.feature_columns, *([shard.id_column] if shard.id_column else [])]


def _parquet_blocks(handle, piece: Piece, shard: Shard):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle, pre_buffer=False)
    meta = parquet.metadata
    first = 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        low, high = max(piece.start, first), min(piece.end, first + rows)
        if low < high:
            at = first
            for batch in parquet.iter_batches(
                BLOCK_ROWS, row_groups=[group], columns=_needed(shard)
            ):
                lo, hi = max(low, at), min(high, at + batch.num_rows)
                if lo < hi:
                    table = _table(batch.slice(lo - at, hi - lo))
                    yield table, _numbered(lo)
                at += batch.num_rows
                if at >= high:
                    break
        first += rows
        if first >= piece.end:
            break


def _table(batch) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def _numbered(first_index: int):
    """Row `i` of a block whose first row is row `first_index` (0-based) of its file."""
    return lambda i: f"row {first_index + i + 1}"


def _csv_blocks(handle, piece: Piece, shard: Shard):
    import pyarrow as pa

    from batchscore.storage.tables import (
        csv_blocks,
        line_offsets,
        parse_csv_block,
        quoted_line_break,
    )

    types = _csv_types(shard)
    rows_before = 0
    for offset, data in csv_blocks(handle, piece.start, piece.end, piece.data_start):
        bad = quoted_line_break(data)
        if bad is not None:
            raise InputError(
                f"{piece.file.shown}: a quoted value holds a line break (the line at byte "
                f"offset {offset + bad}); inputs are read in byte ranges cut at line breaks: "
                "remove line breaks from values, or convert the file to Parquet"
            )
        locate = _numbered(rows_before) if piece.numbered else _at_byte(offset, data, line_offsets)
        try:
            table = parse_csv_block(data, piece.columns, types, _needed(shard))
        except pa.ArrowInvalid as exc:
            if shard.quarantine:
                raise _csv_error(piece, offset, exc) from exc
            text = {c: pa.string() for c in _needed(shard)}
            try:
                table = parse_csv_block(data, piece.columns, text, _needed(shard))
            except pa.ArrowInvalid as again:
                raise _csv_error(piece, offset, again) from again
        rows_before += table.num_rows
        yield table, locate


def _at_byte(offset: int, data: bytes, line_offsets):
    starts: list = []

    def locate(i: int) -> str:
        if not starts:
            starts.append(line_offsets(data))
        return f"the row at byte offset {offset + int(starts[0][i])}"

    return locate


def _csv_types(shard: Shard) -> dict:
    import pyarrow as pa

    if shard.quarantine:  # a bad cell is a row to set aside, not an unreadable block
        return {c: pa.string() for c in _needed(shard)}
    types = {c: pa.float64() for c in shard.feature_columns}
    if shard.id_column:
        types[shard.id_column] = pa.string()  # `007` stays `007`
    return types


def _csv_error(piece: Piece, offset: int, exc: Exception) -> InputError:
    return InputError(f"{piece.file.shown}: not a readable CSV near byte offset {offset}: {exc}")


def _gzip_blocks(handle, piece: Piece, shard: Shard):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    text = {c: pa.string() for c in _needed(shard)}
    stream = pa.CompressedInputStream(pa.PythonFile(handle, mode="r"), "gzip")
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            convert_options=pacsv.ConvertOptions(
                column_types=text, include_columns=_needed(shard), strings_can_be_null=False
            ),
        )
        rows = 0
        for batch in reader:
            yield _table(batch), _numbered(rows)
            rows += batch.num_rows
    except pa.ArrowInvalid as exc:
        raise InputError(f"{piece.file.shown}: not a readable CSV file: {exc}") from exc


def _check(table: pa.Table, locate, read: int, piece: Piece, shard: Shard) -> Block:
    """The one row rule over a block: reject raises at the first bad row, quarantine sets
    bad rows aside (numbered within the piece; `merge_rejected` makes them file rows)."""
    import pyarrow as pa

    from batchscore.rows.keys import bad_ids
    from batchscore.rows.validation import partition_rows, to_feature_table

    source = piece.file.shown
    features = list(shard.feature_columns)
    id_column = shard.id_column
    keep = [id_column] if id_column else []
    if shard.quarantine:
        part = partition_rows(table, features, source, read + 1, keep, id_column)
        good = part.good
        rejected = part.rejected.add_column(0, "piece", pa.repeat(piece.id, part.rejected.num_rows))
        ids = good.column(id_column).combine_chunks().cast(pa.string()) if id_column else None
        return Block(good.select(features), ids, rejected, table.num_rows, piece.id)
    checked = to_feature_table(table, features, source, allowed_extra=keep, locate=locate)
    ids = None
    if id_column:
        column = table.column(id_column).combine_chunks()
        bad = bad_ids(column)
        if bad.any():
            at = int(bad.argmax())
            raise InputError(
                f"{source}: column {id_column!r}, {locate(at)}: id {column[at].as_py()!r} is "
                "empty or holds whitespace, ':' or a glob character, so it cannot be a Redis "
                "key part"
            )
        ids = column.cast(pa.string())
    return Block(checked, ids, None, table.num_rows, piece.id)


# ------------------------------------------------------------------------- after the run


class ShardCounts(Protocol):
    """What `merge_rejected` needs of a shard's result (`scoring.ShardResult`)."""

    rows_read: int
    rows_rejected: int
    rejected_uri: str | None
    piece_rows: dict[int, int]


def merge_rejected(
    plan: ShardPlan, results: Sequence[ShardCounts], settings: Settings
) -> ShardPlan:
    """The plan with what the shards read: exact rows read and rejected, and the shards'
    rejected rows merged into `batch/<run>/rejected.csv` in input order, each numbered by
    its row in its file (the shards' own parts are deleted)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from batchscore.storage.object_store import ObjectStore

    rows_read = sum(r.rows_read for r in results)
    rejected = sum(r.rows_rejected for r in results)
    parts = [r.rejected_uri for r in results if r.rejected_uri]
    if not parts:
        return replace(plan, rows_read=rows_read, rows_rejected=rejected, rejected_uri=None)
    store = ObjectStore.from_settings(settings)
    pieces = {p.id: p for p in plan.pieces or [p for s in plan.shards for p in s.pieces]}
    # Rows of each piece in file order: a CSV range's rows count after those before it.
    read = {piece: rows for r in results for piece, rows in r.piece_rows.items()}
    base: dict[int, int] = {}
    running: dict[str, int] = {}
    for piece_id in sorted(pieces):
        piece = pieces[piece_id]
        if piece.kind == "parquet":
            base[piece_id] = piece.start
        else:
            base[piece_id] = running.get(piece.file.uri, 0)
            running[piece.file.uri] = base[piece_id] + read.get(piece_id, 0)
    tables = []
    for uri in parts:
        table = pacsv.read_csv(
            pa.py_buffer(store.get_bytes(uri)),
            convert_options=pacsv.ConvertOptions(
                column_types={"value": pa.string(), "column": pa.string(), "reason": pa.string()},
                strings_can_be_null=False,
            ),
        )
        tables.append(table)
    merged = pa.concat_tables(tables)
    piece_ids = merged.column("piece").to_pylist()
    rows = [base[p] + r for p, r in zip(piece_ids, merged.column("row").to_pylist(), strict=True)]
    out = pa.table(
        {
            "file": [pieces[p].file.shown for p in piece_ids],
            "row": pa.array(rows, pa.int64()),
            "column": merged.column("column"),
            "value": merged.column("value"),
            "reason": merged.column("reason"),
        }
    )
    order = pc.sort_indices(
        pa.table({"piece": piece_ids, "row": rows}), [("piece", "ascending"), ("row", "ascending")]
    )
    out = out.take(order)
    sink = pa.BufferOutputStream()
    pacsv.write_csv(out, sink)
    uri = store.put_bytes(f"{plan.shards[0].folder}/rejected.csv", sink.getvalue().to_pybytes())
    for part in parts:
        store.delete(part)
    log.warning("%d of %d rows rejected, listed in %s", rejected, rows_read, uri)
    return replace(plan, rows_read=rows_read, rows_rejected=rejected, rejected_uri=uri)


def write_rejected_part(shard: Shard, tables: list[pa.Table], settings: Settings) -> str | None:
    """A quarantining shard's rejected rows, as a CSV part that `merge_rejected` merges."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from batchscore.storage.object_store import ObjectStore

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.concat_tables(tables), sink)
    store = ObjectStore.from_settings(settings)
    key = f"{shard.folder}/rejected/part-{shard.index:05d}.csv"
    return store.put_bytes(key, sink.getvalue().to_pybytes())

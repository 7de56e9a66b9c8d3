"""Plan a batch input into shards, one per scoring task."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, BinaryIO

from batchscore.config import Settings
from batchscore.sizing import default_shard_rows, machine_cores

if TYPE_CHECKING:
    import pyarrow as pa


log = logging.getLogger(__name__)


BAD_ROWS = ("reject", "quarantine")


@dataclass(frozen=True)
class ShardPlan:
    """The input cut into scratch shards, and what was left out of them."""

    shards: list[str]
    rows_read: int
    rows_rejected: int = 0
    rejected_uri: str | None = None  # `batch/<run>/rejected.csv`: row, column, value, reason


def plan_shards(
    input_uri: str,
    feature_columns: list[str],
    shard_rows: int | None,
    run_id: str,
    settings: Settings,
    bad_rows: str = "reject",
) -> ShardPlan:
    """Validate every row of the input and cut it into Arrow IPC shards in the store.

    The shards are this run's scratch space: nothing readers see changes here, so an
    input error found in the last row still leaves Redis and the database untouched.
    `shard_rows` None: sized from the cores (`sizing.default_shard_rows`).
    `bad_rows="quarantine"`: rows with a missing, non-numeric or non-finite feature (or,
    with an id column, an id that cannot be a key) are left out and listed in
    `rejected.csv` instead of failing the input; a structural error (a missing column, an
    unreadable file) still rejects it whole.
    """
    import pyarrow as pa

    from batchscore.rows.errors import InputError
    from batchscore.rows.keys import id_keys
    from batchscore.rows.validation import partition_rows, to_feature_table
    from batchscore.storage.object_store import ObjectStore
    from batchscore.storage.tables import iter_tables

    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, not {bad_rows!r}")
    if shard_rows is None:
        cores = machine_cores()
        rows = _known_rows(input_uri)
        shard_rows = default_shard_rows(rows, len(feature_columns), cores)
        log.info("%s rows, %d cores: shards of %d rows", rows or "unknown", cores, shard_rows)
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, not {shard_rows}")
    quarantine = bad_rows == "quarantine"
    store = ObjectStore.from_settings(settings)
    folder = f"batch/{run_id.replace('/', '-')}"
    id_column = settings.id_column
    extra = [id_column] if id_column else []
    shards: list[str] = []
    rejected: list[pa.Table] = []
    rows = 0
    try:
        for batch in iter_tables(
            input_uri,
            settings,
            shard_rows,
            # Quarantine reads features as text, so that a bad cell is a row to set aside,
            # not an unreadable file.
            numeric_columns=() if quarantine else feature_columns,
            text_columns=[*extra, *feature_columns] if quarantine else extra,
        ):
            if id_column and id_column not in batch.column_names:
                raise InputError(
                    f"{input_uri}: no id column {id_column!r} (BATCHSCORE_ID_COLUMN); "
                    f"columns: {batch.column_names}"
                )
            if quarantine:
                part = partition_rows(batch, feature_columns, input_uri, rows + 1, extra, id_column)
                rejected.append(part.rejected)
                table, source = part.good.select(feature_columns), part.good
            else:
                table = to_feature_table(batch, feature_columns, input_uri, rows + 1, extra)
                source = batch
            if id_column:
                ids = source.column(id_column).to_pandas()
                ids = id_keys(ids, input_uri, id_column, first_row=rows + 1)
                table = table.append_column(id_column, pa.array(ids, pa.string()))
            rows += batch.num_rows
            if table.num_rows:
                key = f"{folder}/shards/part-{len(shards):05d}.arrow"
                shards.append(store.put_stream(key, partial(_write_arrow, table)))
        if not rows:
            raise InputError(f"{input_uri}: the table has a header but no rows")
        if not shards:
            raise InputError(f"{input_uri}: every one of its {rows} rows was rejected")
    except Exception:
        for shard in shards:  # a rejected input leaves no scratch behind
            store.delete(shard)
        raise
    if not quarantine:
        return ShardPlan(shards, rows)
    bad = pa.concat_tables(rejected)
    uri = store.put_bytes(f"{folder}/rejected.csv", _csv_bytes(bad)) if bad.num_rows else None
    if bad.num_rows:
        log.warning("%s: %d of %d rows rejected, listed in %s", input_uri, bad.num_rows, rows, uri)
    return ShardPlan(shards, rows, bad.num_rows, uri)


def _csv_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def _known_rows(input_uri: str) -> int | None:
    """About how many rows a local input holds, for sizing only: a Parquet file's footer,
    or a plain CSV's line count (quoted line breaks overcount a little). Else None."""
    import pyarrow.parquet as pq

    from batchscore.storage.tables import local_file, table_format

    if "://" in input_uri and not input_uri.startswith("file://"):
        return None  # not read twice: shards are sized for memory instead
    try:
        with local_file(input_uri) as path, open(path, "rb") as handle:
            kind = table_format(str(path), handle.read(4))
            if kind == "parquet":
                return pq.ParquetFile(path).metadata.num_rows
            if str(path).endswith(".gz"):
                return None
            handle.seek(0)
            lines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))
            return max(lines - 1, 1)  # less the header
    except Exception:  # unreadable: plan_shards reports it, naming the file
        return None


def _write_arrow(table: pa.Table, out: BinaryIO) -> None:
    """A shard as an Arrow IPC file: scratch that only this run reads back, once, so the
    format with nothing to encode or decode (Parquet took ~5x longer to write)."""
    import pyarrow as pa

    with pa.ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)

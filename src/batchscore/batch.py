"""What BatchProcessingFlow's steps do: load verified models, shard, score, publish.

Memory follows `shard_rows`: the input is read in batches and cut into Arrow shards,
and each shard is scored and written on its own. Nothing holds the whole table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

import pyarrow as pa
from threadpoolctl import threadpool_limits

from batchscore.config import Settings
from batchscore.data import InputError, iter_tables, to_feature_table
from batchscore.keys import first_occurrences, hash_rows, id_keys
from batchscore.models import load_model
from batchscore.online import OnlineStore, SupersededError
from batchscore.scoring import LoadedModel, encode_predictions
from batchscore.store import ObjectStore
from batchscore.tracking import Tracker

log = logging.getLogger(__name__)

SCORE_BLOCK_ROWS = 20_000  # rows per predict call and Redis hand-off inside a shard


@dataclass(frozen=True)
class ModelBundle:
    """The models to score with (champion first) and the schema they were trained on."""

    training_run_id: str
    models: list[LoadedModel]
    feature_columns: list[str]
    classes: tuple[str, str]

    @property
    def champion(self) -> str:
        return self.models[0].name


def load_models(which: str, settings: Settings) -> ModelBundle:
    """The recorded champion (or all models), each checked against its SHA-256 first."""
    with Tracker(settings.resolved_database_url) as tracker:
        records = tracker.model_records(which)
    models = [
        LoadedModel(
            name=r.model,
            estimator=load_model(
                ObjectStore.read_uri(r.model_uri, settings), r.model_sha256, r.model_uri
            ),
            sha256=r.model_sha256,
        )
        for r in records
    ]
    first = records[0]
    return ModelBundle(first.training_run_id, models, first.feature_columns, first.classes)


def default_input(settings: Settings) -> str:
    """The test split of the champion's own training run."""
    with Tracker(settings.resolved_database_url) as tracker:
        return tracker.champion_batch_input()


def plan_shards(
    input_uri: str,
    feature_columns: list[str],
    shard_rows: int,
    run_id: str,
    settings: Settings,
) -> list[str]:
    """Validate every row of the input and cut it into Arrow IPC shards in the store.

    The shards are this run's scratch space: nothing readers see changes here, so an
    input error found in the last row still leaves Redis and the database untouched.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, not {shard_rows}")
    store = ObjectStore.from_settings(settings)
    folder = f"batch/{run_id.replace('/', '-')}/shards"
    id_column = settings.id_column
    extra = [id_column] if id_column else []
    shards: list[str] = []
    rows = 0
    try:
        for batch in iter_tables(
            input_uri, settings, shard_rows, numeric_columns=feature_columns, text_columns=extra
        ):
            table = to_feature_table(batch, feature_columns, input_uri, rows + 1, extra)
            if id_column:
                if id_column not in batch.column_names:
                    raise InputError(
                        f"{input_uri}: no id column {id_column!r} (BATCHSCORE_ID_COLUMN); "
                        f"columns: {batch.column_names}"
                    )
                ids = batch.column(id_column).to_pandas()
                ids = id_keys(ids, input_uri, id_column, first_row=rows + 1)
                table = table.append_column(id_column, pa.array(ids, pa.string()))
            key = f"{folder}/part-{len(shards):05d}.arrow"
            shards.append(store.put_stream(key, partial(_write_arrow, table)))
            rows += batch.num_rows
        if not rows:
            raise InputError(f"{input_uri}: the table has a header but no rows")
    except Exception:
        for shard in shards:  # a rejected input leaves no scratch behind
            store.delete(shard)
        raise
    return shards


def _write_arrow(table: pa.Table, out: BinaryIO) -> None:
    """A shard as an Arrow IPC file: scratch that only this run reads back, once, so the
    format with nothing to encode or decode (Parquet took ~5x longer to write)."""
    with pa.ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)


@dataclass
class ShardResult:
    shard: int
    rows_scored: int
    keys_written: int
    duplicates: int = 0  # rows whose key repeated an earlier row's in the shard: written once
    seconds: dict[str, float] = field(default_factory=dict)


def score_shard(
    shard: int,
    shard_uri: str,
    bundle: ModelBundle,
    version: str,
    settings: Settings,
    ttl_seconds: int | None = None,
    online: OnlineStore | None = None,
) -> ShardResult:
    """Read one shard, key it, predict, and write it under the staged version."""
    clock = _Clock()
    table = pa.ipc.open_file(pa.py_buffer(ObjectStore.read_uri(shard_uri, settings))).read_all()
    features = table.select(bundle.feature_columns).to_pandas()
    id_column = settings.id_column
    clock.lap("read")
    if id_column and id_column in table.column_names:
        keys = table.column(id_column).combine_chunks()
    else:
        keys = hash_rows(features.to_numpy())
    first = first_occurrences(keys)
    if first is not None:
        keys = keys.filter(first)
        features = features.loc[first].reset_index(drop=True)
    clock.lap("key")
    online = online or OnlineStore.from_settings(settings)
    # Scored and sent a block at a time: Redis stores one block while the next is scored.
    # Parallel tasks whose models each spread over every core spin against each other:
    # BATCHSCORE_SCORING_THREADS caps each task's pools (unset: no cap).
    try:
        with (
            threadpool_limits(limits=settings.scoring_threads),
            online.writer(version, shard, ttl_seconds) as writer,
        ):
            for start in range(0, len(keys), SCORE_BLOCK_ROWS):
                block = features.iloc[start : start + SCORE_BLOCK_ROWS]
                values = encode_predictions(bundle.models, block, bundle.classes)
                clock.lap("predict")
                writer.write(keys.slice(start, SCORE_BLOCK_ROWS), values)
                clock.lap("write")
    except SupersededError as exc:
        # A newer run went live meanwhile and retired this version while it was written:
        # delete what this shard wrote after that (each shard does, the last one wins).
        online.discard(version)
        log.warning("shard %s: %s; its keys are deleted", shard, exc)
        return ShardResult(shard, table.num_rows, 0, 0, clock.seconds)
    clock.lap("write")
    written = writer.landed
    duplicates = table.num_rows - len(keys)
    if duplicates:
        log.warning("shard %s: %d duplicate rows written once", shard, duplicates)
    return ShardResult(shard, table.num_rows, written, duplicates, clock.seconds)


@dataclass(frozen=True)
class PublishResult:
    rows_scored: int
    keys_written: int
    published: bool  # False: a newer version was already current, and stays so
    retired: list[str]


def publish(
    run_id: str,
    version: str,
    results: list[ShardResult],
    input_uri: str,
    bundle: ModelBundle,
    settings: Settings,
    scratch: Sequence[str] = (),
) -> PublishResult:
    """Switch readers to the new version once every shard is counted and its sampled keys
    are still in Redis; record the run. A version superseded by a newer live one is
    discarded. Either way the run is over, so its scratch shards are deleted; on an error
    they stay, for `resume`."""
    online = OnlineStore.from_settings(settings)
    rows = sum(r.rows_scored for r in results)
    keys = sum(r.keys_written for r in results)
    record = {
        "input_uri": input_uri,
        "training_run_id": bundle.training_run_id,
        "models": [m.name for m in bundle.models],
        "redis_version": version,
        "rows_scored": rows,
        "keys_written": keys,
        "published": False,
    }
    with Tracker(settings.resolved_database_url) as tracker:
        # Recorded before the switch: a live version always has its lineage row.
        tracker.record_batch(run_id, record)
        published = online.publish(version, keys, len(results))
        if published:
            tracker.mark_published(run_id)
    retired: list[str] = []
    if published:
        try:
            retired = online.retire()
        except Exception as exc:  # housekeeping only: the new version is already live
            log.warning("could not retire old versions: %s", exc)
    else:
        log.warning("%s was superseded by %s: discarded", version, online.current())
        online.discard(version)
    store = ObjectStore.from_settings(settings)
    for uri in scratch:
        store.delete(uri)
    return PublishResult(rows, keys, published, retired)


def stage(
    version: str,
    run_id: str,
    input_uri: str,
    bundle: ModelBundle,
    settings: Settings,
    ttl_seconds: int | None = None,
) -> None:
    """Open the run's Redis version (invisible to readers until `publish`)."""
    OnlineStore.from_settings(settings).stage(
        version,
        {
            "run_id": run_id,
            "input": input_uri,
            "model": bundle.champion,
            "models": ",".join(m.name for m in bundle.models),
            "training_run_id": bundle.training_run_id,
            "feature_columns": bundle.feature_columns,
            "classes": list(bundle.classes),
            # Readers (library, CLI, notebook, HTTP) key rows as this version did.
            **(
                {"key_scheme": "id", "id_column": settings.id_column}
                if settings.id_column
                else {"key_scheme": "feature_hash"}
            ),
        },
        ttl_seconds,
    )


class _Clock:
    """Per-stage wall time, for the benchmark's breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

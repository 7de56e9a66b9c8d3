"""What BatchProcessingFlow's steps do: load verified models, shard, score, publish.

Memory follows `shard_rows`: the input is read in batches and cut into Arrow shards,
and each shard is scored and written on its own. Nothing holds the whole table.

Each Metaflow step is a fresh process that imports this module: the heavy libraries
(pandas, scikit-learn, xgboost, SQLAlchemy, redis) are imported inside the functions that
use them, so a step pays only for what it does (`python -X importtime` to check).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, BinaryIO

from batchscore.config import Settings
from batchscore.sizing import default_shard_rows, machine_cores

if TYPE_CHECKING:
    import pyarrow as pa

    from batchscore.batch_report import BatchReport
    from batchscore.drift import ReferenceProfile
    from batchscore.model_record import ModelRecord
    from batchscore.online import OnlineStore
    from batchscore.scoring import LoadedModel

log = logging.getLogger(__name__)

SCORE_BLOCK_ROWS = 50_000  # rows per predict call and Redis hand-off inside a shard


@dataclass(frozen=True)
class ModelBundle:
    """The models to score with (champion first) and the schema they were trained on."""

    training_run_id: str
    models: list[LoadedModel]
    feature_columns: list[str]
    classes: tuple[str, str]
    reference: ReferenceProfile | None = None  # the training rows' profile, for drift

    @property
    def champion(self) -> str:
        return self.models[0].name

    @property
    def threshold(self) -> float:
        return self.models[0].threshold

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


@dataclass(frozen=True)
class ModelFiles:
    """The recorded models' bytes, each already checked against its SHA-256, champion first.

    What the flow hands its scoring tasks: they deserialise it (`load`), so scikit-learn
    and xgboost are imported only where a model predicts, never in the steps around them.
    """

    records: list[ModelRecord]
    blobs: list[bytes]
    profile: bytes | None = None  # the training run's reference profile, checked likewise

    @property
    def training_run_id(self) -> str:
        return self.records[0].training_run_id

    @property
    def feature_columns(self) -> list[str]:
        return self.records[0].feature_columns

    @property
    def classes(self) -> tuple[str, str]:
        return self.records[0].classes

    @property
    def champion(self) -> str:
        return self.records[0].model

    @property
    def names(self) -> list[str]:
        return [r.model for r in self.records]

    @property
    def threshold(self) -> float:
        return self.records[0].threshold

    @property
    def reference(self) -> ReferenceProfile | None:
        from batchscore.drift import ReferenceProfile

        return ReferenceProfile.from_json(self.profile) if self.profile else None

    def load(self) -> ModelBundle:
        """Deserialise each model (its SHA-256 checked again: the bytes passed through a
        datastore since `fetch_models`)."""
        from batchscore.models import load_model
        from batchscore.scoring import LoadedModel

        models = [
            LoadedModel(
                r.model,
                load_model(blob, r.model_sha256, r.model_uri),
                r.model_sha256,
                threshold=r.threshold,
            )
            for r, blob in zip(self.records, self.blobs, strict=True)
        ]
        return ModelBundle(
            self.training_run_id, models, self.feature_columns, self.classes, self.reference
        )


def find_models(which: str, settings: Settings) -> list[ModelRecord]:
    """Where the recorded champion (or every model) lives, champion first: no model loaded."""
    from batchscore.tracking import Tracker

    with Tracker(settings.resolved_database_url) as tracker:
        return tracker.model_records(which)


def fetch_models(which: str | Sequence[ModelRecord], settings: Settings) -> ModelFiles:
    """The recorded champion (or all models) read from the store by their recorded URIs,
    each refused unless its SHA-256 matches the record; nothing deserialised."""
    from batchscore.models import verify_sha256
    from batchscore.store import ObjectStore

    records = find_models(which, settings) if isinstance(which, str) else list(which)
    blobs = [ObjectStore.read_uri(r.model_uri, settings) for r in records]
    for record, blob in zip(records, blobs, strict=True):
        verify_sha256(blob, record.model_sha256, record.model_uri)
    return ModelFiles(records, blobs, _fetch_profile(records[0], settings))


def _fetch_profile(record: ModelRecord, settings: Settings) -> bytes | None:
    """The champion's training profile, refused unless its SHA-256 matches the record."""
    from batchscore.models import verify_sha256
    from batchscore.store import ObjectStore

    if not record.profile_uri:
        log.warning("%s recorded no reference profile: drift is not checked", record.model)
        return None
    data = ObjectStore.read_uri(record.profile_uri, settings)
    verify_sha256(data, record.profile_sha256, record.profile_uri)
    return data


def load_models(which: str | Sequence[ModelRecord], settings: Settings) -> ModelBundle:
    """The recorded champion (or all models), each checked against its SHA-256 first."""
    return fetch_models(which, settings).load()


def default_input(settings: Settings) -> str:
    """The test split of the champion's own training run."""
    from batchscore.tracking import Tracker

    with Tracker(settings.resolved_database_url) as tracker:
        return tracker.champion_batch_input()


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

    from batchscore.data import InputError, iter_tables, partition_rows, to_feature_table
    from batchscore.keys import id_keys
    from batchscore.store import ObjectStore

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

    from batchscore.data import local_file, table_format

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


@dataclass
class ShardResult:
    shard: int
    rows_scored: int
    keys_written: int
    duplicates: int = 0  # rows whose key repeated an earlier row's in the shard: written once
    seconds: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # the cap on the models' thread pools (None: none)
    profile: dict | None = None  # `drift.BatchProfile` counts of the scored rows


def score_shard(
    shard: int,
    shard_uri: str,
    bundle: ModelBundle,
    version: str,
    settings: Settings,
    ttl_seconds: int | None = None,
    online: OnlineStore | None = None,
    threads: int | None = None,
) -> ShardResult:
    """Read one shard, key it, predict, and write it under the staged version.

    `threads` caps the models' OpenMP/BLAS pools (default: BATCHSCORE_SCORING_THREADS,
    unset: no cap); the flow passes `sizing.scoring_threads`.
    """
    import pyarrow as pa
    from threadpoolctl import threadpool_limits

    from batchscore.drift import BatchProfile
    from batchscore.keys import first_occurrences, hash_rows
    from batchscore.online import OnlineStore, SupersededError
    from batchscore.scoring import encode, predict_all
    from batchscore.store import ObjectStore

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
    # each task's pools are capped (cores / concurrent tasks in the flow).
    threads = threads or settings.scoring_threads
    profile = BatchProfile()
    try:
        with (
            threadpool_limits(limits=threads),
            online.writer(version, shard, ttl_seconds) as writer,
        ):
            for start in range(0, len(keys), SCORE_BLOCK_ROWS):
                block = features.iloc[start : start + SCORE_BLOCK_ROWS]
                outputs = predict_all(bundle.models, block)
                clock.lap("predict")
                if bundle.reference is not None:  # the batch report's counts, as we go
                    _, labels, proba = outputs[0]
                    profile.add(bundle.reference, block.to_numpy(), proba, labels)
                    clock.lap("profile")
                values = encode(outputs, bundle.classes)
                clock.lap("encode")
                writer.write(keys.slice(start, SCORE_BLOCK_ROWS), values)
                clock.lap("write")
    except SupersededError as exc:
        # A newer run went live meanwhile and retired this version while it was written:
        # delete what this shard wrote after that (each shard does, the last one wins).
        online.discard(version)
        log.warning("shard %s: %s; its keys are deleted", shard, exc)
        return ShardResult(shard, table.num_rows, 0, 0, clock.seconds, threads)
    clock.lap("write")
    written = writer.landed
    duplicates = table.num_rows - len(keys)
    if duplicates:
        log.warning("shard %s: %d duplicate rows written once", shard, duplicates)
    return ShardResult(
        shard,
        table.num_rows,
        written,
        duplicates,
        clock.seconds,
        threads,
        profile.to_dict() if bundle.reference is not None else None,
    )


@dataclass(frozen=True)
class PublishResult:
    rows_scored: int
    keys_written: int
    published: bool  # False: blocked by the gate, or a newer version was already current
    retired: list[str]
    report: BatchReport | None = None  # None: the model recorded no reference profile

    @property
    def blocked(self) -> bool:
        return self.report is not None and not self.report.gate.passed


@dataclass(frozen=True)
class GateLimits:
    """What a batch must satisfy to go live (the flow's `--max_drift`, `--max_bad_rows`)."""

    max_drift: float = 0.25
    max_bad_rows: float = 0.0


def publish(
    run_id: str,
    version: str,
    results: list[ShardResult],
    input_uri: str,
    bundle: ModelBundle | ModelFiles,
    settings: Settings,
    scratch: Sequence[str] = (),
    plan: ShardPlan | None = None,
    limits: GateLimits = GateLimits(),  # noqa: B008 - frozen, so one shared default is safe
) -> PublishResult:
    """Gate the batch, then switch readers to it once every shard is counted and its sampled
    keys are still in Redis; record the run and its report.

    A batch the gate blocks stays staged (readers never see it) for `promote`. A version
    superseded by a newer live one is discarded. Either way the run is over, so its scratch
    shards are deleted; on an error they stay, for `resume`.
    """
    from batchscore.online import OnlineStore
    from batchscore.store import ObjectStore
    from batchscore.tracking import Tracker

    started = time.perf_counter()
    online = OnlineStore.from_settings(settings)
    rows = sum(r.rows_scored for r in results)
    keys = sum(r.keys_written for r in results)
    report = _report(version, results, bundle, online, plan, limits)
    record = {
        "input_uri": input_uri,
        "training_run_id": bundle.training_run_id,
        "models": bundle.names,
        "redis_version": version,
        "rows_scored": rows,
        "keys_written": keys,
        "published": False,
        "rows_read": plan.rows_read if plan else rows,
        "rows_rejected": plan.rows_rejected if plan else 0,
        "duplicates": sum(r.duplicates for r in results),
    }
    # What `promote` needs to publish this version later with the same checks, and the
    # gate's verdict (the next batch's report compares its scores with `score_counts`).
    fields: dict[str, object] = {"keys_expected": keys, "shards_expected": len(results)}
    if report is not None:
        record.update(report.summary())
        fields.update(
            gate=report.gate.summary,
            max_drift=round(report.max_drift, 6),
            score_counts=report.score_counts,
        )
    online.annotate(version, fields)
    with Tracker(settings.resolved_database_url) as tracker:
        # Recorded before the switch: a live version always has its lineage row.
        tracker.record_batch(run_id, record)
        blocked = report is not None and not report.gate.passed
        published = not blocked and online.publish(version, keys, len(results))
        if published:
            tracker.mark_published(run_id)
    retired: list[str] = []
    if published:
        try:
            retired = online.retire(settings.keep_versions)
        except Exception as exc:  # housekeeping only: the new version is already live
            log.warning("could not retire old versions: %s", exc)
    elif blocked:
        log.warning("%s stays staged: %s", version, report.gate.summary)
    else:
        log.warning("%s was superseded by %s: discarded", version, online.current())
        online.discard(version)
    store = ObjectStore.from_settings(settings)
    for uri in scratch:
        store.delete(uri)
    if report is not None:
        report.seconds["publish"] = time.perf_counter() - started
    return PublishResult(rows, keys, published, retired, report)


def _report(
    version: str,
    results: list[ShardResult],
    bundle: ModelBundle | ModelFiles,
    online: OnlineStore,
    plan: ShardPlan | None,
    limits: GateLimits,
) -> BatchReport | None:
    """The shards' counts merged and judged: drift against training, rejected rows."""
    from batchscore import gate
    from batchscore.batch_report import build_report
    from batchscore.drift import BatchProfile

    reference = bundle.reference
    if reference is None or any(r.profile is None for r in results):
        return None
    profile = BatchProfile.merge([BatchProfile.from_dict(r.profile) for r in results])
    rows_read = plan.rows_read if plan else sum(r.rows_scored for r in results)
    rejected = plan.rows_rejected if plan else 0
    drift = profile.drift(reference)
    noise = profile.noise(reference)
    live = online.current()
    live_counts = online.client.hget(online.manifest(live), "score_counts") if live else None
    seconds: dict[str, float] = {}
    for result in results:
        for stage_name, value in result.seconds.items():
            seconds[stage_name] = seconds.get(stage_name, 0.0) + value
    return build_report(
        version=version,
        model=bundle.champion,
        threshold=bundle.threshold,
        training_run_id=bundle.training_run_id,
        classes=bundle.classes,
        reference=reference,
        profile=profile,
        drift=drift,
        noise=max(noise.values(), default=0.0),
        rows_read=rows_read,
        duplicates=sum(r.duplicates for r in results),
        rows_rejected=rejected,
        gate=gate.check(
            drift,
            rows_read,
            rejected,
            limits.max_drift,
            limits.max_bad_rows,
            noise,
        ),
        live_version=live,
        live_score_counts=json.loads(live_counts) if live_counts else None,
        seconds=seconds,
        rejected_uri=plan.rejected_uri if plan else None,
    )


def stage(
    version: str,
    run_id: str,
    input_uri: str,
    bundle: ModelBundle | ModelFiles,
    settings: Settings,
    ttl_seconds: int | None = None,
) -> None:
    """Open the run's Redis version (invisible to readers until `publish`)."""
    from batchscore.online import OnlineStore

    OnlineStore.from_settings(settings).stage(
        version,
        {
            "run_id": run_id,
            "input": input_uri,
            "model": bundle.champion,
            "models": ",".join(bundle.names),
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

"""Metrics and lineage in SQL (SQLite embedded, PostgreSQL in service mode), via SQLAlchemy.

Writes are idempotent per run (and per model): a retried or resumed step replaces its
own rows in one transaction instead of adding duplicates. SQL only ever sees bound
parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from batchscore.storage.model_record import ChampionRun, ModelRecord
from batchscore.storage.schema import SchemaError, migrate

# The tables as the code reads and writes them; their schema is made and changed only by
# the Alembic revisions in migrations/versions (keep the two in step: test_tracking checks).
metadata = MetaData()

training_runs = Table(
    "training_runs",
    metadata,
    Column("run_id", String(200), primary_key=True),
    Column("dataset", String(1000), nullable=False),
    Column("target", String(200)),
    Column("negative_class", String(200), nullable=False),
    Column("positive_class", String(200), nullable=False),
    Column("feature_columns", JSON, nullable=False),
    Column("n_train", Integer, nullable=False),
    Column("n_test", Integer, nullable=False),
    Column("batch_input_uri", String(1000), nullable=False),
    Column("champion", String(50)),
    # The reference profile of the training rows, checked like a model (issue 13's gate).
    Column("profile_uri", String(1000)),
    Column("profile_sha256", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

model_metrics = Table(
    "model_metrics",
    metadata,
    Column("run_id", ForeignKey("training_runs.run_id"), primary_key=True),
    Column("model", String(50), primary_key=True),
    Column("precision", Float, nullable=False),
    Column("recall", Float, nullable=False),
    Column("f1", Float, nullable=False),
    Column("roc_auc", Float, nullable=False),
    Column("accuracy", Float, nullable=False),
    Column("cv_score", Float, nullable=False),
    Column("best_params", JSON, nullable=False),
    Column("model_uri", String(1000), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("is_champion", Boolean, nullable=False, default=False),
    # Decision threshold on the positive-class probability, chosen by CV at training.
    # Added after the first release: NULL in older rows, which labelled at 0.5.
    Column("threshold", Float),
)

batch_runs = Table(
    "batch_runs",
    metadata,
    Column("run_id", String(200), primary_key=True),
    Column("input_uri", String(1000), nullable=False),
    Column("training_run_id", String(200), nullable=False),
    Column("models", JSON, nullable=False),
    Column("redis_version", String(200), nullable=False),
    Column("rows_scored", Integer, nullable=False),
    Column("keys_written", Integer, nullable=False),
    Column("published", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The batch report's summary: what the gate looked at and what it decided.
    Column("rows_read", Integer),
    Column("rows_rejected", Integer),
    Column("duplicates", Integer),
    Column("max_drift", Float),
    Column("max_drift_feature", String(1000)),
    Column("gate", String(4000)),
    Column("report", JSON),
)


class TrackingError(RuntimeError):
    """The database cannot be reached or holds no record the caller needs."""


class Tracker:
    """One object per database URL; the schema is migrated on first use (`schema.migrate`:
    once, under a lock, with Alembic), and only checked afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        _make_sqlite_folder(url)
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        try:
            migrate(self.engine)
        except (SQLAlchemyError, SchemaError) as exc:
            self.engine.dispose()
            raise TrackingError(f"database error at {self._where}: {_short(exc)}") from exc

    def record_training(
        self,
        run_id: str,
        run: dict[str, Any],
        models: dict[str, dict[str, Any]],
        champion: str,
    ) -> None:
        """Replace this run's rows: the run, one row per model, the champion flagged."""
        now = datetime.now(UTC)
        with self._transaction() as conn:
            conn.execute(delete(model_metrics).where(model_metrics.c.run_id == run_id))
            conn.execute(delete(training_runs).where(training_runs.c.run_id == run_id))
            conn.execute(
                insert(training_runs),
                [{**run, "run_id": run_id, "champion": champion, "created_at": now}],
            )
            conn.execute(
                insert(model_metrics),
                [
                    {**row, "run_id": run_id, "model": name, "is_champion": name == champion}
                    for name, row in models.items()
                ],
            )

    def latest_champion(self, which: str = "champion") -> ChampionRun:
        """The latest training run's champion (`champion`) or every model (`all`), champion
        first, with that run's test split: one read of the run's row, so the input and the
        models always come from the same run."""
        if which not in ("champion", "all"):
            raise ValueError(f"models must be 'champion' or 'all', not {which!r}")
        with self._transaction() as conn:
            run = conn.execute(
                select(training_runs)
                .where(training_runs.c.champion.is_not(None))
                .order_by(training_runs.c.created_at.desc(), training_runs.c.run_id.desc())
                .limit(1)
            ).first()
            if run is None:
                raise TrackingError(
                    "no training run recorded: run `python metaflow/train_models.py run` first"
                )
            query = select(model_metrics).where(model_metrics.c.run_id == run.run_id)
            if which == "champion":
                query = query.where(model_metrics.c.is_champion)
            rows = conn.execute(query.order_by(model_metrics.c.is_champion.desc())).all()
        records = [
            ModelRecord(
                training_run_id=run.run_id,
                model=row.model,
                model_uri=row.model_uri,
                model_sha256=row.model_sha256,
                feature_columns=list(run.feature_columns),
                classes=(run.negative_class, run.positive_class),
                is_champion=row.is_champion,
                threshold=0.5 if row.threshold is None else row.threshold,
                profile_uri=run.profile_uri,
                profile_sha256=run.profile_sha256,
            )
            for row in rows
        ]
        return ChampionRun(run.run_id, run.batch_input_uri, records)

    def model_records(self, which: str = "champion") -> list[ModelRecord]:
        """The latest training run's champion (`champion`) or every model (`all`)."""
        return self.latest_champion(which).records

    def champion_batch_input(self) -> str:
        """The test split of the run whose champion the batch flow loads: its default input.

        Each run's split is its own file, so this is the data that champion was tested on.
        """
        return self.latest_champion().batch_input_uri

    def metrics(self, run_id: str) -> dict[str, dict[str, Any]]:
        with self._transaction() as conn:
            rows = conn.execute(
                select(model_metrics).where(model_metrics.c.run_id == run_id)
            ).mappings()
            return {row["model"]: dict(row) for row in rows}

    def record_batch(self, run_id: str, row: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute(delete(batch_runs).where(batch_runs.c.run_id == run_id))
            conn.execute(
                insert(batch_runs),
                [{**row, "run_id": run_id, "created_at": datetime.now(UTC)}],
            )

    def mark_published(self, run_id: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                update(batch_runs).where(batch_runs.c.run_id == run_id).values(published=True)
            )

    def batch_run(self, run_id: str) -> dict[str, Any] | None:
        with self._transaction() as conn:
            row = conn.execute(select(batch_runs).where(batch_runs.c.run_id == run_id)).first()
        return dict(row._mapping) if row else None

    def batch_history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest batch runs, newest first: what `python -m batchscore history` lists."""
        with self._transaction() as conn:
            rows = conn.execute(
                select(batch_runs).order_by(batch_runs.c.created_at.desc()).limit(limit)
            ).mappings()
            return [dict(row) for row in rows]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise TrackingError(f"database error at {self._where}: {_short(exc)}") from exc

    @property
    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _make_sqlite_folder(url: str) -> None:
    """SQLite creates the database file but not its folder (a fresh BATCHSCORE_HOME)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return  # create_engine reports it
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return
    if not database.startswith("file:"):
        # On failure, SQLite's own error (raised as a TrackingError) says more.
        with suppress(OSError):
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0]

"""Metrics and lineage tables, on SQLite (embedded) and on a real PostgreSQL server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from batchscore.storage.tracking import (
    ModelRecord,
    Tracker,
    TrackingError,
    batch_runs,
    model_metrics,
    training_runs,
)

FEATURES = ["mean radius", "mean texture", "mean perimeter"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def tracker(request, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'metrics.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    tracker = Tracker(url)
    yield tracker
    tracker.close()


def _run(batch_input_uri: str = "file:///store/data/breast_cancer.csv") -> dict:
    return {
        "dataset": "breast_cancer",
        "target": None,
        "negative_class": "benign",
        "positive_class": "malignant",
        "feature_columns": FEATURES,
        "n_train": 455,
        "n_test": 114,
        "batch_input_uri": batch_input_uri,
    }


def _model(name: str, cv: float) -> dict:
    return {
        "precision": 0.9,
        "recall": 0.8,
        "f1": 0.85,
        "roc_auc": 0.97,
        "accuracy": 0.93,
        "cv_score": cv,
        "best_params": {"C": 1.0},
        "model_uri": f"s3://batch/models/run/{name}.joblib",
        "model_sha256": name[0] * 64,
    }


MODELS = {"tree": _model("tree", 0.9), "svc": _model("svc", 0.99), "knn": _model("knn", 0.95)}


def _count(tracker: Tracker, table, **where) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with tracker.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def test_record_training_twice_replaces_not_duplicates(tracker):
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")  # a retried step
    assert _count(tracker, training_runs) == 1
    assert _count(tracker, model_metrics) == 3
    assert _count(tracker, model_metrics, is_champion=True) == 1
    metrics = tracker.metrics("TrainModelsFlow/1")
    assert set(metrics) == {"tree", "svc", "knn"}
    assert [m for m, row in metrics.items() if row["is_champion"]] == ["svc"]
    assert metrics["svc"]["cv_score"] == pytest.approx(0.99)
    assert metrics["svc"]["best_params"] == {"C": 1.0}


def test_rerecording_can_move_the_champion(tracker):
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "knn")
    assert _count(tracker, model_metrics, is_champion=True) == 1
    assert [r.model for r in tracker.model_records("champion")] == ["knn"]


def test_model_records_come_from_the_latest_run_champion_first(tracker):
    # Recorded in order (a tie on the timestamp goes to the higher run id, as here).
    tracker.record_training("TrainModelsFlow/1", _run("file:///old.csv"), MODELS, "tree")
    newer = {"logreg": _model("logreg", 0.98), "xgboost": _model("xgboost", 0.99)}
    tracker.record_training("TrainModelsFlow/2", _run("file:///new.csv"), newer, "xgboost")

    champion = tracker.model_records("champion")
    assert champion == [
        ModelRecord(
            training_run_id="TrainModelsFlow/2",
            model="xgboost",
            model_uri="s3://batch/models/run/xgboost.joblib",
            model_sha256="x" * 64,
            feature_columns=FEATURES,
            classes=("benign", "malignant"),
            is_champion=True,
        )
    ]
    every = tracker.model_records("all")
    assert [r.model for r in every] == ["xgboost", "logreg"]
    assert [r.is_champion for r in every] == [True, False]
    assert {r.training_run_id for r in every} == {"TrainModelsFlow/2"}
    assert tracker.champion_batch_input() == "file:///new.csv"


def test_the_champion_and_its_input_are_one_read(tracker, tmp_path, settings_for, monkeypatch):
    """A training run finishing while the batch flow's `start` reads must not pair one run's
    test split with the next run's model (issue 19): what the flow reads comes from one run."""
    from contextlib import contextmanager

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from batchscore.batch.bundle import find_champion

    tracker.record_training("TrainModelsFlow/1", _run("file:///old.csv"), MODELS, "tree")
    newer = {"xgboost": _model("xgboost", 0.99)}
    read_runs, finished = [], []

    def note_reads(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT") and "training_runs" in statement:
            read_runs.append(True)

    original = Tracker._transaction

    @contextmanager
    def then_a_training_run_finishes(self):
        with original(self) as conn:
            yield conn
        if read_runs and not finished:  # right after the first read of the runs table
            finished.append(True)
            with Tracker(tracker.url) as trainer:
                trainer.record_training(
                    "TrainModelsFlow/2", _run("file:///new.csv"), newer, "xgboost"
                )

    event.listen(Engine, "before_cursor_execute", note_reads)
    monkeypatch.setattr(Tracker, "_transaction", then_a_training_run_finishes)
    try:
        settings = settings_for(
            {"BATCHSCORE_HOME": str(tmp_path), "BATCHSCORE_DATABASE_URL": tracker.url}
        )
        champion = find_champion("champion", settings)
    finally:
        event.remove(Engine, "before_cursor_execute", note_reads)
    assert finished  # the other run did finish in between
    assert (champion.training_run_id, champion.batch_input_uri) == (
        "TrainModelsFlow/1",
        "file:///old.csv",
    )
    assert [(r.training_run_id, r.model) for r in champion.records] == [
        ("TrainModelsFlow/1", "tree")
    ]
    again = find_champion("all", settings)
    assert again.batch_input_uri == "file:///new.csv"
    assert [(r.training_run_id, r.model) for r in again.records] == [
        ("TrainModelsFlow/2", "xgboost")
    ]


def test_model_records_rejects_unknown_selection(tracker):
    with pytest.raises(ValueError, match="champion"):
        tracker.model_records("best")


def test_empty_database_says_what_to_run(tracker):
    with pytest.raises(TrackingError, match="train_models.py"):
        tracker.model_records()
    with pytest.raises(TrackingError, match="no training run recorded"):
        tracker.champion_batch_input()
    assert tracker.batch_run("BatchProcessingFlow/1") is None


def test_batch_run_lifecycle(tracker):
    row = {
        "input_uri": "s3://batch/data/breast_cancer.csv",
        "training_run_id": "TrainModelsFlow/2",
        "models": ["svc", "tree"],
        "redis_version": "20240101T000000000000Z-run",
        "rows_scored": 114,
        "keys_written": 113,
        "published": False,
    }
    tracker.record_batch("BatchProcessingFlow/7", row)
    tracker.record_batch("BatchProcessingFlow/7", row)  # a retried step: still one row
    assert _count(tracker, batch_runs) == 1
    stored = tracker.batch_run("BatchProcessingFlow/7")
    assert stored["published"] is False
    assert stored["models"] == ["svc", "tree"]
    assert stored["rows_scored"] == 114
    assert stored["keys_written"] == 113
    assert stored["redis_version"] == "20240101T000000000000Z-run"
    assert stored["created_at"] is not None

    tracker.mark_published("BatchProcessingFlow/7")
    assert tracker.batch_run("BatchProcessingFlow/7")["published"] is True
    tracker.mark_published("BatchProcessingFlow/unknown")  # no row: nothing happens
    assert tracker.batch_run("BatchProcessingFlow/unknown") is None


def test_tables_survive_a_second_tracker(tracker):
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")
    again = Tracker(tracker.url)  # finds the schema at its revision: no schema work
    try:
        assert [r.model for r in again.model_records()] == ["svc"]
    finally:
        again.close()


def test_unreachable_database_is_a_clear_error_without_password():
    url = "postgresql+psycopg2://nobody:s3cret-pw@127.0.0.1:1/x"
    with pytest.raises(TrackingError) as info:
        Tracker(url)
    message = str(info.value)
    assert "s3cret-pw" not in message
    assert "database error at postgresql+psycopg2://nobody:***@127.0.0.1:1/x" in message
    assert "\n" not in message
    assert "127.0.0.1" in message


def test_unwritable_sqlite_path_is_a_tracking_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError, match="database error at sqlite"):
        Tracker(f"sqlite:///{blocker / 'metrics.db'}")


def test_fresh_home_folder_is_created_for_sqlite(tmp_path):
    # Before any training run, BATCHSCORE_HOME may not exist yet: the batch flow must then
    # say "run training first", not "unable to open database file".
    tracker = Tracker(f"sqlite:///{tmp_path / 'fresh-home' / 'metrics.db'}")
    try:
        with pytest.raises(TrackingError, match="train_models.py"):
            tracker.model_records()
    finally:
        tracker.close()
    assert (tmp_path / "fresh-home" / "metrics.db").is_file()


def test_thresholds_are_recorded_and_loaded_with_the_models(tracker):
    models = {
        "tree": {**_model("tree", 0.9), "threshold": 0.31},
        "svc": {**_model("svc", 0.99), "threshold": None},
    }
    tracker.record_training("TrainModelsFlow/1", _run(), models, "tree")
    assert tracker.model_records("champion")[0].threshold == pytest.approx(0.31)
    assert tracker.metrics("TrainModelsFlow/1")["tree"]["threshold"] == pytest.approx(0.31)
    # A row written without one (an older release) labelled at 0.5.
    assert {r.model: r.threshold for r in tracker.model_records("all")}["svc"] == 0.5


def test_a_database_from_before_thresholds_gains_the_column(tracker):
    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")
    with tracker.engine.begin() as conn:  # the table as an older release made it
        conn.execute(text("ALTER TABLE model_metrics DROP COLUMN threshold"))
        conn.execute(text("DROP TABLE alembic_version"))  # releases before Alembic
    tracker.close()

    upgraded = Tracker(tracker.url)
    try:
        assert upgraded.model_records("champion")[0].threshold == 0.5  # kept rows, no value
        newer = {"logreg": {**_model("logreg", 0.98), "threshold": 0.12}}
        upgraded.record_training("TrainModelsFlow/2", _run(), newer, "logreg")
        assert upgraded.model_records("champion")[0].threshold == pytest.approx(0.12)
        assert _count(upgraded, model_metrics) == 4
    finally:
        upgraded.close()


def test_each_training_run_keeps_its_own_test_split(tmp_path, settings_for):
    import pandas as pd

    from batchscore.storage.object_store import ObjectStore
    from batchscore.training.steps import prepare_data

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    first = prepare_data("breast_cancer", None, 0.2, 1, settings, run_id="TrainModelsFlow/1")
    with Tracker(settings.resolved_database_url) as tracker:
        tracker.record_training("TrainModelsFlow/1", _run(first.batch_input_uri), MODELS, "svc")
    # A later run splits the data differently and fails before recording anything.
    later = prepare_data("breast_cancer", None, 0.3, 2, settings, run_id="TrainModelsFlow/2")

    assert first.batch_input_uri.endswith("data/TrainModelsFlow-1/breast_cancer.csv")
    assert later.batch_input_uri.endswith("data/TrainModelsFlow-2/breast_cancer.csv")
    store = ObjectStore.from_settings(settings)
    kept = pd.read_csv(io.BytesIO(store.get_bytes(first.batch_input_uri)))
    assert kept.to_numpy().tolist() == first.test_features.to_numpy().tolist()
    assert store.exists(first.batch_labels_uri)
    with Tracker(settings.resolved_database_url) as tracker:
        assert tracker.champion_batch_input() == first.batch_input_uri


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
)
def test_first_uses_at_once_migrate_once(backend, request, tmp_path):
    """Two (here four) first runs at once on a fresh database: before Alembic, each ran
    `create_all` and `ALTER TABLE` and they raced (DuplicateTable). Now one migrates under
    the lock; the others wait, find the revision recorded and do nothing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from batchscore.storage.schema import HEAD, revision

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'metrics.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ready = threading.Barrier(4)

    def first_use(n: int) -> list[str]:
        ready.wait()
        with Tracker(url) as tracker:
            tracker.record_training(f"TrainModelsFlow/{n}", _run(), MODELS, "svc")
            return [r.model for r in tracker.model_records()]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(first_use, range(4))) == [["svc"]] * 4
    with Tracker(url) as tracker:
        assert _count(tracker, training_runs) == 4
        with tracker.engine.connect() as conn:
            assert revision(conn) == HEAD
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_a_database_made_before_alembic_upgrades_keeping_its_rows(tracker):
    """A database made by `create_all` (every release before Alembic) has no revision
    recorded: the baseline revision adopts it, rows and all."""
    from batchscore.storage.schema import HEAD, revision

    tracker.record_training("TrainModelsFlow/1", _run(), MODELS, "svc")
    with tracker.engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("ALTER TABLE batch_runs DROP COLUMN report"))  # an older one still
    tracker.close()
    with Tracker(tracker.url) as upgraded:
        with upgraded.engine.connect() as conn:
            assert revision(conn) == HEAD
        assert [r.model for r in upgraded.model_records()] == ["svc"]
        assert _count(upgraded, model_metrics) == 3
        row = {
            "input_uri": "s3://batch/data/breast_cancer.csv",
            "training_run_id": "TrainModelsFlow/1",
            "models": ["svc"],
            "redis_version": "20240101T000000000000Z-run",
            "rows_scored": 114,
            "keys_written": 114,
            "published": True,
            "report": {"gate": "passed"},
        }
        upgraded.record_batch("BatchProcessingFlow/1", row)
        assert upgraded.batch_run("BatchProcessingFlow/1")["report"] == {"gate": "passed"}


def test_the_tables_the_code_uses_are_the_ones_the_revisions_make(tracker):
    """`tracking.metadata` and the Alembic revisions must not drift apart: no difference
    between the two, and HEAD names the newest revision."""
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from batchscore.storage.schema import HEAD, MIGRATIONS
    from batchscore.storage.tracking import metadata

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD
    with tracker.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []

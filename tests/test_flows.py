"""Both flows end to end through Metaflow's Runner, embedded and against real services,
then the notebook executed against what they published."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import execute_notebook, start_flow
from sqlalchemy import create_engine, func, select

from batchscore.batch.shards import BLOCK_ROWS
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import row_keys
from batchscore.sizing import machine_cores
from batchscore.storage.object_store import ObjectStore
from batchscore.storage.tracking import batch_runs, model_metrics, training_runs
from batchscore.training.models import MODEL_NAMES, labels_at, positive_proba

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.flows


def run_flow(flow_file: str, env: dict[str, str], cwd: Path, **params):
    """Run a flow to completion; fail with its output if it did not succeed."""
    status, run, output = start_flow(flow_file, env, cwd, **params)
    assert status == "successful", output
    return run


def read_csv(store: ObjectStore, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)))


def check_training(run, settings) -> None:
    data = run.data
    assert set(data.metrics) == set(MODEL_NAMES)
    for name, values in data.metrics.items():
        assert set(values) == {"precision", "recall", "f1", "roc_auc", "accuracy"}, name
        assert all(0.0 <= v <= 1.0 for v in values.values()), (name, values)
    assert set(data.thresholds) == set(MODEL_NAMES)
    assert all(0.0 <= t <= 1.0 for t in data.thresholds.values())
    best_cv = max(data.cv_scores.values())
    assert data.cv_scores[data.champion] == best_cv  # chosen by CV, never by the test set
    assert set(data.model_uris) == set(MODEL_NAMES)

    store = ObjectStore.from_settings(settings)
    for uri in data.model_uris.values():
        assert store.exists(uri)
    assert set(data.plot_uris) == {f"confusion_{m}.png" for m in MODEL_NAMES} | {
        "confusion_matrices.png",
        "roc.png",
    }
    for uri in data.plot_uris.values():
        assert store.get_bytes(uri).startswith(b"\x89PNG")
    # The test split lives under the run's own path: no later run can overwrite it.
    folder = f"data/{run.pathspec.replace('/', '-')}/"
    assert data.data.batch_input_uri.endswith(folder + "breast_cancer.csv")
    published = read_csv(store, data.data.batch_input_uri)
    labels = read_csv(store, data.data.batch_labels_uri)
    assert list(published.columns) == data.data.feature_columns
    assert len(published) == len(labels) == len(data.data.test_labels)


def check_batch(run, settings) -> None:
    data = run.data
    store = ObjectStore.from_settings(settings)
    published = read_csv(store, data.input_uri)
    assert data.rows_scored == len(published)
    # The shards are ranges of the input itself, read in place: no copy of it was made.
    pieces = [piece for shard in data.shards for piece in shard.pieces]
    assert pieces and all(piece.file.uri == data.input_uri for piece in pieces)
    assert data.plan.rows_read == len(published) and data.plan.rows_rejected == 0
    assert data.keys_written == len(published)
    assert data.gate == "passed"  # the champion's own test split passes the drift gate
    online = OnlineStore.from_settings(settings)
    assert online.current() == data.version
    # Every row, looked up from its raw features, carries the champion's own prediction.
    predictions = online.get_many(row_keys(published.to_numpy()))
    assert all(p is not None for p in predictions)
    champion = data.model_files.load().models[0]
    expected = labels_at(positive_proba(champion.estimator, published), champion.threshold)
    assert [p["label"] for p in predictions] == expected.tolist()
    assert {p["threshold"] for p in predictions} == {champion.threshold}
    assert {p["model"] for p in predictions} == {data.model_name}


@pytest.fixture
def project(tmp_path: Path):
    """A project folder as a user has it: pyproject.toml on top, the notebook in notebooks/.
    The flows run from the top, the notebook from notebooks/ (as Jupyter runs it)."""
    from batchscore.online.embedded_redis import stop_server

    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / "notebooks" / "predictions.ipynb", project / "notebooks")
    yield project
    for home in (project / ".batchscore", project / "notebooks" / ".batchscore"):
        stop_server(home / "redis.db")


@pytest.fixture
def notebook_runner():
    def execute(env: dict[str, str], project: Path) -> None:
        """Run the notebook as `jupyter nbconvert --execute` does: kernel in notebooks/."""
        notebooks = project / "notebooks"
        outputs = execute_notebook(notebooks, env)
        assert "hit rate: 100.0%" in outputs, outputs[-2000:]
        # The project's home was used: no second home (and embedded Redis) in notebooks/.
        assert not (notebooks / ".batchscore").exists()

    return execute


def test_embedded_mode_end_to_end(project, settings_for, notebook_runner):
    # Nothing configured: everything lands in the project's default ./.batchscore.
    env = {"METAFLOW_DEFAULT_DATASTORE": "local"}
    settings = settings_for({"BATCHSCORE_HOME": str(project / ".batchscore")})
    train = run_flow("train_models.py", env, project, cv_folds=3)
    check_training(train, settings)
    # At its defaults the flow sizes itself from the cores: one shard per core (Metaflow's
    # --max-workers 16 never starts more), none for less than a block of rows (114 rows:
    # one), each task capped to cores / tasks threads.
    batch = run_flow("batch_processing.py", env, project)
    check_batch(batch, settings)
    rows = read_csv(ObjectStore.from_settings(settings), train.data.data.batch_input_uri)
    tasks = list(batch["batch_processing"])
    cores = machine_cores()
    assert len(tasks) == min(cores, math.ceil(len(rows) / BLOCK_ROWS)) == 1
    assert [t.data.shard.threads for t in tasks] == [max(1, cores // len(tasks))] * len(tasks)
    notebook_runner(env, project)

    # Keyed by an id column, the input named by a variable: an id of the first shard comes
    # again in the last with other features. Readers get the first row in input order, the
    # counts say so, and Metaflow recorded the template, never the value.
    champion = batch.data.model_files.load().models[0]
    proba = positive_proba(champion.estimator, rows)
    repeat = next(i for i in range(76, len(rows)) if abs(proba[i] - proba[0]) > 1e-3)
    ids = [f"c{i:03d}" for i in range(len(rows))]
    ids[repeat] = ids[0]  # shards of 38 rows: row 0 in shard 0, `repeat` in shard 2
    keyed = project / "private" / "keyed.parquet"
    keyed.parent.mkdir()
    rows.assign(customer=ids).to_parquet(keyed)
    keyed_env = {**env, "BATCHSCORE_ID_COLUMN": "customer", "KEYED_INPUT": str(keyed)}
    batch = run_flow(
        "batch_processing.py", keyed_env, project, input_path="${KEYED_INPUT}", shard_rows=50
    )
    assert len(list(batch["batch_processing"])) == 3  # 114 rows in shards of 50
    assert batch.data.input_uri == "${KEYED_INPUT}" and batch.data.input_path == "${KEYED_INPUT}"
    assert all(p.file.uri == "${KEYED_INPUT}" for s in batch.data.shards for p in s.pieces)
    assert (batch.data.rows_scored, batch.data.keys_written) == (len(rows), len(rows) - 1)
    online = OnlineStore.from_settings(settings)
    assert abs(online.get(ids[0])["proba"] - proba[0]) < 1e-6
    from batchscore.storage.tracking import Tracker

    with Tracker(settings.resolved_database_url) as tracker:
        record = tracker.batch_history(1)[0]
    assert (record["input_uri"], record["duplicates"]) == ("${KEYED_INPUT}", 1)
    assert str(project / "private") not in str(online.status())


@pytest.mark.services
def test_service_mode_end_to_end(
    service_training, trained_service_env, project, settings_for, notebook_runner
):
    # The training ran once for the session (conftest's `service_training`), from a project
    # whose .env held the services, as on the Compose path; this test has a copy of its
    # database. The batch flow runs the same way: services from the project's .env,
    # Metaflow's own variables from the environment (Metaflow never reads .env).
    service_env = trained_service_env
    settings = settings_for(service_env)
    in_dotenv = {k: v for k, v in service_env.items() if not k.startswith("METAFLOW_")}
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in in_dotenv.items()))
    env = {k: v for k, v in service_env.items() if k.startswith("METAFLOW_")}
    train = service_training.run
    check_training(train, settings)
    assert train.data.model_uris[train.data.champion].startswith(settings.resolved_store_url)

    engine = create_engine(service_env["BATCHSCORE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(model_metrics)).scalar() == 5
        champion = conn.execute(select(model_metrics).where(model_metrics.c.is_champion)).one()
        assert champion.model == train.data.champion
        assert len(champion.model_sha256) == 64
        assert conn.execute(select(training_runs.c.champion)).scalar() == train.data.champion
        profile = conn.execute(
            select(training_runs.c.profile_uri, training_runs.c.profile_sha256)
        ).one()
        assert profile.profile_uri.endswith("/profile.json") and len(profile.profile_sha256) == 64

    # Re-recording the same run (a retried store_results) replaces, never duplicates.
    from batchscore.storage.tracking import Tracker

    tracker = Tracker(service_env["BATCHSCORE_DATABASE_URL"])
    run_id = f"TrainModelsFlow/{train.id}"
    rows = tracker.metrics(run_id)
    first = next(iter(rows.values()))
    tracker.record_training(
        run_id,
        {
            "dataset": "breast_cancer",
            "target": None,
            "negative_class": "benign",
            "positive_class": "malignant",
            "feature_columns": train.data.data.feature_columns,
            "n_train": 455,
            "n_test": 114,
            "batch_input_uri": train.data.data.batch_input_uri,
            **profile._asdict(),
        },
        {
            m: {k: v for k, v in r.items() if k not in ("run_id", "model", "is_champion")}
            for m, r in rows.items()
        },
        train.data.champion,
    )
    tracker.close()
    assert first["model_uri"]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(model_metrics)).scalar() == 5
        assert conn.execute(select(func.count()).select_from(training_runs)).scalar() == 1

    batch = run_flow("batch_processing.py", env, project, models="all")
    check_batch(batch, settings)
    online = OnlineStore.from_settings(settings)
    sample = online.get_many(row_keys(np.asarray(train.data.data.test_features)[:3]))
    assert all(set(p["models"]) == set(MODEL_NAMES) for p in sample)
    with engine.connect() as conn:
        record = conn.execute(select(batch_runs)).one()
        assert record.redis_version == batch.data.version
        assert record.published and record.keys_written == batch.data.keys_written
    engine.dispose()
    notebook_runner(env, project)

"""`python -m batchscore status|lookup` in a subprocess, against a version published here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscore.batch.predictions import LoadedModel
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import row_keys
from batchscore.versions import new_version

COLUMNS = ["mean radius", "mean texture", "mean perimeter"]
ROWS = pd.DataFrame(
    [[17.99, 10.38, 122.8], [13.54, 14.36, 87.46], [1.0, 2.0, 3.0]], columns=COLUMNS
)
LABELS = [1, 0, 1]
CLASSES = ("benign", "malignant")


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # No developer `.env` may leak in: run from an empty folder with an explicit environment.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")} | env
    return subprocess.run(
        [sys.executable, "-m", "batchscore", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@pytest.fixture
def cli_env(redis_url: str, redis_prefix: str, tmp_path: Path) -> dict[str, str]:
    return {
        "BATCHSCORE_REDIS_URL": redis_url,
        "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        "BATCHSCORE_HOME": str(tmp_path / "home"),
    }


@pytest.fixture
def published(redis_client, redis_prefix) -> tuple[str, list[str]]:
    """A small version, staged the way batch.stage does it (feature_columns as a JSON list)."""
    online = OnlineStore(redis_client, prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/42", datetime(2024, 5, 1, tzinfo=UTC))
    online.stage(
        version,
        {
            "run_id": "BatchProcessingFlow/42",
            "input": "file:///store/data/breast_cancer.csv",
            "model": "svc",
            "models": "svc",
            "training_run_id": "TrainModelsFlow/7",
            "feature_columns": COLUMNS,
            "classes": list(CLASSES),
        },
    )
    keys = row_keys(ROWS.to_numpy())
    online.write(version, 0, keys, _scored([0.9 if lab else 0.1 for lab in LABELS]))
    assert online.publish(version, len(keys), 1)
    return version, keys


def _scored(probas: list[float], model: str = "svc") -> list:
    """`predict_all`'s output for rows with these probabilities (one model)."""
    proba = np.array(probas)
    return [(LoadedModel(model, None, "abcdef012345" + "0" * 52), (proba >= 0.5) * 1, proba)]


def test_status_shows_the_live_version(published, cli_env, tmp_path):
    version, keys = published
    result = _cli(["status"], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert version in result.stdout
    assert "svc" in result.stdout
    assert "TrainModelsFlow/7" in result.stdout
    assert _row(result.stdout, "keys") == ["keys", "3"]
    assert _row(result.stdout, "model") == ["model", "svc"]
    # ISO time, not an epoch number.
    published_at = _row(result.stdout, "published_at")[1]
    assert datetime.fromisoformat(published_at).tzinfo is not None, published_at


def test_status_without_a_version(cli_env, tmp_path, redis_url):
    result = _cli(["status"], cli_env, tmp_path)
    assert result.returncode == 1
    assert "no prediction set published yet" in result.stdout


def test_lookup_by_key_prints_the_prediction(published, cli_env, tmp_path):
    _, keys = published
    result = _cli(["lookup", keys[0], keys[1]], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert keys[0] in result.stdout
    assert keys[1] in result.stdout
    assert _row(result.stdout, keys[0]) == [keys[0], "1", "malignant", "0.9000", "svc"]
    assert _row(result.stdout, keys[1]) == [keys[1], "0", "benign", "0.1000", "svc"]
    assert "2 of 2 found" in result.stdout


def test_lookup_header_names_the_class_proba_is_for(published, cli_env, tmp_path):
    _, keys = published
    result = _cli(["lookup", keys[0]], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "proba (malignant)" in result.stdout


def test_lookup_of_a_malformed_key_says_what_a_key_is(published, cli_env, tmp_path):
    result = _cli(["lookup", "deadbeef"], cli_env, tmp_path)
    assert result.returncode == 1
    assert "deadbeef: row keys are 64 hex characters" in result.stdout
    # A well-formed key that is simply absent gets no such hint.
    result = _cli(["lookup", "0" * 64], cli_env, tmp_path)
    assert result.returncode == 1
    assert "64 hex characters" not in result.stdout


def test_lookup_missing_key_exits_1(published, cli_env, tmp_path):
    _, keys = published
    absent = "0" * 64
    result = _cli(["lookup", keys[0], absent], cli_env, tmp_path)
    assert result.returncode == 1
    assert _row(result.stdout, absent) == [absent, "-", "not found", "-", "-"]
    assert "1 of 2 found" in result.stdout


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_lookup_raw_rows_from_a_file(published, cli_env, tmp_path, suffix):
    _, keys = published
    # Columns in another order, plus a column the model does not use.
    table = ROWS[["mean perimeter", "mean radius", "mean texture"]].assign(note="x")
    path = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path, index=False)
    result = _cli(["lookup", "--csv", str(path)], cli_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for key in keys:
        assert key in result.stdout
    assert "3 of 3 found" in result.stdout

    limited = _cli(["lookup", "--csv", str(path), "--limit", "1"], cli_env, tmp_path)
    assert limited.returncode == 0
    assert "1 of 1 found" in limited.stdout


def test_lookup_unknown_raw_row_exits_1(published, cli_env, tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame([[5.0, 5.0, 5.0]], columns=COLUMNS).to_csv(path, index=False)
    result = _cli(["lookup", "--csv", str(path)], cli_env, tmp_path)
    assert result.returncode == 1
    assert "not found" in result.stdout
    assert "0 of 1 found" in result.stdout


def test_lookup_file_missing_a_feature_column_is_a_clear_error(published, cli_env, tmp_path):
    path = tmp_path / "rows.csv"
    ROWS.drop(columns=["mean texture"]).to_csv(path, index=False)
    result = _cli(["lookup", "--csv", str(path)], cli_env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "missing feature column(s) ['mean texture']" in result.stdout


def test_lookup_bad_value_names_column_and_row(published, cli_env, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("mean radius,mean texture,mean perimeter\n1,2,3\n4,five,6\n")
    result = _cli(["lookup", "--csv", str(path)], cli_env, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'mean texture', row 2" in result.stdout


def test_lookup_needs_keys_or_a_file(published, cli_env, tmp_path):
    result = _cli(["lookup"], cli_env, tmp_path)
    assert result.returncode == 2
    assert "error" in result.stdout


def test_unreachable_redis_is_a_clear_error(tmp_path):
    env = {
        "BATCHSCORE_REDIS_URL": "redis://:s3cret-pw@127.0.0.1:1/0",
        "BATCHSCORE_HOME": str(tmp_path / "home"),
    }
    result = _cli(["status"], env, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "error" in result.stdout
    # One line naming the setting, the masked URL and the reason.
    assert "BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:1/0): connection refused" in result.stdout


def test_status_after_the_live_version_expired(redis_client, redis_prefix, cli_env, tmp_path):
    # ttl_days elapsed and no newer run: the pointer remains, its keys and manifest are gone.
    online = OnlineStore(redis_client, prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/1")
    online.stage(version, {"model": "svc", "feature_columns": COLUMNS}, ttl_seconds=60)
    key = row_keys(ROWS.to_numpy())[0]
    online.write(version, 0, [key], _scored([0.9]), ttl_seconds=60)
    assert online.publish(version, 1, 1)
    row = online.layout(version).locate(key)[0]
    redis_client.delete(online.manifest(version), row)  # what TTL does
    result = _cli(["status"], cli_env, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "expired" in result.stdout
    assert version in result.stdout


def test_lookup_sample_reads_the_live_input(
    published, redis_client, redis_prefix, cli_env, tmp_path
):
    version, keys = published
    path = tmp_path / "input.csv"
    ROWS.to_csv(path, index=False)
    redis_client.hset(f"{{{redis_prefix}}}:manifest:{version}", "input", str(path))
    result = _cli(["lookup", "--sample", "2"], cli_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 of 2 found" in result.stdout
    assert _row(result.stdout, keys[1])[2] == "benign"


def test_stop_embedded_without_a_server(cli_env, tmp_path):
    env = {k: v for k, v in cli_env.items() if k != "BATCHSCORE_REDIS_URL"}
    result = _cli(["stop-embedded"], env, tmp_path)
    assert result.returncode == 0
    assert "not running" in result.stdout


def test_embedded_mode_shares_one_server_with_the_cli(home, settings_for, tmp_path):
    # No BATCHSCORE_REDIS_URL: the writer and the CLI meet on the embedded Redis of the home.
    settings = settings_for({"BATCHSCORE_HOME": str(home)})
    online = OnlineStore.from_settings(settings)
    version = new_version("BatchProcessingFlow/9")
    keys = row_keys(ROWS.to_numpy())
    online.stage(version, {"model": "knn", "feature_columns": COLUMNS, "classes": list(CLASSES)})
    online.write(version, 0, keys, _scored([0.7] * 3, "knn"))
    assert online.publish(version, 3, 1)
    online.close()

    result = _cli(["lookup", keys[2]], {"BATCHSCORE_HOME": str(home)}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _row(result.stdout, keys[2])[1:] == ["1", "malignant", "0.7000", "knn"]


def test_lookup_rows_of_an_id_keyed_version_by_id(redis_client, redis_prefix, cli_env, tmp_path):
    # The live version's manifest says it is keyed by `customer`: the CLI keys the file's
    # rows by that column (as text: 007 is not 7), whatever BATCHSCORE_ID_COLUMN says here.
    online = OnlineStore(redis_client, prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/7")
    meta = {"model": "svc", "feature_columns": COLUMNS, "key_scheme": "id", "id_column": "customer"}
    online.stage(version, {**meta, "classes": list(CLASSES)})
    online.write(version, 0, ["007"], _scored([0.9]))
    assert online.publish(version, 1, 1)
    path = tmp_path / "rows.csv"
    path.write_text("customer,mean radius\n007,1.0\n7,2.0\n")
    result = _cli(["lookup", "--csv", str(path)], cli_env, tmp_path)
    assert _row(result.stdout, "007")[:3] == ["007", "1", "malignant"]
    assert _row(result.stdout, "7")[:3] == ["7", "-", "not found"]
    assert "1 of 2 found" in result.stdout
    # Ids are keys here: an absent one is not called malformed.
    result = _cli(["lookup", "7"], cli_env, tmp_path)
    assert _row(result.stdout, "7")[:3] == ["7", "-", "not found"]
    assert "64 hex characters" not in result.stdout


# ------------------------------------------------------------- output for people and scripts


def _record_run(database_url: str, run_id: str, version: str, published: bool) -> None:
    from batchscore.storage.tracking import Tracker

    with Tracker(database_url) as tracker:
        tracker.record_batch(
            run_id,
            {
                "input_uri": "s3://batch/data/a-long-folder-name/of-inputs/breast_cancer.csv",
                "training_run_id": "TrainModelsFlow/argo-trainmodelsflow-8mz4q",
                "models": ["svc", "knn", "logreg", "tree", "xgboost"],
                "redis_version": version,
                "rows_scored": 114,
                "keys_written": 114,
                "published": published,
                "rows_read": 114,
                "rows_rejected": 0,
                "max_drift": 0.0123,
                "max_drift_feature": "worst fractal dimension",
                "gate": "passed: drift 0.012 <= 0.25, 0 of 114 rows rejected",
            },
        )


@pytest.fixture
def two_runs(published, postgres_url, cli_env) -> tuple[dict[str, str], list[str]]:
    """The published version and an Argo-named one (long run ids), both in the database."""
    live, _ = published
    argo = new_version("BatchProcessingFlow/argo-batchprocessingflow-7x2kq9wz4b")
    _record_run(postgres_url, "BatchProcessingFlow/42", live, True)
    _record_run(
        postgres_url, "BatchProcessingFlow/argo-batchprocessingflow-7x2kq9wz4b", argo, False
    )
    return cli_env | {"BATCHSCORE_DATABASE_URL": postgres_url}, [argo, live]


@pytest.mark.parametrize("columns", ["80", "200"])
def test_history_never_wraps_a_version(two_runs, tmp_path, columns):
    # Piped (as into grep) and whatever COLUMNS says: each version whole, on one line.
    env, versions = two_runs
    result = _cli(["history"], env | {"COLUMNS": columns}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for version in versions:
        lines = [line for line in result.stdout.splitlines() if version in line]
        assert len(lines) == 1, f"{version} not on one line:\n{result.stdout}"
        assert _row(result.stdout, version)[0] == version
    live = _row(result.stdout, versions[1])
    assert "current" in live and "svc,knn,logreg,tree,xgboost" in live


def test_history_json(two_runs, tmp_path):
    env, versions = two_runs
    result = _cli(["history", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert [run["version"] for run in runs] == versions  # newest first
    assert runs[1]["status"] == "current" and runs[0]["status"] == "retired"
    assert runs[1]["rows"] == 114


def test_status_json_includes_the_live_version(published, cli_env, tmp_path):
    version, _ = published
    result = _cli(["status", "--json"], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["version"] == version
    assert (status["rows"], status["model"], status["expired"]) == (3, "svc", False)
    assert status["training_run_id"] == "TrainModelsFlow/7"
    assert datetime.fromisoformat(status["published_at"]).tzinfo is not None
    assert 0 <= status["age_seconds"] < 600


def test_status_json_without_a_version(cli_env, tmp_path):
    result = _cli(["status", "--json"], cli_env, tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout)["version"] is None


def test_lookup_json(published, cli_env, tmp_path):
    version, keys = published
    absent = "0" * 64
    result = _cli(["lookup", "--json", keys[0], absent], cli_env, tmp_path)
    assert result.returncode == 1  # one key not found, as without --json
    answer = json.loads(result.stdout)
    assert answer["version"] == version
    assert answer["keys"] == [keys[0], absent]
    assert answer["found"] == 1
    assert answer["predictions"][0]["class"] == "malignant"
    assert answer["predictions"][1] is None


def test_json_errors_are_json(published, cli_env, tmp_path):
    path = tmp_path / "rows.csv"
    ROWS.drop(columns=["mean texture"]).to_csv(path, index=False)
    result = _cli(["lookup", "--json", "--csv", str(path)], cli_env, tmp_path)
    assert result.returncode == 2
    assert "missing feature column(s) ['mean texture']" in json.loads(result.stdout)["error"]


def test_lookup_never_wraps_a_row_key(published, cli_env, tmp_path):
    _, keys = published
    result = _cli(["lookup", *keys], cli_env | {"COLUMNS": "60"}, tmp_path)
    assert result.returncode == 0
    for key in keys:
        assert _row(result.stdout, key)[0] == key


def test_status_json_after_the_live_version_expired(redis_client, redis_prefix, cli_env, tmp_path):
    online = OnlineStore(redis_client, prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/1")
    online.stage(
        version,
        {"model": "svc", "feature_columns": COLUMNS, "classes": list(CLASSES)},
        ttl_seconds=60,
    )
    online.write(version, 0, row_keys(ROWS.to_numpy())[:1], _scored([0.9]), ttl_seconds=60)
    assert online.publish(version, 1, 1)
    redis_client.delete(online.manifest(version))  # what its TTL does (rows expire alike)
    result = _cli(["status", "--json"], cli_env, tmp_path)
    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert (status["version"], status["expired"], status["published_at"]) == (version, True, None)


def test_status_and_lookup_on_a_redis_cluster(redis_cluster_url, redis_prefix, tmp_path):
    """BATCHSCORE_REDIS_URL names one node of a 3-master cluster: the CLI finds the
    cluster by itself, and reads the version written there."""
    from test_online import connect_url

    online = OnlineStore(connect_url(redis_cluster_url), prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/5")
    keys = row_keys(ROWS.to_numpy())
    online.stage(version, {"model": "svc", "feature_columns": COLUMNS, "classes": list(CLASSES)})
    online.write(version, 0, keys, _scored([0.9, 0.1, 0.9]))
    assert online.publish(version, 3, 1)
    env = {
        "BATCHSCORE_REDIS_URL": redis_cluster_url,
        "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        "BATCHSCORE_HOME": str(tmp_path / "home"),
    }
    try:
        result = _cli(["status"], env, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert version in result.stdout and _row(result.stdout, "keys") == ["keys", "3"]
        path = tmp_path / "rows.csv"
        ROWS.to_csv(path, index=False)
        result = _cli(["lookup", "--csv", str(path)], env, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _row(result.stdout, keys[1])[1:3] == ["0", "benign"]
        assert "3 of 3 found" in result.stdout
    finally:
        online.client.delete(online.pointer)
        online.discard(version)
        online.close()

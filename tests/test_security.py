"""Security: no committed secrets, integrity-checked models, SQL and Redis never injected."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, inspect

from batchscore.batch.bundle import load_models
from batchscore.batch.predictions import LoadedModel, predict_all
from batchscore.online.store import OnlineStore
from batchscore.rows.errors import InputError
from batchscore.rows.keys import id_keys
from batchscore.storage.object_store import ObjectStore
from batchscore.storage.tracking import Tracker
from batchscore.training.models import IntegrityError, dump_model
from batchscore.versions import new_version

ROOT = Path(__file__).resolve().parents[1]
# What a committed file may hold where a secret goes: an interpolation or a placeholder.
PLACEHOLDER = re.compile(r"^(\$\{.*|\$\$?[A-Z_]+|change-me[-\w]*|password|\.\.\.|…|<[^>]+>|\*+)$")


def shipped_files() -> list[Path]:
    """Everything a user gets, except the tests (whose dummy credentials are for moto)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in listed if not f.startswith("tests/") and (ROOT / f).is_file()]


def test_no_credentials_in_committed_files():
    url_secret = re.compile(r"[a-z0-9+]+://[^\s/:@'\"]*:([^\s@'\"/]+)@")
    assignment = re.compile(
        r"(?<![{$\w])([A-Z][A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|SECRET_ACCESS_KEY))[=:]\s*['\"]?([^\s'\"#]*)"
    )
    problems = []
    for path in shipped_files():
        text = path.read_text(errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            secrets = [m.group(1) for m in url_secret.finditer(line)]
            secrets += [m.group(2) for m in assignment.finditer(line) if m.group(2)]
            if any(not PLACEHOLDER.match(secret) for secret in secrets):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
        if re.search(r"AKIA[0-9A-Z]{16}", text):
            problems.append(f"{path.relative_to(ROOT)}: an AWS access key id")
    assert not problems, "\n".join(problems)


def _recorded_model(tmp_path: Path, settings_for):
    from sklearn.linear_model import LogisticRegression

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    x = np.random.default_rng(0).normal(size=(40, 2))
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    blob, sha = dump_model(model)
    store = ObjectStore.from_settings(settings)
    uri = store.put_bytes("models/run/logreg.joblib", blob)
    metrics = {m: 1.0 for m in ("precision", "recall", "f1", "roc_auc", "accuracy")}
    tracker = Tracker(settings.resolved_database_url)
    tracker.record_training(
        "Train/1",
        {
            "dataset": "d",
            "target": "y",
            "negative_class": "0",
            "positive_class": "1",
            "feature_columns": ["a", "b"],
            "n_train": 40,
            "n_test": 0,
            "batch_input_uri": uri,
        },
        {
            "logreg": {
                **metrics,
                "cv_score": 1.0,
                "best_params": {},
                "model_uri": uri,
                "model_sha256": sha,
            }
        },
        "logreg",
    )
    tracker.close()
    return settings, store, uri


class _Payload:
    """Unpickling this would create a file: proof that a tampered model never loads."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_model_is_refused_and_never_deserialised(tmp_path, settings_for):
    settings, store, uri = _recorded_model(tmp_path, settings_for)
    assert load_models("champion", settings).models[0].name == "logreg"  # intact: loads

    marker = tmp_path / "pwned"
    store.put_bytes("models/run/logreg.joblib", pickle.dumps(_Payload(marker)))
    with pytest.raises(IntegrityError, match="does not match the recorded"):
        load_models("champion", settings)
    assert not marker.exists()


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
)
def test_sql_only_sees_bound_parameters(database, tmp_path, request):
    url = (
        f"sqlite:///{tmp_path / 'm.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    hostile = "x'); DROP TABLE training_runs; --"
    tracker = Tracker(url)
    metrics = {m: 0.5 for m in ("precision", "recall", "f1", "roc_auc", "accuracy")}
    tracker.record_training(
        hostile,
        {
            "dataset": hostile,
            "target": hostile,
            "negative_class": "a'b",
            "positive_class": 'c"d',
            "feature_columns": [hostile],
            "n_train": 1,
            "n_test": 1,
            "batch_input_uri": hostile,
        },
        {
            "m": {
                **metrics,
                "cv_score": 0.5,
                "best_params": {"k": hostile},
                "model_uri": hostile,
                "model_sha256": "0" * 64,
            }
        },
        "m",
    )
    record = tracker.model_records("champion")[0]
    assert record.training_run_id == hostile and record.feature_columns == [hostile]
    tracker.close()
    engine = create_engine(url)
    assert {"training_runs", "model_metrics", "batch_runs"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()


@pytest.mark.parametrize("bad_id", ["", "two words", "a:b", "glob*", "what?", "[x]", "tab\there"])
def test_ids_that_could_reach_redis_as_patterns_or_commands_are_refused(bad_id):
    ids = pd.Series(["ok-1", bad_id])
    with pytest.raises(InputError, match=r"rows.csv: column 'id', row 2"):
        id_keys(ids, "rows.csv", "id")


@pytest.mark.parametrize("prefix", ["", "a:b", "has space"])
def test_prefixes_that_would_break_the_layout_are_refused(prefix, redis_client):
    with pytest.raises(ValueError, match="prefix"):
        OnlineStore(redis_client, prefix)


def test_versions_are_sanitised_and_values_are_json_whatever_the_class_names(
    redis_client, redis_prefix
):
    version = new_version("Flow/1 *; FLUSHALL")
    assert re.fullmatch(r"[0-9T]+Z-[A-Za-z0-9_-]+", version)

    class Fixed:
        classes_ = np.array([0, 1])

        def predict(self, x):
            return np.array([0, 1])

        def predict_proba(self, x):
            return np.array([[0.9, 0.1], [0.2, 0.8]])

    store = OnlineStore(redis_client, redis_prefix)
    evil = 'evil"}, "x": {"'
    store.stage(
        version,
        {
            "model": evil,
            "classes": ['neg"ative', "pos\\itive\n"],
            "key_scheme": "id",
            "id_column": "id",
        },
    )
    outputs = predict_all([LoadedModel(evil, Fixed(), "a" * 64)], pd.DataFrame({"f": [1.0, 2.0]}))
    store.write(version, 0, ["r0", "r1"], outputs)
    assert store.publish(version, 2, 1)
    decoded = store.get_many(["r0", "r1"])
    assert [d["class"] for d in decoded] == ['neg"ative', "pos\\itive\n"]
    assert decoded[0]["model"] == evil
    # The HTTP service's JSON text of each row is valid JSON saying the same.
    layout = store.layout()
    texts = [layout.json(redis_client.hget(*layout.locate(k))) for k in ("r0", "r1")]
    assert [json.loads(t) for t in texts] == decoded


def test_retire_with_a_glob_prefix_touches_only_its_own_keys(redis_client, redis_prefix):
    from datetime import UTC, datetime, timedelta

    other = OnlineStore(redis_client, f"{redis_prefix}p1")
    globby = OnlineStore(redis_client, f"{redis_prefix}p[1]")
    for store in (other, globby):
        for minutes in (3, 2, 1):
            version = new_version("r", datetime.now(UTC) - timedelta(minutes=minutes))
            store.stage(version, {"model": "m", "key_scheme": "id", "id_column": "id"})
            proba = np.array([0.5])
            store.write(version, 0, ["k"], [(LoadedModel("m", None, "0" * 64), proba > 0, proba)])
            store.publish(version, 1, 1)
    kept = set(redis_client.keys(f"*{other.prefix}*"))
    layouts = [globby.layout(v) for v in globby.manifests()]
    globby.retire(keep=1)
    assert set(redis_client.keys(f"*{other.prefix}*")) == kept
    # Only the current version's row is left.
    assert [bool(redis_client.exists(lay.locate("k")[0])) for lay in layouts] == [1, 0, 0]

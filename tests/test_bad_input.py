"""Bad input: a clear error naming file, column and row; nothing published is touched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import start_flow

from batchscore.batch.bundle import ModelBundle
from batchscore.batch.predictions import LoadedModel
from batchscore.batch.scoring import score_shard
from batchscore.batch.shards import plan_shards, read_shard
from batchscore.online.store import OnlineStore
from batchscore.rows.errors import InputError
from batchscore.rows.keys import row_keys
from batchscore.storage.object_store import ObjectStore
from batchscore.training.datasets import load_dataset

FEATURES = ["a", "b", "c"]


def good_frame(rows: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.normal(size=(rows, 3)), columns=FEATURES)


def read_input(source: str, shard_rows: int | None, settings) -> int:
    """Plan the input, then read and check every shard as the scoring tasks do: rows read."""
    plan = plan_shards(source, FEATURES, shard_rows, "Flow/1", settings)
    return sum(block.rows for shard in plan.shards for block in read_shard(shard, settings))


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


CASES = {
    "missing column": ("a,b\n1,2\n", r"missing feature column\(s\) \['c'\]"),
    "non-numeric value": ("a,b,c\n1,2,3\n4,five,6\n", r"column 'b', row 2: .*five"),
    "NaN": ("a,b,c\n1,2,3\n4,5,6\n7,,9\n", r"column 'b', row 3: nan is not a finite number"),
    "infinity": ("a,b,c\n1,inf,3\n", r"column 'b', row 1: inf is not a finite number"),
    "empty file": ("", r"the file is empty"),
    "header only": ("a,b,c\n", r"header but no rows"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_csv_is_rejected_naming_file_column_and_row(case, tmp_path, settings_for):
    text, message = CASES[case]
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    source = write_csv(tmp_path / "input.csv", text)
    with pytest.raises(InputError, match=message) as error:
        read_input(source, 100, settings)
    assert str(tmp_path / "input.csv") in str(error.value)
    # Nothing is copied: the store holds no scratch of the input.
    assert not list((tmp_path / "home").rglob("*.*"))


def test_error_in_a_late_shard_names_the_row_or_its_byte_offset(tmp_path, settings_for):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    frame = good_frame(10)
    frame.loc[7, "c"] = np.nan
    source = tmp_path / "late.csv"
    frame.to_csv(source, index=False)
    # Parquet rows have their number in the file, whichever shard reads them.
    parquet = source.with_suffix(".parquet")
    frame.to_parquet(parquet, row_group_size=3)
    with pytest.raises(InputError, match=r"column 'c', row 8"):
        read_input(str(parquet), 3, settings)
    # A CSV range after the first names the line by its byte offset, the first by number.
    text = source.read_text()
    offset = len("\n".join(text.split("\n")[:8])) + 1
    with pytest.raises(InputError, match=rf"column 'c', the row at byte offset {offset}:"):
        read_input(str(source), 3, settings)
    frame.loc[7, "c"], frame.loc[1, "a"] = 0.5, np.inf
    frame.to_csv(source, index=False)
    with pytest.raises(InputError, match=r"column 'a', row 2: inf"):
        read_input(str(source), 3, settings)


def test_missing_file_and_missing_bucket_are_named(tmp_path, settings_for, s3_env):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home"), **s3_env})
    with pytest.raises(InputError, match="nope.csv: no such file"):
        plan_shards(str(tmp_path / "nope.csv"), FEATURES, 2, "Flow/1", settings)
    with pytest.raises(InputError, match="s3://no-such-bucket/rows.csv"):
        plan_shards("s3://no-such-bucket/rows.csv", FEATURES, 2, "Flow/1", settings)


def test_a_file_that_is_not_a_table_is_named(tmp_path, settings_for):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    with pytest.raises(InputError, match="image.png: not a CSV or Parquet file"):
        plan_shards(str(binary), FEATURES, 2, "Flow/1", settings)
    fake_parquet = tmp_path / "rows.parquet"
    fake_parquet.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="rows.parquet: not a readable Parquet file"):
        plan_shards(str(fake_parquet), FEATURES, 2, "Flow/1", settings)


def test_reordered_and_extra_columns_key_and_predict_like_the_original(
    tmp_path, settings_for, redis_client, redis_prefix
):
    from sklearn.linear_model import LogisticRegression

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    frame = good_frame(40)
    labels = (frame["a"] > 0).astype(int)
    model = LoadedModel("logreg", LogisticRegression().fit(frame, labels), "0" * 64)
    bundle = ModelBundle("Train/1", [model], FEATURES, ("no", "yes"))
    online = OnlineStore(redis_client, redis_prefix)

    original = tmp_path / "original.parquet"
    frame.to_parquet(original)
    shuffled = tmp_path / "shuffled.csv"
    frame[["c", "a", "b"]].assign(comment="ignored").to_csv(shuffled, index=False)

    values = {}
    for name, source in {"original": original, "shuffled": shuffled}.items():
        version = f"v-{name}"
        shards = plan_shards(str(source), FEATURES, 100, f"Flow/{name}", settings).shards
        online.stage(version, {"model": "logreg", "classes": ["no", "yes"]})
        result = score_shard(0, shards[0], bundle, version, settings, online=online)
        assert result.keys_written == 40
        values[name] = online.get_many(row_keys(frame[FEATURES].to_numpy()), version)
        assert None not in values[name]
    assert values["original"] == values["shuffled"]


def test_repeated_rows_are_one_key_and_counted(tmp_path, settings_for, redis_client, redis_prefix):
    from sklearn.dummy import DummyClassifier

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    frame = pd.concat([good_frame(5), good_frame(5).iloc[:2]], ignore_index=True)
    model = LoadedModel("dummy", DummyClassifier().fit(frame, [0, 1] * 3 + [0]), "0" * 64)
    bundle = ModelBundle("Train/1", [model], FEATURES, ("no", "yes"))
    source = tmp_path / "dupes.csv"
    frame.to_csv(source, index=False)
    shards = plan_shards(str(source), FEATURES, 100, "Flow/1", settings).shards
    online = OnlineStore(redis_client, redis_prefix)
    online.stage("v1", {"model": "dummy", "classes": ["no", "yes"]})
    result = score_shard(0, shards[0], bundle, "v1", settings, online=online)
    assert (result.rows_scored, result.keys_written) == (7, 7)  # repeats rewrite their key
    layout = online.layout("v1")
    rows = sum(redis_client.hlen(f"{layout.rows}{b}") for b in range(layout.buckets))
    assert rows == 5 == online.key_count("v1")  # what the join reports: 7 - 5 = 2 repeats


def test_training_label_that_is_not_binary_is_rejected(tmp_path):
    frame = good_frame(9).assign(label=[0, 1, 2] * 3)
    source = tmp_path / "three.csv"
    frame.to_csv(source, index=False)
    with pytest.raises(InputError, match=r"three.csv: column 'label' must hold exactly two"):
        load_dataset(str(source), "label")


@pytest.mark.flows
def test_a_rejected_batch_leaves_the_live_version_and_database_untouched(
    trained_service_env_local_datastore, tmp_path, settings_for
):
    # Scored with the session's one service-mode training (conftest), on a copy of its
    # database: the batch runs this test records are its own.
    from sqlalchemy import create_engine, func, select

    from batchscore.storage.tracking import batch_runs

    env = trained_service_env_local_datastore
    work = tmp_path / "work"
    assert start_flow("batch_processing.py", env, work)[0] == "successful"
    settings = settings_for(env)
    online = OnlineStore.from_settings(settings)
    live = online.current()
    store = ObjectStore.from_settings(settings)
    published = pd.read_csv(io.BytesIO(store.get_bytes(online.status()["input"])))
    bad = tmp_path / "bad.csv"
    published.drop(columns=["mean radius"]).to_csv(bad, index=False)

    status, _, output = start_flow("batch_processing.py", env, work, input_path=str(bad))
    assert status == "failed"
    assert "missing feature column(s) ['mean radius']" in output
    assert online.current() == live
    assert online.status()["keys"] == len(published)
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(batch_runs)).scalar() == 1
    engine.dispose()


@pytest.mark.flows
def test_a_bad_input_fails_the_flow_at_once_without_retries(embedded_env, tmp_path):
    # A deterministic error is not retried: one short message naming file, column and row,
    # no "Internal error" traceback, and the run fails on its first attempt.
    path = tmp_path / "labels.csv"
    path.write_text("x,label\n1.0,fraud\n2.0,legit\n3.0,\n")
    env = {**embedded_env, "BATCHSCORE_STEP_RETRIES": "2"}
    status, run, output = start_flow(
        "train_models.py", env, tmp_path / "work", dataset=str(path), target="label"
    )
    assert status == "failed"
    message = f"{path}: column 'label', row 3: the label is missing"
    assert output.count(message) == 1, output
    assert "Internal error" not in output.split("will not be retried")[0], output
    assert "Traceback" not in output
    attempts = [t for t in run["load_and_prepare_data"]]
    assert len(attempts) == 1 and attempts[0].current_attempt == 0

"""score_shard on its own: a shard planned into the store, scored into a staged version."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import redis
from conftest import keyspace
from threadpoolctl import threadpool_info

from batchscore.batch.bundle import ModelBundle
from batchscore.batch.predictions import LoadedModel
from batchscore.batch.publishing import publish, stage
from batchscore.batch.scoring import SCORE_BLOCK_ROWS, score_shard
from batchscore.batch.shards import plan_shards
from batchscore.online.errors import PublishError
from batchscore.online.layout import owner_name
from batchscore.online.store import OnlineStore
from batchscore.rows.errors import InputError
from batchscore.rows.keys import row_keys
from batchscore.versions import new_version

COLUMNS = ["a", "b"]


class RecordingModel:
    """Probability = a's fraction of a + b; remembers the thread pools it ran under."""

    classes_ = np.array([0, 1])

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.calls = 0

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        self.threads += [pool["num_threads"] for pool in threadpool_info()]
        a, b = features["a"].to_numpy(), features["b"].to_numpy()
        positive = a / (a + b)
        return np.column_stack([1 - positive, positive])


@pytest.fixture
def planned(tmp_path, redis_url, redis_prefix, settings_for):
    rows = pd.DataFrame({"a": np.arange(1.0, 50_001.0), "b": np.full(50_000, 2.0)})
    rows.loc[49_999] = rows.loc[0]  # one repeated row: one key
    path = tmp_path / "rows.parquet"
    rows.to_parquet(path, index=False)
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
            "BATCHSCORE_SCORING_THREADS": "1",
        }
    )
    shards = plan_shards(path.as_uri(), COLUMNS, 50_000, "Flow/1", settings).shards
    return rows, shards, settings


@pytest.mark.services
def test_a_shard_is_scored_in_blocks_and_counted_once(planned, redis_client, monkeypatch):
    rows, shards, settings = planned
    monkeypatch.setattr("batchscore.batch.scoring.SCORE_BLOCK_ROWS", 20_000)  # 3 blocks, not 1
    model = RecordingModel()
    bundle = ModelBundle("train-1", [LoadedModel("ratio", model, "ab" * 32)], COLUMNS, ("n", "y"))
    version = new_version("Flow/1")
    online = OnlineStore.from_settings(settings)
    online.stage(version, {"model": "ratio", "classes": ["n", "y"]})

    result = score_shard(0, shards[0], bundle, version, settings)

    # The repeated row is written again (its key, its value): the version holds 49,999 keys.
    assert (result.rows_scored, result.keys_written) == (50_000, 50_000)
    assert online.key_count(version) == 49_999
    assert model.calls == math.ceil(50_000 / 20_000)  # scored a block at a time
    assert set(model.threads) == {1}  # BATCHSCORE_SCORING_THREADS capped every pool
    assert redis_client.hget(online.manifest(version), "shard:0") == b"50000"
    assert online.publish(version, 50_000, 1)
    first, last = online.get_many(row_keys(rows.iloc[[0, 49_998]].to_numpy()))
    assert (first["label"], first["proba"]) == (0, round(1 / 3, 6))
    assert (last["label"], last["class"], last["proba"]) == (1, "y", round(49_999 / 50_001, 6))
    assert first["model_version"] == "ab" * 6


# ------------------------------------------------- publishing: supersession, lost keys


class InterruptingModel(RecordingModel):
    """Runs `interrupt` (once) while scoring its second block: another run, mid-shard."""

    def __init__(self, interrupt) -> None:
        super().__init__()
        self.interrupt = interrupt

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        if self.calls == 1 and self.interrupt:
            self.interrupt, interrupt = None, self.interrupt
            interrupt()
        return super().predict_proba(features)


def _run_parts(tmp_path, name: str, rows: int, shard_rows: int, settings):
    frame = pd.DataFrame({"a": np.arange(1.0, rows + 1.0), "b": np.full(rows, 3.0)})
    path = tmp_path / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    plan = plan_shards(path.as_uri(), COLUMNS, shard_rows, f"Flow/{name}", settings)
    return path.as_uri(), plan.shards


@pytest.mark.services
def test_a_run_superseded_while_writing_leaves_nothing_behind(
    planned, redis_client, redis_prefix, tmp_path
):
    # The older run's shard 0 is done; while its shard 1 is writing, a newer run publishes
    # (and retires the older, staged version). The older run finishes last: it must end
    # discarded, with no key of it left, and the newer version live.
    _, _, settings = planned
    online = OnlineStore.from_settings(settings)
    old, new = new_version("Flow/old"), new_version("Flow/new")
    # Two shards of one and a half score blocks each: the second block interrupts.
    shard = SCORE_BLOCK_ROWS * 3 // 2
    old_input, old_shards = _run_parts(tmp_path, "old", 2 * shard, shard, settings)
    new_input, new_shards = _run_parts(tmp_path, "new", 1_000, 1_000, settings)
    plain = ModelBundle(
        "train-1", [LoadedModel("m", RecordingModel(), "ab" * 32)], COLUMNS, ("n", "y")
    )

    def newer_run() -> None:
        stage(new, "Flow/new", new_input, plain, settings)
        results = [score_shard(0, new_shards[0], plain, new, settings)]
        assert publish("Flow/new", new, results, new_input, plain, settings).published

    stage(old, "Flow/old", old_input, plain, settings)
    results = [score_shard(0, old_shards[0], plain, old, settings)]
    late = InterruptingModel(newer_run)
    late_bundle = ModelBundle("train-1", [LoadedModel("m", late, "ab" * 32)], COLUMNS, ("n", "y"))
    results.append(score_shard(1, old_shards[1], late_bundle, old, settings))
    assert late.calls == 2  # the newer run went live in the middle of this shard
    outcome = publish("Flow/old", old, results, old_input, plain, settings)

    assert not outcome.published
    assert online.current() == new
    layout = online.layout(new)
    new_keys = {
        layout.locate(k)[0]
        for k in row_keys(np.column_stack([np.arange(1.0, 1_001.0), np.full(1_000, 3.0)]))
    }
    control = {online.pointer, online.versions, online.manifest(new), online.sequence}
    assert keyspace(redis_client, redis_prefix) == new_keys | control


@pytest.mark.services
def test_keys_lost_before_the_switch_keep_the_pointer_where_it_was(planned, redis_client, tmp_path):
    # Keys acknowledged by Redis, then lost (evicted, flushed, a failover) before
    # ingest_redis: the shard counts still add up, but the version must not go live.
    rows, shards, settings = planned
    online = OnlineStore.from_settings(settings)
    bundle = ModelBundle(
        "train-1", [LoadedModel("m", RecordingModel(), "ab" * 32)], COLUMNS, ("n", "y")
    )
    live_input, live_shards = _run_parts(tmp_path, "live", 500, 500, settings)
    live = new_version("Flow/live")
    stage(live, "Flow/live", live_input, bundle, settings)
    live_results = [score_shard(0, live_shards[0], bundle, live, settings)]
    assert publish("Flow/live", live, live_results, live_input, bundle, settings).published

    version = new_version("Flow/2")
    stage(version, "Flow/2", "rows.parquet", bundle, settings)
    results = [score_shard(0, shards[0], bundle, version, settings)]
    written = sorted(set(row_keys(rows[COLUMNS].to_numpy())))
    doomed = np.random.default_rng(7).choice(written, size=len(written) // 100, replace=False)
    layout = online.layout(version)
    for key in doomed:  # 1% of the shard
        redis_client.hdel(*layout.locate(str(key)))

    with pytest.raises(PublishError, match=r"shard 0 lost keys .* sampled keys are gone"):
        publish("Flow/2", version, results, "rows.parquet", bundle, settings)
    assert online.current() == live
    assert online.get_many(row_keys(np.column_stack([[1.0], [3.0]])))[0]["model"] == "m"


# --------------------------------------------------------------------- id-keyed versions


@pytest.mark.services
def test_an_id_keyed_version_is_looked_up_by_id(tmp_path, redis_url, redis_prefix, settings_for):
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
            "BATCHSCORE_ID_COLUMN": "customer",
        }
    )
    path = tmp_path / "ids.csv"
    path.write_text("customer,a,b\n007,1.0,3.0\n7,9.0,3.0\n")  # two ids, one number
    bundle = ModelBundle(
        "train-1", [LoadedModel("m", RecordingModel(), "ab" * 32)], COLUMNS, ("n", "y")
    )
    version = new_version("Flow/ids")
    shards = plan_shards(str(path), COLUMNS, 100, "Flow/ids", settings).shards
    stage(version, "Flow/ids", str(path), bundle, settings)
    results = [score_shard(0, shards[0], bundle, version, settings)]
    assert results[0].keys_written == 2
    assert publish("Flow/ids", version, results, str(path), bundle, settings).published

    # A reader without BATCHSCORE_ID_COLUMN follows the manifest, not its own settings.
    online = OnlineStore(redis.Redis.from_url(redis_url), redis_prefix)
    assert online.key_scheme() == ("id", "customer")
    assert online.get("007")["proba"] == 0.25 and online.get("7")["proba"] == 0.75
    rows = pd.DataFrame({"customer": ["7", "007", "8"], "a": [0.0, 0.0, 0.0], "b": [1.0] * 3})
    found = online.lookup_rows(rows)
    assert [r and r["proba"] for r in found] == [0.75, 0.25, None]


def test_an_id_column_missing_from_the_input_is_an_error(tmp_path, settings_for):
    settings = settings_for(
        {"BATCHSCORE_HOME": str(tmp_path / "home"), "BATCHSCORE_ID_COLUMN": "customer"}
    )
    path = tmp_path / "no-ids.csv"
    path.write_text("a,b\n1.0,3.0\n")
    with pytest.raises(InputError, match=r"no-ids.csv: no id column 'customer'"):
        plan_shards(str(path), COLUMNS, 100, "Flow/1", settings)


@pytest.mark.services
def test_a_bad_row_in_the_last_shard_publishes_nothing_and_drops_the_staged_keys(
    planned, redis_client, redis_prefix, tmp_path
):
    _, _, settings = planned
    online = OnlineStore.from_settings(settings)
    bundle = ModelBundle(
        "train-1", [LoadedModel("m", RecordingModel(), "ab" * 32)], COLUMNS, ("n", "y")
    )
    live_input, live_shards = _run_parts(tmp_path, "live", 500, 500, settings)
    live = new_version("Flow/live")
    stage(live, "Flow/live", live_input, bundle, settings)
    assert publish(
        "Flow/live", live, [score_shard(0, live_shards[0], bundle, live, settings)],
        live_input, bundle, settings,
    ).published  # fmt: skip
    before = keyspace(redis_client, redis_prefix)

    frame = pd.DataFrame({"a": np.arange(1.0, 3_001.0), "b": np.full(3_000, 3.0)})
    frame.loc[2_990, "b"] = np.nan
    path = tmp_path / "late.csv"
    frame.to_csv(path, index=False)
    plan = plan_shards(str(path), COLUMNS, 1_000, "Flow/bad", settings, max_tasks=3)
    assert len(plan.shards) == 3
    version = new_version("Flow/bad")
    stage(version, "Flow/bad", str(path), bundle, settings)
    assert score_shard(0, plan.shards[0], bundle, version, settings).keys_written > 0
    assert score_shard(1, plan.shards[1], bundle, version, settings).keys_written > 0
    with pytest.raises(InputError, match=r"late.csv: column 'b', the row at byte offset \d+: nan"):
        score_shard(2, plan.shards[2], bundle, version, settings)
    assert online.current() == live
    assert keyspace(redis_client, redis_prefix) == before  # the staged version is gone


def test_an_id_repeated_in_a_writers_buffer_keeps_its_first_row():
    """Within one shard, an id-keyed version keeps an id's first row: the writer drops later
    repeats in its buffer (`first_rows`), the script keeps a shard's own earlier field."""
    from batchscore.online.writer import first_rows

    rng = np.random.default_rng(3)
    found = rng.integers(0, 256, (1_000, 32), dtype=np.uint8)
    assert first_rows(found) is None  # the usual case: nothing repeats
    found[700], found[900] = found[5], found[5]
    twin = found[10].copy()
    twin[20:] ^= 1  # shares its first 8 bytes with row 10, and is not a repeat
    found[11] = twin
    keep = first_rows(found)
    assert 5 in keep and 700 not in keep and 900 not in keep
    assert {10, 11} <= set(keep.tolist()) and len(keep) == 998
    assert keep.tolist() == sorted(keep.tolist())  # rows stay in input order


# ------------------------------------- repeated keys across shards: first in input order


def _three_shards(tmp_path, frame: pd.DataFrame, settings):
    """`frame` as a Parquet file planned into shards of 10 rows: 0-9, 10-19, 20-29."""
    path = tmp_path / "repeats.parquet"
    frame.to_parquet(path, index=False)
    plan = plan_shards(path.as_uri(), COLUMNS, 10, "Flow/repeats", settings)
    assert [[(p.start, p.end) for p in s.pieces] for s in plan.shards] == [
        [(0, 10)], [(10, 20)], [(20, 30)],
    ]  # fmt: skip
    return path.as_uri(), plan


def _score_and_publish(uri, plan, settings, reverse: bool):
    bundle = ModelBundle(
        "train-1", [LoadedModel("m", RecordingModel(), "ab" * 32)], COLUMNS, ("n", "y")
    )
    version = new_version("Flow/repeats")
    stage(version, "Flow/repeats", uri, bundle, settings, expected_rows=30)
    shards = plan.shards[::-1] if reverse else plan.shards
    results = sorted(
        (score_shard(s.index, s, bundle, version, settings) for s in shards),
        key=lambda r: r.shard,
    )
    return version, publish("Flow/repeats", version, results, uri, bundle, settings, plan=plan)


def test_shards_are_numbered_in_input_order(tmp_path, settings_for):
    # Files in name order (whatever order they were written in), ranges in file order,
    # consecutive pieces per shard: shard i's rows all come before shard i + 1's.
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("part-2", "part-0", "part-1"):
        frame = pd.DataFrame({"a": np.arange(1.0, 11.0), "b": np.full(10, 2.0)})
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    for shard_rows, max_tasks in ((4, None), (3, 4), (None, 2)):
        plan = plan_shards(
            str(folder), COLUMNS, shard_rows, "Flow/1", settings, max_tasks=max_tasks
        )
        order = [(p.file.uri, p.start) for shard in plan.shards for p in shard.pieces]
        assert order == sorted(order) and len(plan.shards) > 1
        assert [s.index for s in plan.shards] == list(range(len(plan.shards)))


@pytest.mark.services
@pytest.mark.parametrize("reverse", [False, True], ids=["in order", "reversed"])
def test_an_id_in_two_shards_gets_its_first_row_whichever_shard_writes_last(
    tmp_path, redis_url, redis_prefix, redis_client, settings_for, reverse
):
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
            "BATCHSCORE_ID_COLUMN": "customer",
        }
    )
    ids = [f"c{i:02d}" for i in range(30)]
    ids[24] = "c00"  # row 25 (shard 2) repeats row 1's id (shard 0), with other features
    ids[7] = "c05"  # a repeat within shard 0
    ids[12] = "c28"  # row 13 (shard 1) comes before row 29 (shard 2)
    frame = pd.DataFrame({"customer": ids, "a": np.arange(1.0, 31.0), "b": np.full(30, 3.0)})
    uri, plan = _three_shards(tmp_path, frame, settings)

    version, result = _score_and_publish(uri, plan, settings, reverse)

    assert result.published
    assert (result.rows_scored, result.keys_written) == (30, 27)
    assert result.report.duplicates == 3 and result.report.keys_written == 27
    online = OnlineStore.from_settings(settings)
    found = {k: online.get(k)["proba"] for k in ("c00", "c05", "c28")}
    assert found == {"c00": 0.25, "c05": round(6 / 9, 6), "c28": round(13 / 16, 6)}
    assert online.status()["keys"] == 27
    layout = online.layout(version)
    assert not redis_client.exists(*(owner_name(n) for n in layout.bucket_names()))
    from batchscore.storage.tracking import Tracker

    with Tracker(settings.resolved_database_url) as tracker:
        (run,) = tracker.batch_history(1)
    assert (run["keys_written"], run["duplicates"], run["rows_scored"]) == (27, 3, 30)


@pytest.mark.services
def test_a_feature_row_repeated_across_shards_is_counted_once(
    tmp_path, redis_url, redis_prefix, settings_for
):
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        }
    )
    frame = pd.DataFrame({"a": np.arange(1.0, 31.0), "b": np.full(30, 3.0)})
    frame.loc[24] = frame.loc[0]  # shard 2 repeats shard 0's first row
    frame.loc[15] = frame.loc[11]  # and shard 1 one of its own
    uri, plan = _three_shards(tmp_path, frame, settings)
    _, result = _score_and_publish(uri, plan, settings, reverse=True)
    assert result.published
    assert (result.rows_scored, result.keys_written, result.report.duplicates) == (30, 28, 2)

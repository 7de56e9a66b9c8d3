"""Faults injected against the real services, through a proxy the tests can cut.

The shared PostgreSQL and Redis are never stopped: a `TcpProxy` between client and
server plays the dying server.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
from conftest import start_flow
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy, closed_port

from batchscore.batch.predictions import LoadedModel
from batchscore.online.connection import connect
from batchscore.online.errors import PublishError
from batchscore.online.store import OnlineStore
from batchscore.storage.object_store import ObjectStore, StoreError
from batchscore.storage.tracking import batch_runs, model_metrics
from batchscore.versions import new_version

META = {"key_scheme": "id", "id_column": "id"}  # rows keyed by readable ids


def scores(first: int, count: int, tag: str) -> list:
    """`predict_all`'s output for rows first..first+count: model `tag`, and a probability
    that says the row's number (i / 1e6), so a reader can tell which row it got."""
    proba = np.arange(first, first + count) / 1e6
    model = LoadedModel(tag, None, "0" * 64, 0.5)
    return [(model, (proba >= 0.5).astype(int), proba)]


def numbers(values: list) -> list[int]:
    return [round(v["proba"] * 1e6) for v in values]


def publish_rows(store: OnlineStore, version: str, n: int, tag: str, shards: int = 1) -> None:
    store.stage(version, {"model": tag, **META})
    per_shard = n // shards
    for shard in range(shards):
        first = shard * per_shard
        keys = [f"row{i}" for i in range(first, first + per_shard)]
        store.write(version, shard, keys, scores(first, per_shard, tag))
    assert store.publish(version, per_shard * shards, shards)


@pytest.fixture
def redis_proxy(redis_url: str):
    parsed = urlparse(redis_url)
    proxy = TcpProxy(parsed.hostname, parsed.port or 6379)
    yield proxy, proxy.url("redis", parsed.path)
    proxy.close()


@pytest.fixture
def online_at(settings_for, redis_prefix):
    """An OnlineStore under this test's prefix, through any URL (e.g. a proxy's)."""

    def build(url: str) -> OnlineStore:
        return OnlineStore(connect(settings_for({"BATCHSCORE_REDIS_URL": url})), redis_prefix)

    return build


@pytest.mark.services
def test_redis_dying_mid_publish_keeps_the_previous_version(
    redis_client, redis_proxy, online_at, redis_prefix
):
    direct = OnlineStore(redis_client, redis_prefix)
    v1 = new_version("run-1", datetime.now(UTC) - timedelta(minutes=2))
    publish_rows(direct, v1, 1_000, "v1")

    proxy, url = redis_proxy
    through = online_at(url)
    v2 = new_version("run-2", datetime.now(UTC) - timedelta(minutes=1))
    through.stage(v2, {"model": "v2", **META})
    gone = through.layout(v2)
    proxy.fail_after(50_000)  # the server "dies" partway through the shard and stays down
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        through.write(v2, 0, [f"row{i}" for i in range(5_000)], scores(0, 5_000, "v2"))
    assert time.monotonic() - started < 30, "retries must be bounded"
    with pytest.raises(redis.ConnectionError):
        through.publish(v2, 5_000, 1)

    # Readers still see v1, complete and unchanged.
    assert direct.current() == v1
    values = direct.get_many([f"row{i}" for i in range(1_000)])
    assert numbers(values) == list(range(1_000))
    assert {v["model"] for v in values} == {"v1"}

    # Back up: a rerun publishes cleanly and the half-written version is retired.
    proxy.restore()
    v3 = new_version("run-3")
    publish_rows(through, v3, 1_000, "v3")
    assert direct.current() == v3
    through.retire()
    assert not redis_client.exists(*(f"{gone.rows}{b}" for b in range(gone.buckets)))
    assert not redis_client.exists(direct.manifest(v2))


@pytest.mark.services
def test_a_dropped_connection_is_retried_and_every_key_lands(redis_client, redis_proxy, online_at):
    proxy, url = redis_proxy
    through = online_at(url)
    version = new_version("run-1")
    through.stage(version, {"model": "m", **META})
    proxy.blip_after(30_000)  # a blip, not an outage: one reconnection refused
    keys = [f"row{i}" for i in range(5_000)]
    assert through.write(version, 0, keys, scores(0, 5_000, "m")) == 5_000
    assert through.publish(version, 5_000, 1)
    assert numbers(through.get_many(keys)) == list(range(5_000))


@pytest.mark.services
@pytest.mark.parametrize("ttl", [None, 3600])
def test_a_drop_with_chunks_in_flight_resends_them_all(
    redis_client, redis_proxy, online_at, redis_prefix, ttl
):
    # Small chunks, many in flight when the connection drops: every unacknowledged chunk
    # is resent, every key lands once, and the shard is counted once.
    proxy, url = redis_proxy
    through = online_at(url)
    version = new_version("run-1")
    through.stage(version, {"model": "m", **META})
    proxy.blip_after(40_000)
    keys = [f"row{i}" for i in range(6_000)]
    with through.writer(version, 0, ttl) as writer:
        writer.flush_rows = 1_000  # several pipelines
        for start in range(0, 6_000, 1_000):
            writer.write(keys[start : start + 1_000], scores(start, 1_000, "m"))
    assert writer.landed == writer.sent == 6_000
    assert through.manifest_field(version, "shard:0") == "6000"
    assert through.publish(version, 6_000, 1)
    assert numbers(through.get_many(keys)) == list(range(6_000))
    expected_ttl = -1 if ttl is None else ttl
    bucket = through.layout(version).locate("row5999")[0]
    assert redis_client.ttl(bucket) in (expected_ttl, expected_ttl - 1)


@pytest.mark.services
def test_an_incomplete_version_is_never_published(redis_client, redis_prefix):
    store = OnlineStore(redis_client, redis_prefix)
    v1 = new_version("run-1", datetime.now(UTC) - timedelta(minutes=1))
    publish_rows(store, v1, 100, "v1")
    v2 = new_version("run-2")
    store.stage(v2, {"model": "v2", **META})
    store.write(v2, 0, ["row1"], scores(1, 1, "v2"))  # shard 1 of 2 never arrives
    with pytest.raises(PublishError, match="INCOMPLETE"):
        store.publish(v2, 2, 2)
    assert store.current() == v1


@pytest.mark.services
@pytest.mark.parametrize("newer_first", [True, False])
def test_two_runs_publishing_at_once_end_on_the_newer(topology_url, online_at, newer_first):
    older = new_version("run-old", datetime.now(UTC) - timedelta(seconds=5))
    newer = new_version("run-new")
    order = [newer, older] if newer_first else [older, newer]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(version: str) -> None:
        try:
            store = online_at(topology_url)
            store.stage(version, {"model": version, **META})
            barrier.wait()
            for shard in range(4):
                keys = [f"row{i}" for i in range(shard * 500, (shard + 1) * 500)]
                store.write(version, shard, keys, scores(shard * 500, 500, version))
            store.publish(version, 2_000, 4)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    store = online_at(topology_url)
    assert store.current() == newer
    assert {v["model"] for v in store.get_many([f"row{i}" for i in range(2_000)])} == {newer}


def test_unreachable_s3_endpoint_names_the_object(settings_for):
    settings = settings_for(
        {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port()}",
            "BATCHSCORE_STORE_URL": "s3://batch",
        }
    )
    store = ObjectStore.from_settings(settings)
    with pytest.raises(StoreError, match="s3://batch/models/run/svc.joblib"):
        store.get_bytes("models/run/svc.joblib")


@pytest.mark.services
def test_missing_s3_object_names_the_object(s3_env, settings_for):
    settings = settings_for(s3_env)
    store = ObjectStore.from_settings(settings)
    with pytest.raises(StoreError, match=f"{settings.store_url}/nothing/here.csv"):
        store.get_bytes("nothing/here.csv")


# --------------------------------------------------------- PostgreSQL and resume


def cut_when_step_starts(proxy: TcpProxy, flow: str, step: str) -> None:
    """Cut the proxy as soon as a new run of `flow` starts `step` (in this session's local
    Metaflow datastore): an outage in the middle of a run."""
    import os

    runs = Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"]) / ".metaflow" / flow
    before = set(runs.glob(f"*/{step}"))

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if set(runs.glob(f"*/{step}")) - before:
                proxy.cut()
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


@pytest.fixture
def postgres_proxy(postgres_url: str):
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.close()


@pytest.mark.services
@pytest.mark.flows
def test_postgres_down_at_store_results_then_resume(
    embedded_env, postgres_url, postgres_proxy, tmp_path
):
    proxy, url = postgres_proxy
    env = {**embedded_env, "BATCHSCORE_DATABASE_URL": url, "BATCHSCORE_STEP_RETRIES": "0"}
    # Down after `start` checked it (a database down from the outset stops `start`, below).
    cut_when_step_starts(proxy, "TrainModelsFlow", "train_model")
    status, run, output = start_flow("train_models.py", env, tmp_path / "w", cv_folds=2)
    assert status == "failed"
    assert "TrackingError: database error at postgresql" in output
    assert "store_results" in output
    assert not run["store_results"].task.successful

    proxy.restore()
    status, resumed, output = start_flow(
        "train_models.py", env, tmp_path / "w", method="resume", origin_run_id=run.id
    )
    assert status == "successful", output
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(model_metrics)).scalar() == 5
    engine.dispose()

    # Down before the batch flow starts: `start` stops it with one line; then resume.
    proxy.cut()
    status, run, output = start_flow("batch_processing.py", env, tmp_path / "w")
    assert status == "failed"
    masked = make_url(url).render_as_string(hide_password=True)
    # (The proxy accepts, then drops the connection: not a refusal.)
    assert f"BATCHSCORE_DATABASE_URL ({masked}): the server closed the connection" in output
    assert [step.id for step in run] == ["start"]
    proxy.restore()
    status, resumed, output = start_flow(
        "batch_processing.py", env, tmp_path / "w", method="resume", origin_run_id=run.id
    )
    assert status == "successful", output
    assert resumed.data.keys_written == 114
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(select(batch_runs.c.published)).scalar() is True
    engine.dispose()

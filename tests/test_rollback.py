"""Rollback on a real Redis and on a Redis Cluster: one atomic step back, never to a version
rolled back from, refused when there is nowhere to go."""

from __future__ import annotations

import threading

import pytest
from test_online import _publish, _rows_stored, _value, _version, store  # noqa: F401

from batchscore.online.errors import PublishError
from batchscore.online.store import OnlineStore


def test_rollback_restores_the_previous_version_and_promote_brings_it_back(store):  # noqa: F811
    old, new = _version(0), _version(1)
    assert _publish(store, old, {"k": _value(0, "old")})
    assert _publish(store, new, {"k": _value(1, "new")})
    assert store.get("k")["model"] == "new"

    assert store.rollback() == (new, old)
    assert store.current() == old
    assert store.get("k")["model"] == "old"
    manifests = store.manifests()
    assert manifests[new]["status"] == "rolled back"
    assert manifests[old]["status"] == "current"

    # The rolled-back version is still complete and kept: publishing it again works.
    assert store.publish(new, 1, 1)
    assert store.get("k")["model"] == "new"


def test_rollback_refuses_without_a_kept_previous_version(store):  # noqa: F811
    with pytest.raises(PublishError, match="nothing is published"):
        store.rollback()
    only = _version(0)
    _publish(store, only, {"k": _value(0)})
    with pytest.raises(PublishError, match="no published version older"):
        store.rollback()
    assert store.current() == only


def test_rollback_refuses_a_retired_version(store):  # noqa: F811
    versions = [_version(i) for i in range(3)]
    for version in versions:
        _publish(store, version, {"k": _value(0, version)})
    store.retire(keep=1)  # only the newest is kept
    with pytest.raises(PublishError):
        store.rollback()
    assert store.current() == versions[-1]


def test_a_second_rollback_never_restores_the_version_rolled_back_from(store):  # noqa: F811
    """V1, V2, V3; rollback (V2 live, V3 rolled back); V4 published and old versions
    retired; rollback again: readers get V2, the last good one, never V3."""
    v1, v2, v3, v4 = (_version(i) for i in range(4))
    for version in (v1, v2, v3):
        assert _publish(store, version, {"k": _value(0, version[-6:])})
        store.retire()
    assert store.rollback() == (v3, v2)
    assert _publish(store, v4, {"k": _value(1, "v4")})
    store.retire()
    kept, target = store.kept()
    assert target == v2 and v2 in kept  # retire kept what rollback needs
    assert store.rollback() == (v4, v2)
    assert store.get("k")["model"] == v2[-6:]


def test_rollback_skips_a_version_rolled_back_from_even_when_kept(store):  # noqa: F811
    v1, v2, v3 = (_version(i) for i in range(3))
    for version in (v1, v2):
        _publish(store, version, {"k": _value(0, version[-6:])})
    store.rollback()  # v1 live, v2 rolled back
    _publish(store, v3, {"k": _value(0, "v3")})
    assert store.manifests()[v2]["status"] == "rolled back"
    assert store.rollback() == (v3, v1)


def test_discard_marks_the_version_retired_before_deleting_rows(store, monkeypatch):  # noqa: F811
    """While a version's rows are being deleted, a rollback must not pick it: by then it
    is already marked retired (and out of the published list)."""
    v1, v2 = _version(0), _version(1)
    _publish(store, v1, {"k": _value(0, "v1")})
    _publish(store, v2, {"k": _value(1, "v2")})
    store.client.set(store.pointer, v2)
    seen: list = []
    unlink = store.client.unlink

    def unlink_and_look(*names):
        if not seen:  # the first batch of row deletions: what does a rollback see now?
            seen.append(store.manifest_field(v1, "status"))
            with pytest.raises(PublishError, match="no published version older"):
                store.rollback()
        return unlink(*names)

    monkeypatch.setattr(store.client, "unlink", unlink_and_look)
    layout = store.layout(v1)
    store.discard(v1)
    assert seen == ["retired"]
    assert _rows_stored(store, layout) == 0
    assert store.current() == v2


def test_history_knows_what_a_rollback_would_restore(store):  # noqa: F811
    versions = [_version(i) for i in range(3)]
    for version in versions:
        _publish(store, version, {"k": _value(0, version[-6:])})
    assert store.kept()[1] == versions[1]
    store.rollback()
    assert store.kept()[1] == versions[0]


def test_readers_never_see_a_mix_or_a_miss_during_rollbacks(store):  # noqa: F811
    """A reader looking up every row continuously while the pointer flips back and forth."""
    rows = [f"k{i}" for i in range(2_000)]
    old, new = _version(0), _version(1)
    _publish(store, old, {k: _value(0, "old") for k in rows})
    _publish(store, new, {k: _value(1, "new") for k in rows})
    reader = OnlineStore(store.client, store.prefix)
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            values = reader.get_many(rows)
            models = {v["model"] if v else None for v in values}
            if len(models) != 1 or None in models:
                problems.append(f"mixed or missing: {models}")

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(20):
            store.rollback()
            assert store.publish(new, len(rows), 1)
    finally:
        done.set()
        thread.join()
    assert problems == []

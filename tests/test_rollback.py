"""Rollback on a real Redis: one atomic step back, refused when there is nowhere to go."""

from __future__ import annotations

import threading

import pytest
from test_online import _publish, _value, _version

from batchscore.online.errors import PublishError
from batchscore.online.store import OnlineStore


@pytest.fixture
def store(redis_client, redis_prefix) -> OnlineStore:
    return OnlineStore(redis_client, prefix=redis_prefix)


def test_rollback_restores_the_previous_version_and_promote_brings_it_back(store):
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


def test_rollback_refuses_without_a_kept_previous_version(store):
    with pytest.raises(PublishError, match="nothing is published"):
        store.rollback()
    only = _version(0)
    _publish(store, only, {"k": _value(0)})
    with pytest.raises(PublishError, match="no published version older"):
        store.rollback()
    assert store.current() == only


def test_rollback_refuses_a_retired_version(store):
    versions = [_version(i) for i in range(3)]
    for version in versions:
        _publish(store, version, {"k": _value(0, version)})
    store.retire(keep=1)  # only the newest is kept
    with pytest.raises(PublishError):
        store.rollback()
    assert store.current() == versions[-1]


def test_readers_never_see_a_mix_or_a_miss_during_rollbacks(store, redis_client):
    """A reader looking up every row continuously while the pointer flips back and forth."""
    rows = [f"k{i}" for i in range(2_000)]
    old, new = _version(0), _version(1)
    _publish(store, old, {k: _value(0, "old") for k in rows})
    _publish(store, new, {k: _value(1, "new") for k in rows})
    reader = OnlineStore(redis_client, store.prefix)
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

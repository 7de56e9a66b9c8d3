"""What an operator does after a batch: list versions, roll back, promote a blocked batch.

Each is one atomic pointer switch in Redis (or none), recorded in the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from batchscore.config import Settings
from batchscore.online.errors import PublishError
from batchscore.online.store import OnlineStore
from batchscore.storage.tracking import Tracker


def history(settings: Settings, limit: int = 20) -> list[dict[str, Any]]:
    """Batch runs, newest first, with what Redis says of each version now, and which
    version `rollback` would restore."""
    online = OnlineStore.from_settings(settings)
    manifests = online.manifests()
    current = online.current()
    _, restores = online.kept(settings.keep_versions)  # what `rollback` would switch to
    with Tracker(settings.resolved_database_url) as tracker:
        runs = tracker.batch_history(limit)
    rows = []
    for run in runs:
        version = run["redis_version"]
        manifest = manifests.get(version)
        if version == current:
            state = "current"
        elif manifest is None:
            state = "retired"
        else:
            state = manifest.get("status", "staged")
            if state == "current":  # it was, until a newer version went live
                state = "published"
            if version == restores:
                state += " (rollback restores it)"
        rows.append(
            {
                "version": version,
                "time": _iso(run["created_at"]),
                "status": state,
                "rows": run["keys_written"],
                "rejected": run.get("rows_rejected"),
                "model": ",".join(run["models"]),
                "max drift": _drift(run),
                "gate": run.get("gate") or "-",
            }
        )
    return rows


def promote(version: str, settings: Settings) -> list[str]:
    """Publish a staged, complete version a person has looked at; returns retired versions.

    The same switch as `ingest_redis`: every shard counted, never backwards.
    """
    online = OnlineStore.from_settings(settings)
    manifest = online.manifests().get(version)
    if manifest is None:
        raise PublishError(f"{version}: no such version in Redis (never staged, or retired)")
    if "keys_expected" not in manifest:
        raise PublishError(f"{version}: its run did not finish writing; nothing to promote")
    published = online.publish(
        version, int(manifest["keys_expected"]), int(manifest["shards_expected"])
    )
    if not published:
        raise PublishError(f"{version}: a newer version ({online.current()}) is live")
    with Tracker(settings.resolved_database_url) as tracker:
        tracker.mark_published(manifest.get("run_id", ""))
    return online.retire(settings.keep_versions)


def rollback(settings: Settings) -> tuple[str, str]:
    """Readers back to the previous published version: (from, to)."""
    return OnlineStore.from_settings(settings).rollback()


def _iso(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # SQLite returns naive UTC
    return value.isoformat(timespec="seconds")


def _drift(run: dict[str, Any]) -> str:
    if run.get("max_drift") is None:
        return "-"
    return f"{run['max_drift']:.3f} ({run.get('max_drift_feature') or '-'})"

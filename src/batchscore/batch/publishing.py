"""Stage a version, then publish it through the gate once every shard has landed."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the flow's `end` imports this module for SupersededRun: keep it light
    from batchscore.batch.bundle import ModelBundle, ModelFiles
    from batchscore.batch.report import BatchReport
    from batchscore.batch.scoring import ShardResult
    from batchscore.batch.shards import ShardPlan
    from batchscore.config import Settings
    from batchscore.online.store import OnlineStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    rows_scored: int
    keys_written: int
    published: bool  # False: blocked by the gate, or a newer version was already current
    retired: list[str]
    report: BatchReport | None = None
    # Set when a newer version went live while this run wrote: that version and its run.
    superseded_by: Superseded | None = None

    @property
    def blocked(self) -> bool:
        return self.report is not None and not self.report.gate.passed


@dataclass(frozen=True)
class Superseded:
    """The newer version that went live while this run wrote, and the run that made it."""

    version: str
    run_id: str | None  # None: its manifest is gone (retired since)

    def __str__(self) -> str:
        return f"{self.version} (run {self.run_id or 'unknown'})"


class SupersededRun(RuntimeError):
    """The run published nothing because a newer run went live while it wrote.

    Not a fault to fix and not worth retrying; the flow's `end` step raises it so that the
    run ends non-zero, its one line starting with `superseded:` (see the README).
    """

    def __init__(self, version: str, by: Superseded) -> None:
        self.version, self.by = version, by
        super().__init__(
            f"superseded: {version} was not published because {by} went live while this "
            "run wrote; nothing of it is left in Redis"
        )


@dataclass(frozen=True)
class GateLimits:
    """What a batch must satisfy to go live (the flow's `--max_drift`, `--max_bad_rows`)."""

    max_drift: float = 0.25
    max_bad_rows: float = 0.0


def publish(
    run_id: str,
    version: str,
    results: list[ShardResult],
    input_uri: str,
    bundle: ModelBundle | ModelFiles,
    settings: Settings,
    scratch: Sequence[str] = (),
    plan: ShardPlan | None = None,
    limits: GateLimits = GateLimits(),  # noqa: B008 - frozen, so one shared default is safe
) -> PublishResult:
    """Gate the batch, then switch readers to it once every shard is counted and its sampled
    keys are still in Redis; record the run and its report.

    A batch the gate blocks stays staged (readers never see it) for `promote`. A version
    superseded by a newer live one is discarded. Either way the run is over, so its scratch
    shards are deleted; on an error they stay, for `resume`.
    """
    from batchscore.online.store import OnlineStore
    from batchscore.storage.object_store import ObjectStore
    from batchscore.storage.tracking import Tracker

    started = time.perf_counter()
    online = OnlineStore.from_settings(settings)
    rows = sum(r.rows_scored for r in results)
    acknowledged = sum(r.keys_written for r in results)  # what the switch checks, per shard
    # Every shard is done: count the distinct keys (an id repeated across shards is one key,
    # its first row in input order) and drop the owner hashes that decided it.
    held = online.key_count(version)
    online.drop_owners(version)
    keys = acknowledged if held is None else held  # None: retired meanwhile (superseded)
    duplicates = rows - keys  # every row a shard scored, less the keys the version holds
    report = judge(version, results, bundle, online, plan, limits, keys, duplicates)
    record = {
        "input_uri": input_uri,
        "training_run_id": bundle.training_run_id,
        "models": bundle.names,
        "redis_version": version,
        "rows_scored": rows,
        "keys_written": keys,
        "published": False,
        "rows_read": plan.rows_read if plan else rows,
        "rows_rejected": plan.rows_rejected if plan else 0,
        "duplicates": duplicates,
    }
    # What `promote` needs to publish this version later with the same checks (the rows the
    # shards acknowledged), its distinct keys, and the gate's verdict (the next batch's
    # report compares its scores with `score_counts`).
    fields: dict[str, object] = {
        "keys_expected": acknowledged,
        "shards_expected": len(results),
        "keys": keys,
    }
    record.update(report.summary())
    fields["gate"] = report.gate.summary
    if report.drift_measured:
        fields.update(max_drift=round(report.max_drift, 6), score_counts=report.score_counts)
    online.annotate(version, fields)
    with Tracker(settings.resolved_database_url) as tracker:
        # Recorded before the switch: a live version always has its lineage row.
        tracker.record_batch(run_id, record)
        blocked = not report.gate.passed
        published = not blocked and online.publish(version, acknowledged, len(results))
        if published:
            tracker.mark_published(run_id)
    retired: list[str] = []
    superseded = None
    if published:
        try:
            retired = online.retire(settings.keep_versions)
        except Exception as exc:  # housekeeping only: the new version is already live
            log.warning("could not retire old versions: %s", exc)
    elif blocked:
        log.warning("%s stays staged: %s", version, report.gate.summary)
    else:
        newer = online.current() or "?"
        superseded = Superseded(newer, online.manifest_field(newer, "run_id"))
        log.warning("%s was superseded by %s: discarded", version, superseded)
        online.discard(version)
    store = ObjectStore.from_settings(settings)
    for uri in scratch:
        store.delete(uri)
    report.seconds["publish"] = time.perf_counter() - started
    return PublishResult(rows, keys, published, retired, report, superseded)


def judge(
    version: str,
    results: list[ShardResult],
    bundle: ModelBundle | ModelFiles,
    online: OnlineStore,
    plan: ShardPlan | None,
    limits: GateLimits,
    keys_written: int,
    duplicates: int,
) -> BatchReport:
    """The shards' counts merged and judged: drift against training, rejected rows.
    `keys_written` and `duplicates`: the version's distinct keys and the rows that repeated
    one (counted at the join, across shards).

    A champion without a reference profile (trained before profiles were recorded) gets no
    drift measure, but its batch is held to the bad-row limit all the same.
    """
    from batchscore.batch import gate
    from batchscore.batch.drift import BatchProfile
    from batchscore.batch.report import build_report

    reference = bundle.reference
    rows_read = plan.rows_read if plan else sum(r.rows_scored for r in results)
    rejected = plan.rows_rejected if plan else 0
    live = online.current()
    profile, drift, noise, live_counts = None, None, {}, None
    if reference is not None and all(r.profile is not None for r in results):
        profile = BatchProfile.merge([BatchProfile.from_dict(r.profile) for r in results])
        drift = profile.drift(reference)
        noise = profile.noise(reference)
        if live:
            live_counts = online.manifest_field(live, "score_counts")
    seconds: dict[str, float] = {}
    for result in results:
        for stage_name, value in result.seconds.items():
            seconds[stage_name] = seconds.get(stage_name, 0.0) + value
    return build_report(
        version=version,
        model=bundle.champion,
        threshold=bundle.threshold,
        training_run_id=bundle.training_run_id,
        classes=bundle.classes,
        reference=reference,
        profile=profile,
        drift=drift,
        noise=max(noise.values(), default=0.0),
        rows_read=rows_read,
        rows_scored=sum(r.rows_scored for r in results),
        keys_written=keys_written,
        duplicates=duplicates,
        rows_rejected=rejected,
        gate=gate.check(
            drift,
            rows_read,
            rejected,
            limits.max_drift,
            limits.max_bad_rows,
            noise,
        ),
        live_version=live,
        live_score_counts=json.loads(live_counts) if live_counts else None,
        seconds=seconds,
        rejected_uri=plan.rejected_uri if plan else None,
    )


def stage(
    version: str,
    run_id: str,
    input_uri: str,
    bundle: ModelBundle | ModelFiles,
    settings: Settings,
    ttl_seconds: int | None = None,
    expected_rows: int | None = None,
) -> None:
    """Open the run's Redis version (invisible to readers until `publish`), laid out for
    `expected_rows` (the plan's count: exact for Parquet, estimated for CSV)."""
    from batchscore.online.store import OnlineStore

    OnlineStore.from_settings(settings).stage(
        version,
        {
            "run_id": run_id,
            "input": input_uri,
            "model": bundle.champion,
            "models": ",".join(bundle.names),
            "training_run_id": bundle.training_run_id,
            "feature_columns": bundle.feature_columns,
            "classes": list(bundle.classes),
            # Readers (library, CLI, notebook, HTTP) key rows as this version did.
            **(
                {"key_scheme": "id", "id_column": settings.id_column}
                if settings.id_column
                else {"key_scheme": "feature_hash"}
            ),
        },
        ttl_seconds,
        expected_rows,
    )

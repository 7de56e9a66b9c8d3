"""The Redis online store: versioned, batch-first publishing and one-round-trip lookups.

Layout (the Redis contract; `{prefix}` with its braces: one hash tag, one cluster slot):
    {prefix}:current              -> the version readers use
    {prefix}:versions             -> sorted set of published versions (score: publish time)
    {prefix}:staged               -> sorted set of versions being written (score: stage time)
    {prefix}:manifest:{version}   -> hash: per-shard counts, model, status, timestamps, and
                                     the version's constants and row layout (`layout.py`)
    {prefix}:next_id              -> the counter behind each version's short row-name prefix
    prefix:r{id}:{bucket}         -> hash of ~64 rows: row digest -> probabilities (rows
                                     spread over every slot of a cluster)
    {prefix:r{id}:{bucket}}:owner -> while an id-keyed version is staged: row digest -> the
                                     shard that wrote it (the bucket's slot; see layout.py)

A run writes its rows under a fresh version that nobody reads yet, counts them, and only
then moves `current`, atomically, in a Lua script that also refuses to move it backwards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import redis

from batchscore.config import Settings
from batchscore.online.connection import Use, cluster_mode, connect
from batchscore.online.errors import PublishError, SupersededError
from batchscore.online.layout import (
    COMPACT,
    FIELDS,
    Layout,
    RowModel,
    buckets_for,
    owner_name,
    plan_reads,
)
from batchscore.online.writer import ShardWriter
from batchscore.rows.keys import id_keys, row_keys

if TYPE_CHECKING:  # pandas and the table readers cost every batch-flow step 0.3 s to import
    import pandas as pd

    from batchscore.batch.predictions import Scored

log = logging.getLogger(__name__)

SCAN_COUNT = 5_000
KEEP_VERSIONS = 2  # current + previous: a two-step reader mid-read never loses its version
DEFAULT_ROWS = 1_000_000  # a first version's rows are laid out for this many
UNUSABLE = ("rolled back", "retired")  # statuses rollback never restores


READ_SLICE = 1_000  # rows per read command: Redis serves other clients between slices
COUNT_SLICE = 1_000  # buckets counted per script call: a few ms of Redis's time each
SAFE_POLICY = "noeviction"
_SCRIPTS = resources.files("batchscore.online") / "scripts"


def _script(name: str) -> str:
    """A Lua script of `scripts/`: publish, record_shard, rollback, annotate, first_wins..."""
    return (_SCRIPTS / f"{name}.lua").read_text()


def ttl_seconds(days: float) -> int | None:
    """Key lifetime from the flow's `ttl_days`; 0 keeps keys until a newer version retires them."""
    if days < 0:
        raise ValueError(f"ttl_days must be 0 or more, not {days}")
    return int(days * 86_400) or None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class OnlineStore:
    """Write prediction sets in batches, publish them atomically, read them back."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "predictions",
        legacy_id_column: str | None = None,
    ) -> None:
        if not prefix or re.search(r"[\s:{}]", prefix):
            raise ValueError(
                f"Redis prefix {prefix!r} must be non-empty, without ':', braces or spaces"
            )
        self.client = client
        self.cluster = cluster_mode(client)
        self.prefix = prefix
        # One hash tag for every control key: each script touches one cluster slot.
        self.tag = f"{{{prefix}}}"
        self.pointer = f"{self.tag}:current"
        self.versions = f"{self.tag}:versions"
        self.staged = f"{self.tag}:staged"
        self.sequence = f"{self.tag}:next_id"  # short ids for the versions' row names
        self._publish = client.register_script(_script("publish"))
        self._record_shard = client.register_script(_script("record_shard"))
        self._rollback = client.register_script(_script("rollback"))
        self._annotate = client.register_script(_script("annotate"))
        self._retire = client.register_script(_script("retire"))
        self._migrate = client.register_script(_script("migrate"))
        self._first_wins = client.register_script(_script("first_wins"))
        self._count_keys = client.register_script(_script("count_keys"))
        self._layouts: dict[str, Layout] = {}  # published versions never change
        # How versions that predate the manifest's `key_scheme` were keyed: the settings say.
        self.legacy_id_column = legacy_id_column

    @classmethod
    def from_settings(cls, settings: Settings, use: Use = "batch") -> OnlineStore:
        store = cls(connect(settings, use), settings.redis_prefix, settings.id_column)
        store.migrate_control_keys()
        return store

    def migrate_control_keys(self) -> int:
        """Rename the untagged control keys of a Redis published before the hash tag
        (`prefix:current`, `prefix:manifest:...`), once: their versions stay live. One
        EXISTS when there is nothing to do; never needed on a cluster (it never worked
        there before). Returns the manifests moved."""
        if self.cluster or not self.client.exists(f"{self.prefix}:current"):
            return 0
        old, new = f"{self.prefix}:", f"{self.tag}:"
        return self._migrate(
            keys=[old + "current", self.pointer, old + "versions", self.versions,
                  old + "staged", self.staged],
            args=[old + "manifest:", new + "manifest:"],
        )  # fmt: skip

    def close(self) -> None:
        self.client.close()

    def manifest(self, version: str) -> str:
        return f"{self.tag}:manifest:{version}"

    # ------------------------------------------------------------------ writing

    def stage(
        self,
        version: str,
        meta: dict[str, Any],
        ttl_seconds: int | None = None,
        expected_rows: int | None = None,
    ) -> None:
        """Open a version: its manifest says who is writing it, how its rows are laid out,
        and that it is not live.

        Refused on a Redis that may evict the version's keys: a lost key would go live.
        Its rows go into about one hash per ROWS_PER_BUCKET rows: of `expected_rows` (the
        shard plan's count), else of the live version's (a batch is usually the size of
        the previous one), else of 1M rows.
        """
        self.check_eviction_policy(ttl_seconds)
        rows = expected_rows or 0
        if not rows:
            live = self.current()
            rows = self.row_count(live) if live else 0
        layout = {
            "format": COMPACT,
            "rows": f"{self.prefix}:r{self.client.incr(self.sequence)}:",
            "buckets": buckets_for(rows or DEFAULT_ROWS),
        }
        if "key_scheme" not in meta:  # every compact version records how it keys rows
            scheme = self.legacy_id_column
            meta = (
                {**meta, "key_scheme": "id", "id_column": scheme}
                if scheme
                else {**meta, "key_scheme": "feature_hash"}
            )
        fields = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(
            self.manifest(version),
            mapping={**fields, "layout": json.dumps(layout), "status": "staged"},
        )
        # Registered so that `retire` finds abandoned versions without scanning the keyspace.
        pipe.zadd(self.staged, {version: time.time()})
        if ttl_seconds:
            pipe.expire(self.manifest(version), ttl_seconds)
        pipe.execute()

    def row_count(self, version: str) -> int:
        """The version's keys: the distinct count its join recorded (`keys`), else (a version
        published before it was recorded) the rows its shards recorded."""
        names = self.client.hkeys(self.manifest(version))
        names = [n for n in names if n.startswith(b"shard:") or n == b"keys"]
        values = self.client.hmget(self.manifest(version), names) if names else []
        counts = dict(zip(names, values, strict=True))
        if counts.get(b"keys") is not None:
            return int(counts[b"keys"])
        return sum(int(c) for n, c in counts.items() if c is not None and n != b"keys")

    def eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy`: from CONFIG, or from INFO where a managed service
        refuses CONFIG; None if neither says. On a cluster, the strictest node's."""
        try:
            found = self.client.config_get("maxmemory-policy")
            if self.cluster:  # {node: {name: value}}, or one node's answer
                values = [v.get("maxmemory-policy") for v in found.values() if isinstance(v, dict)]
                values = values or [found.get("maxmemory-policy")]
                policy = next((v for v in values if v and v != SAFE_POLICY), values[0])
            else:
                policy = found.get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG renamed or not permitted (ElastiCache, ACLs)
            policy = None
        if not policy:
            try:
                policy = self.client.info("memory").get("maxmemory_policy")
            except redis.ResponseError:
                policy = None
        return policy.decode() if isinstance(policy, bytes) else policy

    def check_eviction_policy(self, ttl_seconds: int | None = None) -> None:
        """Refuse a Redis that may evict this version's keys: `allkeys-*` may evict any
        key, `volatile-*` any key with a TTL (every key when `ttl_days` > 0)."""
        policy = self.eviction_policy()
        if policy is None:
            log.warning("cannot read Redis's maxmemory-policy: make sure it is noeviction")
            return
        if policy.startswith("allkeys-") or (ttl_seconds and policy.startswith("volatile-")):
            raise PublishError(
                f"Redis's maxmemory-policy is {policy}: it may evict prediction keys before or "
                f"after the switch; set it to {SAFE_POLICY}"
            )

    def record_shard(self, version: str, shard: str | int, landed: int, sample: list[str]) -> None:
        """Count a finished shard in the manifest, with a sample of its keys for `verify`.

        Raises `SupersededError` if the version is no longer staged (a newer one went live
        and `retire` dropped it while this shard was writing).
        """
        recorded = self._record_shard(
            keys=[self.manifest(version), self.staged, self.versions],
            args=[version, f"shard:{shard}", landed, f"sample:{shard}", json.dumps(sample)],
        )
        if not recorded:
            raise SupersededError(f"version {version} was superseded by {self.current()}")

    def record_models(self, version: str, models: Sequence[RowModel]) -> None:
        """The models whose probabilities a row holds, champion first (the writers' first
        block says; every shard of a version writes the same)."""
        described = [
            {"name": m.name, "version": m.version, "threshold": m.threshold} for m in models
        ]
        if not self.annotate(version, {"row_models": described}):
            raise SupersededError(f"version {version} is gone (retired or discarded)")

    def load_first_wins(self) -> str:
        """Load `first_wins.lua` (on every primary of a cluster): the SHA writers call it by."""
        return self.client.script_load(self._first_wins.script)

    def key_count(self, version: str) -> int | None:
        """The distinct keys the version holds (None: it is gone), from its buckets' sizes:
        exact whatever the shards wrote twice (repeats, replayed pipelines, retried tasks),
        where the rows they acknowledged are not. On one Redis a short script sums
        COUNT_SLICE buckets at a time (Redis serves other clients between slices); on a
        cluster, one HLEN per bucket, pipelined by node."""
        layout = self.layout(version)
        if layout is None:
            return None
        if not layout.compact:
            return self.row_count(version)
        pipe = self.client.pipeline(transaction=False)
        if self.cluster:
            for name in layout.bucket_names():
                pipe.hlen(name)
        else:
            for first in range(0, layout.buckets, COUNT_SLICE):
                last = min(first + COUNT_SLICE, layout.buckets) - 1
                self._count_keys(args=[layout.rows, first, last], client=pipe)
        return sum(pipe.execute())

    def drop_owners(self, version: str, layout: Layout | None = None) -> int:
        """Delete an id-keyed version's staging-only owner hashes (once its shards are
        done, or with its rows); returns how many there were. Named from the bucket
        count, no SCAN."""
        layout = layout or self.layout(version)
        if layout is None or not layout.owned:
            return 0
        return self._unlink([owner_name(name) for name in layout.bucket_names()])

    def _unlink(self, names: Sequence[str]) -> int:
        """UNLINK many keys, pipelined (a key per command on a cluster, whose pipelines
        refuse keys of several slots in one); returns how many existed."""
        pipe = self.client.pipeline(transaction=False)
        for first in range(0, len(names), SCAN_COUNT):
            part = names[first : first + SCAN_COUNT]
            if self.cluster:
                for name in part:
                    pipe.unlink(name)
            else:
                pipe.unlink(*part)
        return sum(pipe.execute()) if names else 0

    def writer(self, version: str, shard: str | int, ttl_seconds: int | None = None) -> ShardWriter:
        """A streaming writer for one shard: feed it `(keys, predict_all(...))` blocks."""
        return ShardWriter(self, version, shard, ttl_seconds)

    def write(
        self,
        version: str,
        shard: str | int,
        row_keys: pa.Array | Sequence[str],
        outputs: Sequence[Scored],
        ttl_seconds: int | None = None,
    ) -> int:
        """Write one shard's rows under `version`; returns how many Redis acknowledged."""
        with self.writer(version, shard, ttl_seconds) as writer:
            writer.write(row_keys, outputs)
        return writer.landed

    def publish(self, version: str, expected_keys: int, expected_shards: int) -> bool:
        """Switch `current` to `version` if every shard landed and its keys are still there;
        False if a newer version is live (this one can then only be discarded)."""
        current = self.current()
        if current is not None and current > version:
            return False
        if current != version:
            ttl = self.client.ttl(self.manifest(version))
            self.check_eviction_policy(ttl if ttl > 0 else None)
            self.verify(version)
        try:
            moved = self._publish(
                keys=[self.pointer, self.manifest(version), self.versions, self.staged],
                args=[version, expected_keys, expected_shards, f"{time.time():.6f}"],
            )
        except redis.ResponseError as exc:
            raise PublishError(f"version {version} not published: {exc}") from exc
        return bool(moved)

    def verify(self, version: str) -> int:
        """Check Redis-side that each shard's sampled keys still exist (evicted, flushed or
        lost in a failover since they were acknowledged?); returns how many were checked.

        Counting every key instead means reading every bucket (see
        benchmarks/bench_lookup.py); a uniform sample of 1,024 keys per shard plus its last
        key catches a loss of 1% of a shard with probability 1 - 0.99**1024 > 0.9999.
        """
        fields = self.client.hgetall(self.manifest(version))
        layout = self.layout(version)
        checked = 0
        for name, raw in sorted(fields.items()):
            if not name.startswith(b"sample:") or layout is None:
                continue
            sample = json.loads(raw)
            pipe = self.client.pipeline(transaction=False)
            for row_key in sample:
                where, field = layout.locate(row_key)
                if field is None:
                    pipe.exists(where)
                else:
                    pipe.hexists(where, field)
            missing = [k for k, found in zip(sample, pipe.execute(), strict=True) if not found]
            if missing:
                shard = name.decode().removeprefix("sample:")
                raise PublishError(
                    f"version {version} not published: shard {shard} lost keys after they "
                    f"were written ({len(missing)} of {len(sample)} sampled keys are gone, "
                    f"e.g. {missing[0]}); Redis evicted, flushed or failed over meanwhile"
                )
            checked += len(sample)
        return checked

    def statuses(self, versions: Sequence[str]) -> dict[str, str | None]:
        """Each version's manifest status (None: no manifest)."""
        pipe = self.client.pipeline(transaction=False)
        for version in versions:
            pipe.hget(self.manifest(version), "status")
        return {
            v: (s.decode() if s is not None else None)
            for v, s in zip(versions, pipe.execute(), strict=True)
        }

    def kept(self, keep: int = KEEP_VERSIONS) -> tuple[list[str], str | None]:
        """(the published versions `retire` keeps, the one `rollback` would restore).

        Kept: the live version, the newest `keep` published versions no newer than it that
        were never rolled back from (rollback's candidates, in order), and versions newer
        than it (rolled back from: `promote` may bring one back).
        """
        current = self.current()
        if current is None:
            return [], None
        published = [v.decode() for v in self.client.zrevrange(self.versions, 0, -1)]
        statuses = self.statuses(published)
        kept = [v for v in published if v > current]
        # What rollback may restore: a manifest still there, never rolled back from.
        restorable = {v for v, status in statuses.items() if status and status not in UNUSABLE}
        usable = [v for v in published if v == current or (v < current and v in restorable)]
        kept += usable[: max(keep, 1)]
        if current not in kept:
            kept.append(current)
        candidates = [v for v in usable if v < current]
        return kept, candidates[0] if candidates else None

    def retire(self, keep: int = KEEP_VERSIONS) -> list[str]:
        """Delete versions no reader needs: published ones `kept` does not keep, and staged
        ones older than `current` (they can never be published). UNLINK frees memory in
        the background: Redis keeps serving while this runs."""
        current = self.current()
        if current is None:
            return []
        kept, _ = self.kept(keep)
        published = [v.decode() for v in self.client.zrevrange(self.versions, 0, -1)]
        doomed = [v for v in published if v not in kept]
        staged = (v.decode() for v in self.client.zrange(self.staged, 0, -1))
        doomed += [v for v in staged if v < current]
        for version in doomed:
            self.discard(version)
        return doomed

    def discard(self, version: str) -> int:
        """Remove a version's rows and records (e.g. after a failed run); returns the row
        keys removed (hashes of ~64 rows each in the compact layout).

        The version is first marked retired, atomically (a rollback running meanwhile can
        then never pick it), and only then are its rows deleted.
        """
        layout = self.layout(version)  # before the manifest says retired: where its rows are
        try:
            self._retire(
                keys=[self.pointer, self.manifest(version), self.versions, self.staged],
                args=[version, f"{time.time():.6f}"],
            )
        except redis.ResponseError as exc:
            raise ValueError(f"refusing to discard {version}: {exc}") from None
        removed = 0
        if layout is not None and layout.compact:
            removed = self._unlink(layout.bucket_names())
            self.drop_owners(version, layout)
        else:  # the first layout: one key per row, found by SCAN
            batch: list[bytes] = []
            pattern = _glob_escape(f"{self.prefix}:{version}:") + "*"
            for name in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
                batch.append(name)
                if len(batch) >= SCAN_COUNT:
                    removed += self.client.unlink(*batch)
                    batch.clear()
            if batch:
                removed += self.client.unlink(*batch)
        self.client.unlink(self.manifest(version))
        self._layouts.pop(version, None)
        return removed

    # ------------------------------------------------------------------ reading

    def current(self) -> str | None:
        value = self.client.get(self.pointer)
        return value.decode() if value is not None else None

    def layout(self, version: str | None = None) -> Layout | None:
        """How the version lays out its rows, with its constants; None when it is gone."""
        version = version or self.current()
        if version is None:
            return None
        if version in self._layouts:
            return self._layouts[version]
        layout = self.layout_of(version, self.client.hmget(self.manifest(version), FIELDS))
        if layout is not None and (layout.models or not layout.compact):
            self._layouts[version] = layout  # complete: it will not change
        return layout

    def layout_of(self, version: str, values: Sequence[bytes | None]) -> Layout | None:
        """The layout from the manifest's `layout.FIELDS` (as HMGET answers them): the one
        home of the key-scheme rule, for this store and the HTTP service's async reads."""
        return Layout.from_manifest(self.prefix, version, values, self.legacy_id_column)

    def get(self, row_key: str) -> dict[str, Any] | None:
        """One row's prediction from the current version."""
        return self.get_many([row_key])[0]

    def get_many(
        self, row_keys: Iterable[str], version: str | None = None
    ) -> list[dict[str, Any] | None]:
        """Rows from the current version (or `version`); None where a row is absent.

        The pointer and the version's layout are read once, then the rows in one pipeline
        of short commands (`layout.plan_reads`: a script per 1,000 rows on one Redis, an
        HMGET per bucket on a cluster, grouped by node): Redis serves other clients between
        them, and a version stays readable while a newer one goes live (the previous one
        is kept).
        """
        keys = list(row_keys)
        layout = self.layout(version)
        if layout is None or not keys:
            return [None] * len(keys)
        reads = plan_reads(layout, keys, READ_SLICE, scripted=not self.cluster)
        pipe = self.client.pipeline(transaction=False)
        for command in reads.commands:
            pipe.execute_command(*command)
        values = reads.values(pipe.execute())
        return layout.predictions(values)

    def key_scheme(self, version: str | None = None) -> tuple[str, str | None]:
        """How the version keyed its rows: ("feature_hash", None) or ("id", id column).
        The one home of this rule: the CLI, the notebook and the HTTP service ask here."""
        layout = self.layout(version)
        if layout is None:
            raise LookupError("no published version")
        return layout.key_scheme, layout.id_column

    def keys_for(
        self,
        rows: pd.DataFrame,
        version: str | None = None,
        feature_columns: Sequence[str] | None = None,
        source: str = "rows",
        first_row: int = 1,
    ) -> list[str]:
        """The row keys of raw rows under the version's own key scheme: the id column's
        text for an id-keyed version, else the hash of the feature columns (training
        order: `feature_columns`, default what the version recorded)."""
        from batchscore.rows.errors import InputError
        from batchscore.rows.validation import to_feature_frame

        scheme, id_column = self.key_scheme(version)
        if scheme == "id":
            if id_column not in rows.columns:
                raise InputError(f"{source}: this version is keyed by column {id_column!r}")
            return id_keys(rows[id_column], source, id_column, first_row)
        columns = list(feature_columns or self.feature_columns(version))
        features = to_feature_frame(rows, columns, source, first_row, list(rows.columns))
        return row_keys(features.to_numpy())

    def lookup_rows(
        self, features: pd.DataFrame, feature_columns: Sequence[str] | None = None
    ) -> list[dict[str, Any] | None]:
        """Predictions for raw rows, keyed as the current version keyed them."""
        version = self.current()
        if version is None:
            return [None] * len(features)
        return self.get_many(self.keys_for(features, version, feature_columns), version)

    def feature_columns(self, version: str | None = None) -> list[str]:
        """The training-order feature columns the version was scored with."""
        layout = self.layout(version)
        if layout is None or not layout.feature_columns:
            raise LookupError("no published version records its feature columns")
        return layout.feature_columns

    def manifest_field(self, version: str | None, name: str) -> str | None:
        """One field of a version's manifest (None: no such version or field)."""
        raw = self.client.hget(self.manifest(version), name) if version else None
        return raw.decode() if raw is not None else None

    def status(self) -> dict[str, Any]:
        """What `python -m batchscore status` shows: current version and its manifest."""
        current = self.current()
        if current is None:
            return {"current": None}
        # Every field but the key samples (up to ~70 KB per shard, read only by `verify`).
        names = [
            n for n in self.client.hkeys(self.manifest(current)) if not n.startswith(b"sample:")
        ]
        values = self.client.hmget(self.manifest(current), names) if names else []
        manifest = {
            k.decode(): v.decode() for k, v in zip(names, values, strict=True) if v is not None
        }
        rows = manifest.get("keys")  # distinct keys, recorded at the join
        if rows is None:  # published before the join recorded it: the shards' rows
            rows = sum(int(v) for k, v in manifest.items() if k.startswith("shard:"))
        info = {
            k: v
            for k, v in manifest.items()
            if not k.startswith("shard:")
            and k
            not in ("feature_columns", "classes", "score_counts", "layout", "row_models", "keys")
        }
        published_at = float(info.pop("published_at", "nan"))
        return {
            "current": current,
            "keys": int(rows),
            "published_at": published_at,
            "age_seconds": time.time() - published_at,
            **info,
        }

    # ------------------------------------------------------------------ operating

    def rollback(self) -> tuple[str, str]:
        """Readers back to the previous published version, atomically: (from, to).

        The previous version is the newest older one never rolled back from (nor retired):
        rolling back twice never brings back what the first rollback left. Refuses when
        there is none, or when the live version changed while this ran. The rolled-back
        version stays published (and kept), so `promote` can bring it back.
        """
        current = self.current()
        try:
            restored = self._rollback(
                keys=[self.pointer, self.versions],
                args=[self.tag, current or "", f"{time.time():.6f}"],
            )
        except redis.ResponseError as exc:
            raise PublishError(f"rollback refused: {exc}") from exc
        return current or "", restored.decode()

    SUMMARY_FIELDS = (
        "status", "run_id", "model", "published_at", "keys_expected", "shards_expected",
        "gate", "max_drift", "score_counts",
    )  # fmt: skip

    def manifests(self) -> dict[str, dict[str, str]]:
        """Every version Redis still knows (published or staged), newest first: the
        manifest's summary fields (not its key samples, which only `verify` reads)."""
        names = {v.decode() for v in self.client.zrange(self.versions, 0, -1)}
        names |= {v.decode() for v in self.client.zrange(self.staged, 0, -1)}
        ordered = sorted(names, reverse=True)
        pipe = self.client.pipeline(transaction=False)
        for version in ordered:
            pipe.hmget(self.manifest(version), self.SUMMARY_FIELDS)
        found = {}
        for version, values in zip(ordered, pipe.execute(), strict=True):
            fields = {k: v.decode() for k, v in zip(self.SUMMARY_FIELDS, values, strict=True) if v}
            if fields:  # a manifest retired between the two reads is gone, not empty
                found[version] = fields
        return found

    def annotate(self, version: str, fields: dict[str, Any]) -> bool:
        """Add fields to a version's manifest, unless the version is gone (retired or
        discarded meanwhile: a manifest must never come back without its keys)."""
        values = [
            str(v) if isinstance(v, str | int | float) else json.dumps(v) for v in fields.values()
        ]
        return bool(
            self._annotate(
                keys=[self.manifest(version)],
                args=[x for pair in zip(fields, values, strict=True) for x in pair],
            )
        )

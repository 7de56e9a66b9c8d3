"""The Redis online store: versioned, batch-first publishing and one-round-trip lookups.

Layout (the Redis contract):
    {prefix}:{version}:{row_key}  -> the row's prediction (JSON)
    {prefix}:current              -> the version readers use
    {prefix}:versions             -> sorted set of published versions (score: publish time)
    {prefix}:staged               -> sorted set of versions being written (score: stage time)
    {prefix}:manifest:{version}   -> hash: per-shard counts, model, status, timestamps

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

import orjson
import pyarrow as pa
import redis

from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.errors import PublishError, SupersededError
from batchscore.online.writer import WRITE_CHUNK, ShardWriter
from batchscore.rows.keys import id_keys, row_keys

if TYPE_CHECKING:  # pandas and the table readers cost every batch-flow step 0.3 s to import
    import pandas as pd

log = logging.getLogger(__name__)

SCAN_COUNT = 5_000
KEEP_VERSIONS = 2  # current + previous: a two-step reader mid-read never loses its version


READ_SLICE = 1_000  # keys per MGET: Redis serves other clients between slices
SAFE_POLICY = "noeviction"
_SCRIPTS = resources.files("batchscore.online") / "scripts"


def _script(name: str) -> str:
    """A Lua script of `scripts/`: publish, record_shard, rollback, annotate."""
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

    def __init__(self, client: redis.Redis, prefix: str = "predictions") -> None:
        if not prefix or ":" in prefix or re.search(r"\s", prefix):
            raise ValueError(f"Redis prefix {prefix!r} must be non-empty, without ':' or spaces")
        self.client = client
        self.prefix = prefix
        self.pointer = f"{prefix}:current"
        self.versions = f"{prefix}:versions"
        self.staged = f"{prefix}:staged"
        self._publish = client.register_script(_script("publish"))
        self._record_shard = client.register_script(_script("record_shard"))
        self._rollback = client.register_script(_script("rollback"))
        self._annotate = client.register_script(_script("annotate"))

    @classmethod
    def from_settings(cls, settings: Settings) -> OnlineStore:
        return cls(connect(settings), settings.redis_prefix)

    def key(self, version: str, row_key: str) -> str:
        return f"{self.prefix}:{version}:{row_key}"

    def manifest(self, version: str) -> str:
        return f"{self.prefix}:manifest:{version}"

    # ------------------------------------------------------------------ writing

    def stage(self, version: str, meta: dict[str, Any], ttl_seconds: int | None = None) -> None:
        """Open a version: its manifest says who is writing it, and that it is not live.

        Refused on a Redis that may evict the version's keys: a lost key would go live.
        """
        self.check_eviction_policy(ttl_seconds)
        fields = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.manifest(version), mapping={**fields, "status": "staged"})
        # Registered so that `retire` finds abandoned versions without scanning the keyspace.
        pipe.zadd(self.staged, {version: time.time()})
        if ttl_seconds:
            pipe.expire(self.manifest(version), ttl_seconds)
        pipe.execute()

    def eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy`: from CONFIG, or from INFO where a managed service
        refuses CONFIG; None if neither says."""
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy")
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

    def writer(
        self,
        version: str,
        shard: str | int,
        ttl_seconds: int | None = None,
        chunk: int = WRITE_CHUNK,
    ) -> ShardWriter:
        """A streaming writer for one shard: feed it rows as they are scored."""
        return ShardWriter(self, version, shard, ttl_seconds, chunk)

    def write(
        self,
        version: str,
        shard: str | int,
        row_keys: pa.Array | Sequence[str],
        values: pa.Array | Sequence[str],
        ttl_seconds: int | None = None,
        chunk: int = WRITE_CHUNK,
    ) -> int:
        """Write one shard's rows under `version`; returns how many keys Redis acknowledged."""
        with self.writer(version, shard, ttl_seconds, chunk) as writer:
            writer.write(row_keys, values)
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

        Counting every key instead means SCANning the whole keyspace (see
        benchmarks/bench_lookup.py); a uniform sample of 1,024 keys per shard plus its last
        key catches a loss of 1% of a shard with probability 1 - 0.99**1024 > 0.9999.
        """
        fields = self.client.hgetall(self.manifest(version))
        checked = 0
        for name, raw in sorted(fields.items()):
            if not name.startswith(b"sample:"):
                continue
            sample = json.loads(raw)
            pipe = self.client.pipeline(transaction=False)
            for row_key in sample:
                pipe.exists(self.key(version, row_key))
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

    def retire(self, keep: int = KEEP_VERSIONS) -> list[str]:
        """Delete versions no reader needs: published ones beyond the newest `keep`, and
        staged ones older than `current` (they can never be published). UNLINK frees
        memory in the background, SCAN walks the keyspace in steps: Redis keeps serving
        while this runs, and with nothing to retire no key is scanned at all."""
        current = self.current()
        if current is None:
            return []
        published = [v.decode() for v in self.client.zrevrange(self.versions, 0, -1)]
        doomed = [v for v in published[keep:] if v != current]
        staged = (v.decode() for v in self.client.zrange(self.staged, 0, -1))
        doomed += [v for v in staged if v < current]
        for version in doomed:
            self.discard(version)
        return doomed

    def discard(self, version: str) -> int:
        """Remove a version's rows and records (e.g. after a failed run); returns rows removed."""
        if version == self.current():
            raise ValueError(f"refusing to discard {version}: it is the current version")
        removed = 0
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
        self.client.zrem(self.versions, version)
        self.client.zrem(self.staged, version)
        return removed

    # ------------------------------------------------------------------ reading

    def current(self) -> str | None:
        value = self.client.get(self.pointer)
        return value.decode() if value is not None else None

    def get(self, row_key: str) -> dict[str, Any] | None:
        """One row's prediction from the current version: two round trips (pointer, GET)."""
        return self.get_many([row_key])[0]

    def get_many(
        self, row_keys: Iterable[str], version: str | None = None
    ) -> list[dict[str, Any] | None]:
        """Rows from the current version (or `version`); None where a row is absent.

        The pointer is read once, then the keys in MGET slices of `READ_SLICE`: Redis
        serves other clients between slices, and a version stays readable while a newer
        one goes live (the previous one is kept). On a Redis Cluster client the slices are
        split by hash slot (`mget_nonatomic`).
        """
        keys = list(row_keys)
        version = version or self.current()
        if version is None or not keys:
            return [None] * len(keys)
        mget = getattr(self.client, "mget_nonatomic", self.client.mget)
        base = f"{self.prefix}:{version}:"
        values: list[dict[str, Any] | None] = []
        for first in range(0, len(keys), READ_SLICE):
            found = mget([base + k for k in keys[first : first + READ_SLICE]])
            values += [orjson.loads(v) if v is not None else None for v in found]
        return values

    def key_scheme(self, version: str | None = None) -> tuple[str, str | None]:
        """How the version keyed its rows: ("feature_hash", None) or ("id", id column)."""
        version = version or self.current()
        if version is None:
            raise LookupError("no published version")
        scheme, column = self.client.hmget(self.manifest(version), "key_scheme", "id_column")
        if scheme == b"id":
            return "id", column.decode()
        return "feature_hash", None

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
        version = version or self.current()
        raw = self.client.hget(self.manifest(version), "feature_columns") if version else None
        if raw is None:
            raise LookupError("no published version records its feature columns")
        return json.loads(raw)

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
        rows = sum(int(v) for k, v in manifest.items() if k.startswith("shard:"))
        info = {
            k: v
            for k, v in manifest.items()
            if not k.startswith("shard:")
            and k not in ("feature_columns", "classes", "score_counts")
        }
        published_at = float(info.pop("published_at", "nan"))
        return {
            "current": current,
            "keys": rows,
            "published_at": published_at,
            "age_seconds": time.time() - published_at,
            **info,
        }

    # ------------------------------------------------------------------ operating

    def rollback(self) -> tuple[str, str]:
        """Readers back to the previous published version, atomically: (from, to).

        Refuses when that version has been retired (its keys are gone) or when the live
        version changed while this ran. The rolled-back version stays published (and
        kept), so `promote` can bring it back.
        """
        current = self.current()
        try:
            restored = self._rollback(
                keys=[self.pointer, self.versions],
                args=[self.prefix, current or "", f"{time.time():.6f}"],
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

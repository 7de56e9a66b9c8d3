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
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from batchscore.config import Settings
from batchscore.embedded_redis import ensure_server
from batchscore.keys import row_keys

if TYPE_CHECKING:  # pandas and the table readers cost every batch-flow step 0.3 s to import
    import pandas as pd

log = logging.getLogger(__name__)

WRITE_CHUNK = 2_000  # keys per MSET: 1,000-5,000 measured best (benchmarks/README.md)
_BLOCK_ROWS = 20_000  # rows per pipeline: one round of replies, a few MB in flight
SCAN_COUNT = 5_000
KEEP_VERSIONS = 2  # current + previous: a two-step reader mid-read never loses its version

# Publish: every shard counted, never backwards, then switch (re-publishing the current
# version is a no-op that reports success, so a resumed step is safe). KEYS: pointer, manifest,
# versions, staged. ARGV: version, expected keys, expected shards, now.
_PUBLISH = """
local fields = redis.call('HGETALL', KEYS[2])
local written, shards = 0, 0
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 6) == 'shard:' then
    written = written + tonumber(fields[i + 1])
    shards = shards + 1
  end
end
if written ~= tonumber(ARGV[2]) or shards ~= tonumber(ARGV[3]) then
  return redis.error_reply('INCOMPLETE ' .. written .. ' keys in ' .. shards ..
    ' shards, expected ' .. ARGV[2] .. ' in ' .. ARGV[3])
end
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return 1
end
if current and current > ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'current', 'published_at', ARGV[4])
return 1
"""

# Lookup in one round trip: read the pointer and every row under it, atomically.
# KEYS: pointer. ARGV: prefix, row keys...
_LOOKUP = """
local version = redis.call('GET', KEYS[1])
if not version then
  return {false}
end
local values = {version}
local base = ARGV[1] .. ':' .. version .. ':'
-- MGET in slices: Lua's unpack() has a stack limit of a few thousand values.
for first = 2, #ARGV, 1000 do
  local names = {}
  for i = first, math.min(first + 999, #ARGV) do
    names[#names + 1] = base .. ARGV[i]
  end
  local found = redis.call('MGET', unpack(names))
  for i = 1, #found do values[#values + 1] = found[i] end
end
return values
"""


class PublishError(RuntimeError):
    """The new version is incomplete; `current` was left where it was."""


def connect(settings: Settings) -> redis.Redis:
    """A client for `BATCHSCORE_REDIS_URL`, or the embedded Redis when none is set.

    Connection errors are retried with jittered backoff; every write is idempotent
    (SET of a key, HSET of a shard's count), so replaying a pipeline is safe.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=5)
    errors = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    if settings.redis_url:
        return redis.Redis.from_url(
            settings.redis_url,
            retry=retry,
            retry_on_error=errors,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
    socket = ensure_server(settings.embedded_redis_path)
    return redis.Redis(unix_socket_path=str(socket), retry=retry, retry_on_error=errors)


def new_version(run_id: str, at: datetime | None = None) -> str:
    """Sortable by start time, so an older run can never overwrite a newer pointer."""
    at = at or datetime.now(UTC)
    tag = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")
    return f"{at:%Y%m%dT%H%M%S%f}Z-{tag}"


def _strings(items: pa.Array | Sequence[str], what: str) -> pa.Array:
    """Text without nulls, as `string` or `large_string` (hash_rows of a huge shard)."""
    if isinstance(items, pa.ChunkedArray):
        items = items.combine_chunks()
    if not isinstance(items, pa.Array):
        items = pa.array(items, pa.string())
    text = pa.types.is_string(items.type) or pa.types.is_large_string(items.type)
    if not text or items.null_count:
        raise ValueError(f"{what} must be text without nulls, not {items.type}")
    return items


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
        self._publish = client.register_script(_PUBLISH)
        self._lookup = client.register_script(_LOOKUP)

    @classmethod
    def from_settings(cls, settings: Settings) -> OnlineStore:
        return cls(connect(settings), settings.redis_prefix)

    def key(self, version: str, row_key: str) -> str:
        return f"{self.prefix}:{version}:{row_key}"

    def manifest(self, version: str) -> str:
        return f"{self.prefix}:manifest:{version}"

    # ------------------------------------------------------------------ writing

    def stage(self, version: str, meta: dict[str, Any], ttl_seconds: int | None = None) -> None:
        """Open a version: its manifest says who is writing it, and that it is not live."""
        fields = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.manifest(version), mapping={**fields, "status": "staged"})
        # Registered so that `retire` finds abandoned versions without scanning the keyspace.
        pipe.zadd(self.staged, {version: time.time()})
        if ttl_seconds:
            pipe.expire(self.manifest(version), ttl_seconds)
        pipe.execute()

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
        """Switch `current` to `version` if every shard landed; False if a newer one is live."""
        try:
            moved = self._publish(
                keys=[self.pointer, self.manifest(version), self.versions, self.staged],
                args=[version, expected_keys, expected_shards, f"{time.time():.6f}"],
            )
        except redis.ResponseError as exc:
            raise PublishError(f"version {version} not published: {exc}") from exc
        return bool(moved)

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
        """One row's prediction from the current version, in one round trip."""
        return self.get_many([row_key])[0]

    def get_many(self, row_keys: Iterable[str]) -> list[dict[str, Any] | None]:
        """Many rows from the current version in one round trip; None where a row is absent."""
        keys = list(row_keys)
        reply = self._lookup(keys=[self.pointer], args=[self.prefix, *keys])
        if not reply or reply[0] is None:
            return [None] * len(keys)
        return [orjson.loads(v) if v is not None else None for v in reply[1:]]

    def lookup_rows(
        self, features: pd.DataFrame, feature_columns: Sequence[str] | None = None
    ) -> list[dict[str, Any] | None]:
        """Predictions for raw feature rows: keys computed here, fetched in one round trip.

        `feature_columns` (training order) defaults to what the current version recorded.
        """
        from batchscore.data import InputError

        columns = list(feature_columns or self.feature_columns())
        missing = [c for c in columns if c not in features.columns]
        if missing:
            raise InputError(f"rows lack feature column(s) {missing}")
        return self.get_many(row_keys(features.loc[:, columns].to_numpy(dtype="float64")))

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
        manifest = {
            k.decode(): v.decode() for k, v in self.client.hgetall(self.manifest(current)).items()
        }
        rows = sum(int(v) for k, v in manifest.items() if k.startswith("shard:"))
        info = {
            k: v
            for k, v in manifest.items()
            if not k.startswith("shard:") and k not in ("feature_columns", "classes")
        }
        published_at = float(info.pop("published_at", "nan"))
        return {
            "current": current,
            "keys": rows,
            "published_at": published_at,
            "age_seconds": time.time() - published_at,
            **info,
        }


class ShardWriter:
    """Streams one shard's rows into a staged version through redis-py pipelines.

    Without a TTL a chunk is one MSET (one reply); with one it is a run of
    `SET name value EX ttl`, about half as fast on the server. Each block of rows (in
    `score_shard`, 20,000) is one pipeline without MULTI, packed by hiredis and executed on
    a background thread, so that Redis stores one block while the caller scores the next.
    A dropped connection is retried under the client's policy by resending the whole
    pipeline (MSET and SET are idempotent). On a clean exit the writer waits for the last
    block, checks that every key was acknowledged, and only then records the shard's count,
    so a shard that died midway is never counted.
    """

    def __init__(
        self,
        store: OnlineStore,
        version: str,
        shard: str | int,
        ttl_seconds: int | None = None,
        chunk: int = WRITE_CHUNK,
    ) -> None:
        self.store, self.version, self.shard = store, version, shard
        self.ttl, self.chunk = ttl_seconds, chunk
        self.base = f"{store.prefix}:{version}:"
        self.sent = 0
        self.landed = 0
        self._sender: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None  # the previous block's pipeline

    def __enter__(self) -> ShardWriter:
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="redis-writer")
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        sender, self._sender = self._sender, None
        try:
            if kind is None:
                self._wait()
        finally:
            sender.shutdown(wait=True, cancel_futures=True)
        if kind is None:
            self._record()

    def write(self, row_keys: pa.Array | Sequence[str], values: pa.Array | Sequence[str]) -> None:
        """Queue these rows (a block of any size); the previous block's replies are checked."""
        if self._sender is None:
            raise RuntimeError("use the writer as a context manager: `with store.writer(...)`")
        keys, texts = _strings(row_keys, "row keys"), _strings(values, "values")
        if len(keys) != len(texts):
            raise ValueError(f"{len(keys)} keys but {len(texts)} values")
        for block in range(0, len(keys), _BLOCK_ROWS):
            # Names and values as bytes, straight from Arrow: nothing to encode per key.
            names = pc.binary_join_element_wise(
                self.base, keys.slice(block, _BLOCK_ROWS).cast(pa.string()), ""
            )
            pipe, sizes = self._pipeline(
                _as_bytes(names), _as_bytes(texts.slice(block, _BLOCK_ROWS))
            )
            self._wait()
            self.sent += sum(sizes)
            self._in_flight = self._sender.submit(self._execute, pipe, sizes)

    def _pipeline(self, names: np.ndarray, values: np.ndarray) -> tuple[Any, list[int]]:
        pipe = self.store.client.pipeline(transaction=False)
        sizes = []
        for start in range(0, len(names), self.chunk):
            chunk_names = names[start : start + self.chunk]
            chunk_values = values[start : start + self.chunk]
            if self.ttl:
                for name, value in zip(chunk_names, chunk_values, strict=True):
                    pipe.execute_command("SET", name, value, "EX", self.ttl)
                sizes += [1] * len(chunk_names)
            else:
                pairs = np.empty(2 * len(chunk_names), dtype=object)
                pairs[0::2], pairs[1::2] = chunk_names, chunk_values
                pipe.execute_command("MSET", *pairs)
                sizes.append(len(chunk_names))
        return pipe, sizes

    def _execute(self, pipe: Any, sizes: list[int]) -> None:
        for size, reply in zip(sizes, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                log.warning("Redis refused a write: %s", reply)
            elif reply:
                self.landed += size

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # a failed block's error surfaces here

    def _record(self) -> None:
        if self.landed != self.sent:
            raise PublishError(
                f"shard {self.shard}: Redis acknowledged {self.landed} of {self.sent}"
            )
        self.store.client.hset(
            self.store.manifest(self.version), f"shard:{self.shard}", self.landed
        )


def _as_bytes(texts: pa.Array) -> np.ndarray:
    return texts.cast(pa.binary()).to_numpy(zero_copy_only=False)

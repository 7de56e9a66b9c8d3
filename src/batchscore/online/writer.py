"""The streaming writer: one shard's scored rows into a staged version, in the compact
layout (`layout.py`): rows grouped by bucket, one command per bucket, a pipeline at a time.

A feature-hash version gets a plain HSET per bucket. An id-keyed version gets a short script
per bucket (`scripts/first_wins.lua`) instead: the same id may come with other features in
another shard, and across shards the first row in input order must win whichever shard
task writes last."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.online.errors import PublishError
from batchscore.online.layout import PROBA_BYTES, Layout, RowModel, owner_name

if TYPE_CHECKING:
    from batchscore.batch.predictions import Scored

log = logging.getLogger(__name__)

# Rows buffered before they are sent: enough that each HSET carries ~ROWS_PER_HSET rows of
# its bucket (redis-py's cost is mostly per command: 1M rows as HSETs of 4 rows took 4.3 s
# of client CPU and 1.5 s of Redis CPU, of 16 rows 1.9 s and 1.0 s), within MAX_FLUSH_ROWS
# (35 bytes a row buffered: 35 MB). Past ~64M rows a version, a shard's rows spread over
# more buckets than that and HSETs carry fewer rows.
ROWS_PER_HSET = 16
MIN_FLUSH_ROWS, MAX_FLUSH_ROWS = 250_000, 1_000_000
PIPELINE_ROWS = 100_000  # rows per pipeline sent: bounds the Python objects alive at once
SAMPLE_KEYS = 1_024  # keys per shard checked with EXISTS before the switch
OWNER_TTL = 7 * 86_400  # owner hashes of a version without a TTL: gone even if never dropped


class KeySample:
    """A uniform random sample of a shard's row keys, plus the last one written.

    Each key gets a random priority and the `size` lowest are kept (a reservoir sample
    built a block at a time), so every key is equally likely to be checked before the
    switch; the last key is always kept, since a failover loses the newest writes first.
    """

    def __init__(self, size: int = SAMPLE_KEYS) -> None:
        self.size = size
        self._keys = pa.array([], pa.string())
        self._priority = np.empty(0)
        self._last: str | None = None
        self._random = np.random.default_rng()

    def add(self, keys: pa.StringArray | np.ndarray) -> None:
        """A block's keys: text, or `feature_digests` rows (only the kept few are hexed)."""
        if not len(keys):
            return
        drawn = self._random.random(len(keys))
        if isinstance(keys, np.ndarray):
            from batchscore.rows.keys import hex_keys

            if len(keys) > self.size:  # only the `size` lowest priorities can enter, and the last
                low = np.argpartition(drawn, self.size)[: self.size]
                keep = np.union1d(low, [len(keys) - 1])
                keys, drawn = keys[keep], drawn[keep]
            keys = hex_keys(keys)
        self._last = keys[len(keys) - 1].as_py()
        pool = pa.concat_arrays([self._keys, keys.cast(pa.string())])
        priority = np.concatenate([self._priority, drawn])
        if len(pool) > self.size:
            keep = np.argpartition(priority, self.size)[: self.size]
            pool, priority = pool.take(pa.array(keep)), priority[keep]
        self._keys, self._priority = pool, priority

    def keys(self) -> list[str]:
        sample = self._keys.to_pylist()
        if self._last is not None and self._last not in sample:
            sample.append(self._last)
        return sample


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


def digests(keys: pa.Array | np.ndarray, layout: Layout) -> np.ndarray:
    """The rows' 32-byte digests (n x 32 uint8): the hex row key's bytes, or SHA-256(id).
    `feature_digests` output (the batch's feature keys) is taken as it is."""
    if isinstance(keys, np.ndarray):
        if layout.key_scheme == "id":
            raise ValueError("an id-keyed version takes ids, not feature digests")
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32:
            raise ValueError(f"feature digests must be n x 32 bytes, not {keys.dtype} {keys.shape}")
        return keys
    if layout.key_scheme == "id":
        import hashlib

        joined = b"".join(hashlib.sha256(k.encode()).digest() for k in keys.to_pylist())
    else:
        valid = pc.match_substring_regex(keys, "^[0-9a-f]{64}$")
        if not pc.all(valid, min_count=0).as_py():  # an empty block is valid
            bad = keys.filter(pc.invert(valid))[0].as_py()
            raise ValueError(f"row key {bad!r} is not 64 hex characters (a feature hash)")
        joined = bytes.fromhex("".join(keys.to_pylist()))
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(keys), 32)


def probabilities(outputs: Sequence[Scored]) -> np.ndarray:
    """The rows' values (n x 3m uint8): each model's published probability in millionths,
    big-endian, champion first."""
    from batchscore.training.models import published_proba

    columns = []
    for model, _, proba in outputs:
        if not np.isfinite(proba).all():
            raise ValueError(f"model {model.name!r} returned a probability that is NaN or infinite")
        micro = np.rint(published_proba(np.asarray(proba, dtype=np.float64)) * 1e6)
        micro = np.clip(micro, 0, 1_000_000).astype(">u4").view(np.uint8).reshape(-1, 4)
        columns.append(micro[:, 4 - PROBA_BYTES :])
    return np.ascontiguousarray(np.hstack(columns))


def _no_script(reply: Any) -> bool:
    import redis

    return isinstance(reply, redis.exceptions.NoScriptError)


def first_rows(found: np.ndarray) -> np.ndarray | None:
    """Where digests repeat, the rows to keep: each digest's first, in row order (None:
    nothing repeats, the usual case). A stable sort on the first 8 bytes brings repeats
    together; neighbours are then compared whole (a shared prefix is not a repeat)."""
    head = np.ascontiguousarray(found[:, :8]).view("<u8").ravel()
    order = np.argsort(head, kind="stable")
    equal = head[order][1:] == head[order][:-1]
    if not equal.any():
        return None
    ranked = found[order]
    repeat = equal.copy()
    repeat[equal] = (ranked[1:][equal] == ranked[:-1][equal]).all(axis=1)
    if (equal & ~repeat).any():  # two digests sharing 8 bytes (~1e-8 at 1M rows): sort all
        order = np.lexsort(np.ascontiguousarray(found).view(">u8").T[::-1])
        ranked = found[order]
        repeat = (ranked[1:] == ranked[:-1]).all(axis=1)
    return np.sort(order[np.r_[True, ~repeat]])


def row_models(outputs: Sequence[Scored]) -> list[RowModel]:
    models = []
    for model, _, _ in outputs:
        threshold = float(model.threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"model {model.name!r} has threshold {threshold}, outside [0, 1]")
        models.append(RowModel(model.name, model.version, threshold))
    return models


class ShardWriter:
    """Streams one shard's rows into a staged version through redis-py pipelines.

    Rows are buffered (about ROWS_PER_HSET per bucket of the version, within
    MIN/MAX_FLUSH_ROWS), grouped by bucket and sent as one HSET per bucket (with an EXPIRE
    when the version has a TTL), packed by hiredis and executed on a background thread in
    pipelines of ~PIPELINE_ROWS rows, so that Redis stores one batch while the caller
    scores the next. An id-keyed version's buckets go through `first_wins.lua` instead
    (the shard number decides which row of a repeated id stays; within a shard the first).
    On a cluster the pipeline is split by node. A dropped connection is retried under the
    client's policy by resending the whole pipeline (HSET is idempotent, and the script
    leaves a shard's own fields as they are). On a clean exit the writer flushes, waits
    for the last pipeline, checks that every row was acknowledged, and only then records
    the shard's count, so a shard that died midway is never counted.
    """

    def __init__(
        self,
        store: Any,  # the OnlineStore that opened it (not imported: store imports this module)
        version: str,
        shard: str | int,
        ttl_seconds: int | None = None,
        flush_rows: int | None = None,
    ) -> None:
        self.store, self.version, self.shard = store, version, shard
        self.ttl, self.flush_rows = ttl_seconds, flush_rows
        self.sent = 0
        self.landed = 0
        self.layout: Layout | None = None
        self._models: list[RowModel] | None = None
        self._digests: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._buffered = 0
        self._sender: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None  # the previous batch's pipeline
        self.sample = KeySample()  # checked by `OnlineStore.verify` before the switch
        self._script: str | None = None  # the SHA of `first_wins.lua` (id-keyed versions)

    def __enter__(self) -> ShardWriter:
        layout = self.store.layout(self.version)
        if layout is None or not layout.compact:
            raise PublishError(f"version {self.version} is not staged (discarded, or never opened)")
        self.layout = layout
        if self.flush_rows is None:
            wanted = ROWS_PER_HSET * layout.buckets
            self.flush_rows = min(max(wanted, MIN_FLUSH_ROWS), MAX_FLUSH_ROWS)
        if layout.owned:
            if not str(self.shard).isdigit():
                raise ValueError(f"shard {self.shard!r}: an id-keyed version's shards are numbered")
            self._script = self.store.load_first_wins()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="redis-writer")
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        sender, self._sender = self._sender, None
        try:
            if kind is None:
                self._flush(sender)
                self._wait()
        finally:
            sender.shutdown(wait=True, cancel_futures=True)
        if kind is None:
            self._record()

    def write(
        self, row_keys: pa.Array | Sequence[str] | np.ndarray, outputs: Sequence[Scored]
    ) -> None:
        """Queue these rows: their keys (text, or `feature_digests` rows) and
        `predict_all`'s outputs (champion first)."""
        if self._sender is None:
            raise RuntimeError("use the writer as a context manager: `with store.writer(...)`")
        keys = row_keys if isinstance(row_keys, np.ndarray) else _strings(row_keys, "row keys")
        for _, _, proba in outputs:
            if len(proba) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(proba)} predictions")
        # Thresholds outside [0, 1], NaN or infinite probabilities and bad keys are refused
        # before the block touches Redis (the manifest's models included).
        models = row_models(outputs)
        found, values = digests(keys, self.layout), probabilities(outputs)
        if self._models is None:
            self.store.record_models(self.version, models)
            self._models = models
        elif models != self._models:
            raise ValueError("every block of a version must come from the same models")
        if not len(keys):
            return
        self.sample.add(keys)
        self._digests.append(found)
        self._values.append(values)
        self._buffered += len(keys)
        if self._buffered >= self.flush_rows:
            self._flush(self._sender)

    def _flush(self, sender: ThreadPoolExecutor) -> None:
        if not self._buffered:
            return
        found, values = np.vstack(self._digests), np.vstack(self._values)
        self._digests, self._values, self._buffered = [], [], 0
        if self._script is not None:  # an id repeated in the buffer: its first row only
            keep = first_rows(found)
            if keep is not None:
                found, values = found[keep], values[keep]
        bucket = np.ascontiguousarray(found[:, :4]).view(">u4").ravel() % self.layout.buckets
        order = np.argsort(bucket, kind="stable")
        self._wait()
        self.sent += len(found)
        self._in_flight = sender.submit(self._send, bucket[order], found[order], values[order])

    def _send(self, bucket: np.ndarray, found: np.ndarray, values: np.ndarray) -> None:
        """Rows sorted by bucket, a command per bucket, in pipelines of ~PIPELINE_ROWS."""
        starts = np.flatnonzero(np.diff(bucket, prepend=-1))  # where each bucket's rows begin
        near = np.searchsorted(starts, np.arange(0, len(bucket), PIPELINE_ROWS))
        cuts = np.unique(starts[np.minimum(near, len(starts) - 1)])  # never inside a bucket
        bounds = [*cuts.tolist(), len(bucket)]
        for first, last in zip(bounds[:-1], bounds[1:], strict=True):
            part = slice(first, last)
            self._execute(*self._pipeline(bucket[part], found[part], values[part]))

    def _pipeline(
        self, bucket: np.ndarray, found: np.ndarray, values: np.ndarray
    ) -> tuple[Any, list[int], list[tuple[Any, ...]]]:
        """One command per bucket (and its EXPIRE), the rows each acknowledges, and the
        script calls' arguments (to resend them should a node have lost the script)."""
        layout = self.layout
        # One bytes object per row and column, made in C by viewing each row as one item.
        fields = found.view(np.dtype((np.void, 32))).ravel().tolist()
        texts = values.view(np.dtype((np.void, values.shape[1]))).ravel().tolist()
        starts = np.flatnonzero(np.diff(bucket, prepend=-1)).tolist() + [len(bucket)]
        pipe = self.store.client.pipeline(transaction=False)
        sizes = []
        calls: list[tuple[Any, ...]] = []
        owned = self._script is not None
        head = (int(self.shard), self.ttl or 0, self.ttl or OWNER_TTL) if owned else ()
        for first, last in zip(starts[:-1], starts[1:], strict=True):
            name = f"{layout.rows}{bucket[first]}"
            pairs: list[bytes] = [None] * (2 * (last - first))  # type: ignore[list-item]
            pairs[0::2], pairs[1::2] = fields[first:last], texts[first:last]
            sizes.append(last - first)
            if owned:  # the script sets both TTLs itself
                calls.append((2, name, owner_name(name), *head, *pairs))
                pipe.execute_command("EVALSHA", self._script, *calls[-1])
                continue
            pipe.execute_command("HSET", name, *pairs)
            if self.ttl:
                pipe.execute_command("EXPIRE", name, self.ttl)
                sizes.append(0)
        return pipe, sizes, calls

    def _execute(self, pipe: Any, sizes: list[int], calls: list[tuple[Any, ...]]) -> None:
        replies = pipe.execute(raise_on_error=False)
        lost = [i for i, reply in enumerate(replies) if _no_script(reply)]
        if lost:  # a node restarted or failed over since the script was loaded: once more
            self._script = self.store.load_first_wins()
            again = self.store.client.pipeline(transaction=False)
            for i in lost:  # a script call per bucket: replies and calls align
                again.execute_command("EVALSHA", self._script, *calls[i])
            for i, reply in zip(lost, again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        for size, reply in zip(sizes, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning("Redis refused a write: %s", reply)
            else:  # HSET answers how many fields were new: a replayed one counts too
                self.landed += size

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # a failed batch's error surfaces here

    def _record(self) -> None:
        if self.landed != self.sent:
            raise PublishError(
                f"shard {self.shard}: Redis acknowledged {self.landed} of {self.sent}"
            )
        self.store.record_shard(self.version, self.shard, self.landed, self.sample.keys())

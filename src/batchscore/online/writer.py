"""The streaming writer: one shard's rows into a staged version, a pipeline at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.online.errors import PublishError

if TYPE_CHECKING:
    from batchscore.online.store import OnlineStore

log = logging.getLogger(__name__)

WRITE_CHUNK = 2_000  # keys per MSET: 1,000-5,000 measured best (benchmarks/README.md)
_BLOCK_ROWS = 20_000  # rows per pipeline: one round of replies, a few MB in flight
SAMPLE_KEYS = 1_024  # keys per shard checked with EXISTS before the switch


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

    def add(self, keys: pa.StringArray) -> None:
        if not len(keys):
            return
        self._last = keys[len(keys) - 1].as_py()
        pool = pa.concat_arrays([self._keys, keys])
        priority = np.concatenate([self._priority, self._random.random(len(keys))])
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


class ShardWriter:
    """Streams one shard's rows into a staged version through redis-py pipelines.

    Without a TTL a chunk is one MSET (one reply); with one it is a run of
    `SET name value EX ttl`, about half as fast on the server. The rows of each `write`
    (in `score_shard`, a block of 50,000) go as pipelines of `_BLOCK_ROWS` without MULTI,
    packed by hiredis and executed on a background thread, so that Redis stores the last
    of them while the caller scores the next block.
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
        self.sample = KeySample()  # checked by `OnlineStore.verify` before the switch

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
            block_keys = keys.slice(block, _BLOCK_ROWS).cast(pa.string())
            self.sample.add(block_keys)
            names = pc.binary_join_element_wise(self.base, block_keys, "")
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
        self.store.record_shard(self.version, self.shard, self.landed, self.sample.keys())


def _as_bytes(texts: pa.Array) -> np.ndarray:
    return texts.cast(pa.binary()).to_numpy(zero_copy_only=False)

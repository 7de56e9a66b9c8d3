"""Score one shard: read its rows from the input, check, key, predict, stream into Redis.

Each Metaflow step is a fresh process that imports this module: the heavy libraries
(pandas, scikit-learn, xgboost, redis) are imported inside the functions that use them,
so a step pays only for what it does (`python -X importtime` to check).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from batchscore.config import Settings

if TYPE_CHECKING:
    from batchscore.batch.bundle import ModelBundle
    from batchscore.batch.shards import Shard
    from batchscore.online.store import OnlineStore

log = logging.getLogger(__name__)

SCORE_BLOCK_ROWS = 50_000  # rows per predict call and Redis hand-off inside a shard


@dataclass
class ShardResult:
    shard: int
    rows_scored: int  # rows read that passed the row check
    keys_written: int  # rows Redis acknowledged (the switch checks them); the version's
    # distinct keys, with repeats across shards, are counted at the join (`publish`)
    duplicates: int = 0  # rows whose key repeated an earlier row's in the shard: written once
    seconds: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # the cap on the models' thread pools (None: none)
    profile: dict | None = None  # `drift.BatchProfile` counts of the scored rows
    rows_read: int = 0  # good and rejected
    rows_rejected: int = 0
    rejected_uri: str | None = None  # quarantine: this shard's part of rejected.csv
    piece_rows: dict[int, int] = field(default_factory=dict)  # rows read per piece


def score_shard(
    shard: int,
    spec: Shard,
    bundle: ModelBundle,
    version: str,
    settings: Settings,
    ttl_seconds: int | None = None,
    online: OnlineStore | None = None,
    threads: int | None = None,
) -> ShardResult:
    """Read one shard's rows from the input a block at a time, check, key, predict, and
    write them under the staged version; memory follows the block, not the shard.

    A bad row under `--bad_rows reject` raises an `InputError` naming file, column and
    row; the staged version is discarded first, so nothing of this run stays in Redis
    (a shard still writing finds its version gone when it records its count, and deletes
    what it wrote). `threads` caps the models' OpenMP/BLAS pools (default:
    BATCHSCORE_SCORING_THREADS, unset: no cap); the flow passes `sizing.scoring_threads`.
    """
    from threadpoolctl import threadpool_limits

    from batchscore.batch.drift import BatchProfile
    from batchscore.batch.predictions import predict_all
    from batchscore.batch.shards import read_shard, write_rejected_part
    from batchscore.online.errors import SupersededError
    from batchscore.online.store import OnlineStore
    from batchscore.rows.errors import InputError
    from batchscore.rows.keys import hash_rows

    clock = _Clock()
    online = online or OnlineStore.from_settings(settings)
    # Scored and sent a block at a time: Redis stores one block while the next is scored.
    # Parallel tasks whose models each spread over every core spin against each other:
    # each task's pools are capped (cores / concurrent tasks in the flow).
    threads = threads or settings.scoring_threads
    profile = BatchProfile()
    seen = SeenKeys()
    result = ShardResult(shard, 0, 0, threads=threads)
    rejected = []
    try:
        with (
            threadpool_limits(limits=threads),
            online.writer(version, shard, ttl_seconds) as writer,
        ):
            for checked in read_shard(spec, settings):
                result.rows_read += checked.rows
                result.piece_rows[checked.piece] = (
                    result.piece_rows.get(checked.piece, 0) + checked.rows
                )
                if checked.rejected is not None and checked.rejected.num_rows:
                    rejected.append(checked.rejected)
                    result.rows_rejected += checked.rejected.num_rows
                clock.lap("read")
                for start in range(0, checked.features.num_rows, SCORE_BLOCK_ROWS):
                    features = checked.features.slice(start, SCORE_BLOCK_ROWS)
                    block = features.to_pandas()
                    if checked.ids is not None:
                        keys = checked.ids.slice(start, SCORE_BLOCK_ROWS)
                    else:
                        keys = hash_rows(block.to_numpy())
                    first = seen.first(keys, hashed=checked.ids is None)
                    result.rows_scored += len(block)
                    if first is not None:
                        result.duplicates += len(keys) - int(first.sum())
                        keys = keys.filter(first)
                        block = block.loc[first].reset_index(drop=True)
                    clock.lap("key")
                    if not len(block):
                        continue
                    outputs = predict_all(bundle.models, block)
                    clock.lap("predict")
                    if bundle.reference is not None:  # the batch report's counts, as we go
                        _, labels, proba = outputs[0]
                        profile.add(bundle.reference, block.to_numpy(), proba, labels)
                        clock.lap("profile")
                    writer.write(keys, outputs)
                    clock.lap("write")
    except InputError:
        # Nothing from a bad input is published: this run's staged keys go, now.
        online.discard(version)
        raise
    except SupersededError as exc:
        # A newer run went live meanwhile and retired this version while it was written
        # (or another shard found a bad row and discarded it): delete what this shard
        # wrote after that (each shard does, the last one wins).
        online.discard(version)
        log.warning("shard %s: %s; its keys are deleted", shard, exc)
        result.keys_written = 0
        return result
    clock.lap("write")
    result.keys_written = writer.landed
    result.seconds = clock.seconds
    result.rejected_uri = write_rejected_part(spec, rejected, settings)
    if result.duplicates:
        log.warning("shard %s: %d duplicate rows written once", shard, result.duplicates)
    if bundle.reference is not None:
        result.profile = profile.to_dict()
    return result


class SeenKeys:
    """Which keys a shard already wrote, so a repeated key is written once (its first row
    wins). Each key is kept as a 128-bit fingerprint (a SHA-256 prefix: 16 bytes a row,
    never a Python object per key) in a few sorted runs, merged as they grow. Two different
    keys share a fingerprint with odds of about 1e-21 at a billion rows."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low) sorted by high

    def first(self, keys: pa.Array, hashed: bool = True) -> np.ndarray | None:
        """Mask of the rows whose key is new (first in the block, unseen before), or None
        when every key is new (the usual case). `hashed`: keys are `hash_rows` output."""
        high, low = _fingerprints(keys, hashed)
        # Sorted (stably: the first of equal keys stays first), repeats in the block are
        # neighbours, and numpy's search is much faster on sorted needles.
        order = np.argsort(high, kind="stable")
        high, low = high[order], low[order]
        fresh = np.ones(len(high), dtype=bool)
        fresh[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
        for run_high, run_low in self._runs:
            at = np.searchsorted(run_high, high)
            at[at == len(run_high)] = 0
            same = (run_high[at] == high) & (run_low[at] == low)
            # Equal high halves, other low half: look along the (tiny) run of equal highs.
            for row in np.flatnonzero((run_high[at] == high) & ~same):
                stop = np.searchsorted(run_high, high[row], side="right")
                same[row] = bool((run_low[at[row] : stop] == low[row]).any())
            fresh &= ~same
        if fresh.any():
            self._runs.append((high[fresh], low[fresh]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (high_b, low_b), (high_a, low_a) = self._runs.pop(), self._runs.pop()
            merged = np.concatenate([high_a, high_b])
            by_high = np.argsort(merged, kind="stable")  # two sorted runs: a linear merge
            self._runs.append((merged[by_high], np.concatenate([low_a, low_b])[by_high]))
        if fresh.all():
            return None
        mask = np.empty_like(fresh)
        mask[order] = fresh
        return mask


def _fingerprints(keys: pa.Array, hashed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 halves of a 128-bit fingerprint per key: for a feature key (hex SHA-256)
    its first 32 hex digits, for an id its BLAKE2b-128."""
    import binascii
    import hashlib

    if hashed and len(keys):
        text = np.frombuffer(keys.buffers()[2], np.uint8)
        width = 8 if pa.types.is_large_string(keys.type) else 4  # offsets' bytes
        first = np.frombuffer(keys.buffers()[1], f"<i{width}", 1, width * keys.offset)[0]
        hexed = text[first : first + 64 * len(keys)].reshape(-1, 64)[:, :32]
        raw = binascii.unhexlify(hexed.tobytes())
    else:
        blake = hashlib.blake2b
        ids = keys.cast(pa.string()).to_pylist()
        raw = b"".join([blake(k.encode(), digest_size=16).digest() for k in ids])
    pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class _Clock:
    """Per-stage wall time, for the benchmark's breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

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
    from batchscore.rows.keys import feature_digests

    clock = _Clock()
    online = online or OnlineStore.from_settings(settings)
    # Scored and sent a block at a time: Redis stores one block while the next is scored.
    # Parallel tasks whose models each spread over every core spin against each other:
    # each task's pools are capped (cores / concurrent tasks in the flow).
    threads = threads or settings.scoring_threads
    profile = BatchProfile()
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
                    else:  # raw digests: Redis stores the 32 bytes, nobody reads the hex
                        keys = feature_digests(block.to_numpy())
                    # A repeated key is written again (a feature key: the same value) or
                    # kept from its first row (an id: the writer's rule); the repeats are
                    # counted once, at the join, from the keys the version holds.
                    result.rows_scored += len(block)
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
    if bundle.reference is not None:
        result.profile = profile.to_dict()
    return result


class _Clock:
    """Per-stage wall time, for the benchmark's breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

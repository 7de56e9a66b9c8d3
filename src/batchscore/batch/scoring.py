"""Score one shard: read, key, predict and stream it into the staged version.

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
    from batchscore.online.store import OnlineStore

log = logging.getLogger(__name__)

SCORE_BLOCK_ROWS = 50_000  # rows per predict call and Redis hand-off inside a shard


@dataclass
class ShardResult:
    shard: int
    rows_scored: int
    keys_written: int
    duplicates: int = 0  # rows whose key repeated an earlier row's in the shard: written once
    seconds: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # the cap on the models' thread pools (None: none)
    profile: dict | None = None  # `drift.BatchProfile` counts of the scored rows


def score_shard(
    shard: int,
    shard_uri: str,
    bundle: ModelBundle,
    version: str,
    settings: Settings,
    ttl_seconds: int | None = None,
    online: OnlineStore | None = None,
    threads: int | None = None,
) -> ShardResult:
    """Read one shard, key it, predict, and write it under the staged version.

    `threads` caps the models' OpenMP/BLAS pools (default: BATCHSCORE_SCORING_THREADS,
    unset: no cap); the flow passes `sizing.scoring_threads`.
    """
    import pyarrow as pa
    from threadpoolctl import threadpool_limits

    from batchscore.batch.drift import BatchProfile
    from batchscore.batch.predictions import predict_all
    from batchscore.online.errors import SupersededError
    from batchscore.online.store import OnlineStore
    from batchscore.rows.keys import first_occurrences, hash_rows
    from batchscore.storage.object_store import ObjectStore

    clock = _Clock()
    table = pa.ipc.open_file(pa.py_buffer(ObjectStore.read_uri(shard_uri, settings))).read_all()
    features = table.select(bundle.feature_columns).to_pandas()
    id_column = settings.id_column
    clock.lap("read")
    if id_column and id_column in table.column_names:
        keys = table.column(id_column).combine_chunks()
    else:
        keys = hash_rows(features.to_numpy())
    first = first_occurrences(keys)
    if first is not None:
        keys = keys.filter(first)
        features = features.loc[first].reset_index(drop=True)
    clock.lap("key")
    online = online or OnlineStore.from_settings(settings)
    # Scored and sent a block at a time: Redis stores one block while the next is scored.
    # Parallel tasks whose models each spread over every core spin against each other:
    # each task's pools are capped (cores / concurrent tasks in the flow).
    threads = threads or settings.scoring_threads
    profile = BatchProfile()
    try:
        with (
            threadpool_limits(limits=threads),
            online.writer(version, shard, ttl_seconds) as writer,
        ):
            for start in range(0, len(keys), SCORE_BLOCK_ROWS):
                block = features.iloc[start : start + SCORE_BLOCK_ROWS]
                outputs = predict_all(bundle.models, block)
                clock.lap("predict")
                if bundle.reference is not None:  # the batch report's counts, as we go
                    _, labels, proba = outputs[0]
                    profile.add(bundle.reference, block.to_numpy(), proba, labels)
                    clock.lap("profile")
                writer.write(keys.slice(start, SCORE_BLOCK_ROWS), outputs)
                clock.lap("write")
    except SupersededError as exc:
        # A newer run went live meanwhile and retired this version while it was written:
        # delete what this shard wrote after that (each shard does, the last one wins).
        online.discard(version)
        log.warning("shard %s: %s; its keys are deleted", shard, exc)
        return ShardResult(shard, table.num_rows, 0, 0, clock.seconds, threads)
    clock.lap("write")
    written = writer.landed
    duplicates = table.num_rows - len(keys)
    if duplicates:
        log.warning("shard %s: %d duplicate rows written once", shard, duplicates)
    return ShardResult(
        shard,
        table.num_rows,
        written,
        duplicates,
        clock.seconds,
        threads,
        profile.to_dict() if bundle.reference is not None else None,
    )


class _Clock:
    """Per-stage wall time, for the benchmark's breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

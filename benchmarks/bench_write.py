"""The Redis write stage alone: the compact layout's writer against the first layout's.

    python benchmarks/bench_write.py                    # 500,000 rows, median of 5
    python benchmarks/bench_write.py --keys 100000 --repeat 3
    python benchmarks/bench_write.py --redis-url redis://127.0.0.1:7000   # a cluster node

Real row keys (of breast-cancer-shaped rows) and the seed's models' real scores
(`predict_all`, champion first) are written under a fresh version into Redis db 14
(`--redis-url`; FLUSHDB before each run, never on a cluster) by `OnlineStore.writer`, the
writer `score_shard` uses, in blocks of SCORE_BLOCK_ROWS as `score_shard` hands them over:
without a TTL (the flow's default) and with one (`--ttl_days` > 0: an EXPIRE per bucket).
Beside it, the first layout's way with the same rows: one JSON string per row
(`workload.first_layout_values`), MSET in chunks of 2,000 (one Redis only). Printed:
rows/s, and the CPU seconds of this process plus the Redis server (INFO cpu) per run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis
from redis.cluster import RedisCluster
from workload import first_layout_values, flush, train_bundle, write_rows

from batchscore.batch.predictions import predict_all
from batchscore.batch.scoring import SCORE_BLOCK_ROWS
from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import hash_rows
from batchscore.versions import new_version

PREFIX = "benchwrite"
TTL = 30 * 86_400  # `--ttl_days 30`


def _first_layout(client: redis.Redis, version: str, keys, values) -> None:
    names = [f"{PREFIX}:{version}:{k}" for k in keys.to_pylist()]
    texts = values.to_pylist()
    pipe = client.pipeline(transaction=False)
    for first in range(0, len(names), 2_000):
        pipe.mset(
            dict(zip(names[first : first + 2_000], texts[first : first + 2_000], strict=True))
        )
        if len(pipe) >= 10:
            pipe.execute()
    pipe.execute()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        rows = Path(folder) / "rows.parquet"
        write_rows(rows, args.keys, args.seed)
        features = pq.read_table(rows).to_pandas()
    bundle = train_bundle(args.seed)
    features = features[bundle.feature_columns]
    keys = hash_rows(features.to_numpy())
    models = bundle.models if args.models == "all" else bundle.models[:1]
    outputs = predict_all(models, features)
    client = connect(Settings(_env_file=None, redis_url=args.redis_url))
    cluster = isinstance(client, RedisCluster)
    store = OnlineStore(client, PREFIX)

    def cpu() -> float:
        info = client.info("cpu", target_nodes=RedisCluster.PRIMARIES) if cluster else None
        nodes = list(info.values()) if cluster else [client.info("cpu")]
        used = sum(float(n["used_cpu_user"]) + float(n["used_cpu_sys"]) for n in nodes)
        return time.process_time() + used

    def compact(version: str, ttl: int | None) -> None:
        store.stage(version, {"model": models[0].name, "classes": list(bundle.classes)}, ttl)
        with store.writer(version, 0, ttl) as writer:
            for start in range(0, len(keys), SCORE_BLOCK_ROWS):
                block = [
                    (m, y[start : start + SCORE_BLOCK_ROWS], p[start : start + SCORE_BLOCK_ROWS])
                    for m, y, p in outputs
                ]
                writer.write(keys.slice(start, SCORE_BLOCK_ROWS), block)
        if writer.landed != len(keys):
            raise RuntimeError(f"{writer.landed} of {len(keys)} rows acknowledged")

    cases = {
        "compact-1, no TTL": lambda v: compact(v, None),
        "compact-1, TTL": lambda v: compact(v, TTL),
    }
    if not cluster:
        values = first_layout_values(outputs, bundle.classes)
        cases["first layout (JSON, MSET)"] = lambda v: _first_layout(client, v, keys, values)
    results: dict[str, Any] = {}
    for name, write in cases.items():
        runs = []
        for i in range(args.repeat):
            if not cluster:
                flush(args.redis_url)
            version = new_version(f"BenchWrite/{i}")
            wall, used = time.perf_counter(), cpu()
            write(version)
            runs.append((time.perf_counter() - wall, cpu() - used))
            if cluster:
                store.discard(version)
        results[name] = {
            "rows_per_s": len(keys) / statistics.median(w for w, _ in runs),
            "cpu": statistics.median(c for _, c in runs),
        }
    if not cluster:
        flush(args.redis_url)
    return {"writer": results, "cluster": cluster}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--models", choices=("champion", "all"), default="champion")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    results = measure(args)
    where = "a Redis Cluster" if results["cluster"] else "one Redis"
    print(f"\n**{args.keys:,} rows, --models {args.models}, {where}, median of {args.repeat}**\n")
    print("| layout | rows/s | CPU s (client + Redis) |")
    print("|---|---:|---:|")
    for name, r in results["writer"].items():
        print(f"| {name} | {r['rows_per_s']:,.0f} | {r['cpu']:.2f} |")


if __name__ == "__main__":
    main()

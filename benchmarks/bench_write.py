"""The Redis write stage alone: the batch path's writer against redis-py's own pipeline.

    python benchmarks/bench_write.py                    # 500,000 keys, median of 5
    python benchmarks/bench_write.py --keys 100000 --repeat 3

Real keys and values (row keys of breast-cancer-shaped rows, JSON values of the seed's
four models) are written under a fresh version into Redis db 14 (`--redis-url`; FLUSHDB
before each run), without TTL (MSET, the flow's default) and with one (`SET ... EX`):

* **ShardWriter**: `OnlineStore.write`, what `score_shard` uses.
* **redis-py pipeline**: `client.pipeline(transaction=False)`, one MSET per chunk of 2,000
  keys (or one `SET ... EX` per key), packed by hiredis, executed once per block of 20,000
  rows, the block size `score_shard` hands the writer; keys and values go in as Python
  bytes taken from the same Arrow arrays (that conversion is counted).

Printed: keys/s (wall) and CPU seconds of this process plus the Redis server (INFO cpu).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from workload import flush, train_bundle, write_rows

from batchscore.batch import SCORE_BLOCK_ROWS
from batchscore.keys import hash_rows
from batchscore.online import WRITE_CHUNK, OnlineStore, new_version
from batchscore.scoring import encode_predictions

PREFIX = "benchwrite"
TTL = 30 * 86_400


def pipeline_write(
    client: redis.Redis, base: str, keys: pa.Array, values: pa.Array, ttl: int | None
) -> int:
    """redis-py's own way: a non-transactional pipeline per block, MSET chunks (SET EX per
    key with a TTL); returns how many keys Redis acknowledged."""
    landed = 0
    names = pc.binary_join_element_wise(base, keys, "").cast(pa.binary())
    values = values.cast(pa.binary())
    for block in range(0, len(keys), SCORE_BLOCK_ROWS):
        pipe = client.pipeline(transaction=False)
        block_names = names.slice(block, SCORE_BLOCK_ROWS).to_numpy(zero_copy_only=False)
        block_values = values.slice(block, SCORE_BLOCK_ROWS).to_numpy(zero_copy_only=False)
        for start in range(0, len(block_names), WRITE_CHUNK):
            chunk_names = block_names[start : start + WRITE_CHUNK]
            chunk_values = block_values[start : start + WRITE_CHUNK]
            if ttl:
                for name, value in zip(chunk_names, chunk_values, strict=True):
                    pipe.set(name, value, ex=ttl)
            else:
                flat = np.empty(2 * len(chunk_names), dtype=object)
                flat[0::2], flat[1::2] = chunk_names, chunk_values
                pipe.execute_command("MSET", *flat)
        replies = pipe.execute()
        if ttl:
            landed += sum(r is True for r in replies)
        else:
            counts = [
                len(block_names[s : s + WRITE_CHUNK])
                for s in range(0, len(block_names), WRITE_CHUNK)
            ]
            landed += sum(n for n, r in zip(counts, replies, strict=True) if r is True)
    return landed


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        rows = Path(folder) / "rows.parquet"
        write_rows(rows, args.keys, args.seed)
        features = pq.read_table(rows).to_pandas()
    bundle = train_bundle(args.seed)
    features = features[bundle.feature_columns]
    keys = hash_rows(features.to_numpy())
    values = encode_predictions(bundle.models, features, bundle.classes)
    client = redis.Redis.from_url(args.redis_url, socket_timeout=None)
    store = OnlineStore(client, PREFIX)

    def cpu() -> float:
        info = client.info("cpu")
        return time.process_time() + float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    ways = {
        "ShardWriter": lambda version, ttl: store.write(version, 0, keys, values, ttl),
        "redis-py pipeline": lambda version, ttl: pipeline_write(
            client, f"{PREFIX}:{version}:", keys, values, ttl
        ),
    }
    results: dict[str, Any] = {}
    for ttl_name, ttl in (("MSET (no TTL)", None), ("SET EX (TTL)", TTL)):
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for i in range(args.repeat):
            for name, way in ways.items():  # alternating: paired against the same drift
                flush(args.redis_url)
                version = new_version(f"BenchWrite/{i}")
                before_wall, before_cpu = time.perf_counter(), cpu()
                landed = way(version, ttl)
                runs[name].append((time.perf_counter() - before_wall, cpu() - before_cpu))
                if landed != len(keys):
                    raise RuntimeError(f"{name}: {landed} of {len(keys)} keys acknowledged")
        results[ttl_name] = {
            name: {
                "keys_per_s": len(keys) / statistics.median(w for w, _ in measured),
                "cpu": statistics.median(c for _, c in measured),
            }
            for name, measured in runs.items()
        }
    flush(args.redis_url)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    results = measure(args)
    print(f"\n**{args.keys:,} keys, median of {args.repeat}**\n")
    print("| command | writer | keys/s | CPU s (client + Redis) |\n|---|---|---:|---:|")
    for command, ways in results.items():
        for name, r in ways.items():
            print(f"| {command} | {name} | {r['keys_per_s']:,.0f} | {r['cpu']:.2f} |")


if __name__ == "__main__":
    main()

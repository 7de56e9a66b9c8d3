"""What the rule for repeated keys costs: the id-keyed write path and the count at the join.

    python benchmarks/bench_repeats.py                       # 1,000,000 rows, median of 3
    python benchmarks/bench_repeats.py --rows 5000000 --repeat 3 --schemes feature_hash

One shard's rows written in process by `OnlineStore.writer` (in blocks of
SCORE_BLOCK_ROWS, as `score_shard` hands them over) under a fresh version laid out for
them, into `--redis-url` (default db 12, its keys under `benchrepeats` deleted after each
run): an id-keyed version (`first_wins.lua` per bucket, owner hashes beside the buckets)
and a feature-hash one (plain HSET). Scores are random (the writer's cost does not depend
on them). Then what `ingest_redis` adds: `key_count` (one HLEN per bucket, pipelined) and
`drop_owners` (pipelined UNLINKs). Printed: medians of rows/s, of the write's CPU seconds
(this process plus the Redis server, INFO cpu: steadier than wall time on a busy machine;
use a Redis of your own, since INFO counts every client's work) and of the join's seconds,
and the Redis memory the owner hashes hold while the version is staged.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa
import redis

from batchscore.batch.predictions import LoadedModel
from batchscore.batch.scoring import SCORE_BLOCK_ROWS
from batchscore.online.store import OnlineStore
from batchscore.versions import new_version

PREFIX = "benchrepeats"


def _keys(scheme: str, rows: int, seed: int) -> pa.Array:
    if scheme == "id":
        return pa.array([f"customer-{i:09d}" for i in range(rows)])
    raw = np.random.default_rng(seed).bytes(32 * rows)
    return pa.array([raw[i : i + 32].hex() for i in range(0, len(raw), 32)])


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _cpu(client: redis.Redis) -> float:
    server = client.info("cpu")
    return time.process_time() + float(server["used_cpu_user"]) + float(server["used_cpu_sys"])


def measure(args: argparse.Namespace, scheme: str) -> dict[str, float]:
    client = redis.Redis.from_url(args.redis_url)
    store = OnlineStore(client, PREFIX)
    keys = _keys(scheme, args.rows, args.seed)
    proba = np.random.default_rng(args.seed).random(args.rows)
    model = LoadedModel("m", None, "ab" * 32, 0.5)
    meta = {"model": "m", "classes": ["n", "y"], "key_scheme": scheme}
    if scheme == "id":
        meta["id_column"] = "customer"
    runs: dict[str, list[float]] = {
        "write": [], "cpu": [], "count": [], "drop": [], "owners_mib": [],
    }  # fmt: skip
    for i in range(args.repeat):
        version = new_version(f"BenchRepeats/{i}")
        store.stage(version, meta, expected_rows=args.rows)
        started, used = time.perf_counter(), _cpu(client)
        with store.writer(version, 0) as writer:
            for first in range(0, args.rows, SCORE_BLOCK_ROWS):
                part = proba[first : first + SCORE_BLOCK_ROWS]
                writer.write(keys.slice(first, len(part)), [(model, (part >= 0.5) * 1, part)])
        runs["write"].append(time.perf_counter() - started)
        runs["cpu"].append(_cpu(client) - used)
        if hasattr(store, "key_count"):  # absent before the rule: nothing counted at the join
            started = time.perf_counter()
            counted = store.key_count(version)
            runs["count"].append(time.perf_counter() - started)
            if counted != args.rows:
                raise RuntimeError(f"{counted} keys counted, {args.rows} written")
            before = _used_memory(client)
            started = time.perf_counter()
            store.drop_owners(version)
            runs["drop"].append(time.perf_counter() - started)
            time.sleep(0.5)  # UNLINK frees in the background
            runs["owners_mib"].append((before - _used_memory(client)) / 2**20)
        store.discard(version)
    client.unlink(store.staged, store.manifest(version), store.sequence)
    client.close()
    return {name: statistics.median(values) for name, values in runs.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--schemes", nargs="+", default=["id", "feature_hash"])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(f"\n**{args.rows:,} rows, one shard, median of {args.repeat}**\n")
    print("| key scheme | write rows/s | write CPU s | key_count s | drop_owners s | owners MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for scheme in args.schemes:
        r = measure(args, scheme)
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("count", "drop")]
        owners = f"{r['owners_mib']:.0f}" if "owners_mib" in r else "-"
        rate = f"{args.rows / r['write']:,.0f} | {r['cpu']:.2f}"
        print(f"| {scheme} | {rate} | {' | '.join(cells)} | {owners} |")


if __name__ == "__main__":
    main()

"""The Redis write stage alone: ShardWriter against redis-benchmark on the same server.

    python benchmarks/bench_write.py                    # 500,000 keys, median of 5
    python benchmarks/bench_write.py --keys 100000 --repeat 3

Real keys and values (row keys of breast-cancer-shaped rows, JSON values of the seed's
four models) are written under a fresh version into Redis db 14 (`--redis-url`; FLUSHDB
before each run) by `OnlineStore.write`, the writer `score_shard` uses: without TTL (MSET
chunks, the flow's default) and with one (`SET ... EX` per key, `--ttl_days` > 0), in blocks
of 20,000 rows as `score_shard` hands them over. Beside it, `redis-benchmark -P 64` (its 50
clients) sending SET, and SET EX, with the same key and value sizes to random keys: what
the server itself sustains. Printed: keys/s, and the CPU seconds of this process plus the
Redis server (INFO cpu) per run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from workload import flush, train_bundle, write_rows

from batchscore.batch.predictions import encode_predictions
from batchscore.batch.scoring import SCORE_BLOCK_ROWS
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import hash_rows
from batchscore.versions import new_version

PREFIX = "benchwrite"
TTL = 30 * 86_400  # `--ttl_days 30`


def redis_benchmark(redis_url: str, key_bytes: int, value_bytes: int) -> dict[str, float]:
    """redis-benchmark's pipelined rate (-P 64) for SET and SET EX of our sizes; {} if absent."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {}
    url = urlparse(redis_url)
    base = [exe, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379), "-q", "-P", "64"]
    if url.password:
        base += ["-a", url.password]
    base += ["--dbnum", (url.path or "/0").strip("/") or "0", "-n", "400000", "-r", "100000000"]
    key = "k" * max(key_bytes - 12, 1) + "__rand_int__"  # __rand_int__ becomes 12 digits
    rates = {}
    for name, extra in (("MSET (no TTL)", []), ("SET EX (TTL)", ["EX", str(TTL)])):
        done = subprocess.run(
            [*base, "SET", key, "v" * value_bytes, *extra], capture_output=True, text=True
        )
        found = re.findall(r"([\d.]+) requests per second", done.stdout.replace("\r", "\n"))
        rates[name] = float(found[-1]) if found else float("nan")
        flush(redis_url)
    return rates


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

    results: dict[str, Any] = {}
    for name, ttl in (("MSET (no TTL)", None), ("SET EX (TTL)", TTL)):
        runs = []
        for i in range(args.repeat):
            flush(args.redis_url)
            version = new_version(f"BenchWrite/{i}")
            wall, used = time.perf_counter(), cpu()
            with store.writer(version, 0, ttl) as writer:
                for start in range(0, len(keys), SCORE_BLOCK_ROWS):
                    writer.write(
                        keys.slice(start, SCORE_BLOCK_ROWS), values.slice(start, SCORE_BLOCK_ROWS)
                    )
            runs.append((time.perf_counter() - wall, cpu() - used))
            if writer.landed != len(keys):
                raise RuntimeError(f"{writer.landed} of {len(keys)} keys acknowledged")
        results[name] = {
            "keys_per_s": len(keys) / statistics.median(w for w, _ in runs),
            "cpu": statistics.median(c for _, c in runs),
        }
    key_bytes = len(store.key(version, keys[0].as_py()))
    value_bytes = int(statistics.median(pc.binary_length(values).to_pylist()))
    bench = redis_benchmark(args.redis_url, key_bytes, value_bytes)
    flush(args.redis_url)
    return {"writer": results, "redis_benchmark": bench, "sizes": (key_bytes, value_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    results = measure(args)
    key_bytes, value_bytes = results["sizes"]
    print(f"\n**{args.keys:,} keys ({key_bytes}-byte names, {value_bytes}-byte values), ", end="")
    print(f"median of {args.repeat}**\n")
    print("| command | ShardWriter keys/s | CPU s (client + Redis) | redis-benchmark -P 64 req/s |")
    print("|---|---:|---:|---:|")
    for name, r in results["writer"].items():
        bench = results["redis_benchmark"].get(name, float("nan"))
        print(f"| {name} | {r['keys_per_s']:,.0f} | {r['cpu']:.2f} | {bench:,.0f} |")
    print("\n| target | met | measured |\n|---|:---:|---:|")
    for name, r in results["writer"].items():
        bench = results["redis_benchmark"].get(name)
        if bench:
            share = r["keys_per_s"] / bench
            ok = "yes" if share >= 0.5 else "no"
            print(f"| {name}: ShardWriter >= 1/2 redis-benchmark | {ok} | {share:.2f} of it |")


if __name__ == "__main__":
    main()

"""Redis memory per published row: the compact layout against the first (JSON) one.

    python benchmarks/bench_memory.py                          # 1,000,000 rows, one Redis
    python benchmarks/bench_memory.py --rows 200000 --cluster-url redis://127.0.0.1:7000

Each case writes `--rows` real row keys (SHA-256 of random breast-cancer-shaped rows) with
one model's probabilities (the flow's default, `--models champion`) or five (`--models
all`) through `OnlineStore.write`, the writer `score_shard` uses, and reads INFO
`used_memory` before and after (summed over the masters of a cluster). The first layout
(one JSON string per row under `{prefix}:{version}:{row_key}`, the values
`workload.first_layout_values` builds) is written the way its writer did (MSET chunks),
for the comparison. The single Redis is a private `redis-server` on a free loopback port,
so that nobody else's keys are counted; a cluster is given by the plain URL of any node
(`--cluster-url`) and must be otherwise idle. Printed: bytes per row, and the targets
(<= 100 at the defaults, <= 250 with all).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import numpy as np
import redis
from workload import first_layout_values

from batchscore.batch.predictions import LoadedModel
from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import hash_rows
from batchscore.versions import new_version

MODELS = ("svc", "tree", "knn", "logreg", "xgboost")  # champion first
TARGETS = {"champion": 100, "all": 250}
BLOCK = 50_000  # rows per `writer.write`, as `score_shard` hands them over


def outputs(count: int, models: int, seed: int) -> list:
    """`predict_all`'s output for `count` rows of `models` models (random probabilities)."""
    rng = np.random.default_rng(seed)
    scored = []
    for name in MODELS[:models]:
        model = LoadedModel(name, None, rng.bytes(32).hex(), round(float(rng.uniform(0.2, 0.8)), 6))
        proba = rng.random(count)
        scored.append((model, (np.round(proba, 6) >= model.threshold).astype(int), proba))
    return scored


def used_memory(client: Any) -> int:
    """INFO used_memory, summed over the masters of a cluster."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        info = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(node["used_memory"]) for node in info.values())
    return int(client.info("memory")["used_memory"])


def write_compact(store: OnlineStore, keys, scored: list) -> None:
    version = new_version("BenchMemory/1")
    store.stage(version, {"model": MODELS[0], "classes": ["benign", "malignant"]})
    with store.writer(version, 0) as writer:
        for first in range(0, len(keys), BLOCK):
            part = [
                (m, labels[first : first + BLOCK], p[first : first + BLOCK])
                for m, labels, p in scored
            ]
            writer.write(keys.slice(first, BLOCK), part)


def write_first_layout(client: redis.Redis, prefix: str, keys, scored: list) -> None:
    base = f"{prefix}:{new_version('BenchMemory/0')}:"
    names = [base + k for k in keys.to_pylist()]
    values = first_layout_values(scored, ("benign", "malignant")).to_pylist()
    pipe = client.pipeline(transaction=False)
    for first in range(0, len(names), 2_000):
        pairs = {
            n: v
            for n, v in zip(
                names[first : first + 2_000], values[first : first + 2_000], strict=True
            )
        }
        pipe.mset(pairs)
        if len(pipe) >= 50:
            pipe.execute()
    pipe.execute()


def measure(client: Any, write) -> float:
    before = used_memory(client)
    started = time.perf_counter()
    write()
    seconds = time.perf_counter() - started
    time.sleep(0.5)  # background frees (UNLINK) settle
    return used_memory(client) - before, seconds


def private_redis() -> tuple[str, subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="bench-memory-")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", folder, "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return url, process, folder
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def run(url: str, topology: str, rows: int, seed: int, legacy: bool) -> list[dict[str, Any]]:
    client = connect(Settings(_env_file=None, redis_url=url))
    keys = hash_rows(np.random.default_rng(seed).normal(size=(rows, 30)))
    results = []
    for kind, count in (("champion", 1), ("all", len(MODELS))):
        scored = outputs(rows, count, seed)
        prefix = f"benchmem{kind}{seed}"
        store = OnlineStore(client, prefix)
        used, seconds = measure(client, lambda s=store, o=scored: write_compact(s, keys, o))
        results.append(
            {"topology": topology, "models": kind, "layout": "compact-1",
             "bytes/row": used / rows, "seconds": seconds, "target": TARGETS[kind]}
        )  # fmt: skip
        if legacy and topology == "one Redis":
            used, seconds = measure(
                client, lambda p=prefix, o=scored: write_first_layout(client, p, keys, o)
            )
            results.append(
                {"topology": topology, "models": kind, "layout": "json (first)",
                 "bytes/row": used / rows, "seconds": seconds, "target": None}
            )  # fmt: skip
    client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cluster-url", help="plain URL of one node of an idle Redis Cluster")
    parser.add_argument("--no-first-layout", action="store_true", help="skip the JSON layout")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed (a private instance is measured)")
    url, process, folder = private_redis()
    try:
        results = run(url, "one Redis", args.rows, args.seed, not args.no_first_layout)
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    if args.cluster_url:
        results += run(args.cluster_url, "cluster", args.rows, args.seed, False)
    print(f"Redis memory per row, {args.rows:,} rows (INFO used_memory after - before)")
    print(f"{'topology':<10} {'models':<9} {'layout':<13} {'bytes/row':>9} {'write s':>8}  target")
    for r in results:
        verdict = (
            ""
            if r["target"] is None
            else (f"<= {r['target']} {'met' if r['bytes/row'] <= r['target'] else 'MISSED'}")
        )
        print(
            f"{r['topology']:<10} {r['models']:<9} {r['layout']:<13} {r['bytes/row']:>9.1f} "
            f"{r['seconds']:>8.2f}  {verdict}"
        )


if __name__ == "__main__":
    main()

"""Benchmark: a large lookup, and what another client sees meanwhile; the cost of checking
a version's rows before the switch.

    BATCHSCORE_REDIS_URL=redis://127.0.0.1:6379/13 python benchmarks/bench_lookup.py
    python benchmarks/bench_lookup.py --redis-url redis://127.0.0.1:6379/13 --rows 100000 \
        --repeat 5 --verify-keys 1000000
    python benchmarks/bench_lookup.py --redis-url redis://127.0.0.1:7000   # a cluster node

What runs (under a prefix of its own, deleted at the end; nothing else is touched):

* `--rows` rows of one published version in the compact layout (one model's scores).
* A lookup of all of them with `OnlineStore.get_many` (the pointer and the version's
  constants, then one pipeline of short scripts of 1,000 rows on one Redis, or of HMGETs,
  one per bucket, split by node, on a cluster),
  `--repeat` times; medians.
* Meanwhile a prober in another process (no GIL shared with the lookup) GETs the pointer
  in a loop on its own connection: its worst and 99th-percentile latency during each lookup.
* A version of `--verify-keys` rows in `--shards` shards: the sampled HEXISTS check that
  `publish` runs (`OnlineStore.verify`) against an exact count of the version's rows
  (HLEN of every bucket), the alternative that needs no sample.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.batch.predictions import LoadedModel
from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.store import OnlineStore
from batchscore.versions import new_version


def _client(url: str):
    return connect(Settings(_env_file=None, redis_url=url))


def probe(url: str, key: str, ready: Any, stop: Any, results: Any) -> None:
    """GET `key` in a loop until `stop`: every round trip's latency."""
    client = _client(url)
    client.get(key)
    latencies: list[float] = []
    ready.set()
    while not stop.is_set():
        began = time.perf_counter()
        client.get(key)
        latencies.append(time.perf_counter() - began)
    results.put(latencies)


def publish_rows(store: OnlineStore, rows: int, shards: int) -> tuple[str, list[str]]:
    version = new_version(f"bench-{rows}")
    store.stage(version, {"model": "svc", "classes": ["benign", "malignant"], "key_scheme": "id",
                          "id_column": "id"})  # fmt: skip
    keys = pc.cast(pa.array(np.arange(rows)), pa.string())
    proba = np.random.default_rng(0).random(rows)
    model = LoadedModel("svc", None, "0123456789ab" * 5 + "cdef", 0.5)
    bounds = np.linspace(0, rows, shards + 1, dtype=int)
    for shard in range(shards):
        part = slice(int(bounds[shard]), int(bounds[shard + 1]))
        outputs = [(model, (proba[part] >= 0.5).astype(int), proba[part])]
        store.write(version, shard, keys.slice(part.start, part.stop - part.start), outputs)
    assert store.publish(version, rows, shards)
    return version, keys.to_pylist()


def rows_stored(store: OnlineStore, version: str) -> int:
    """The exact row count: HLEN of every bucket of the version."""
    layout = store.layout(version)
    pipe = store.client.pipeline(transaction=False)
    for bucket in range(layout.buckets):
        pipe.hlen(f"{layout.rows}{bucket}")
    return sum(pipe.execute())


def timed_lookup(read: Any, url: str, probe_key: str) -> tuple[float, float, float]:
    """Seconds for `read()`, and the prober's worst and p99 GET latency meanwhile (ms)."""
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    prober = context.Process(target=probe, args=(url, probe_key, ready, stop, results))
    prober.start()
    ready.wait(timeout=60)  # connected and probing before the lookup starts
    began = time.perf_counter()
    read()
    seconds = time.perf_counter() - began
    stop.set()
    latencies = results.get(timeout=60)
    prober.join()
    ms = np.asarray(latencies) * 1000
    return seconds, float(ms.max()), float(np.percentile(ms, 99))


def delete_prefix(store: OnlineStore) -> None:
    for version in store.manifests():
        store.client.delete(store.pointer)
        store.discard(version)
    store.client.delete(store.pointer, store.sequence, store.versions, store.staged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("BATCHSCORE_REDIS_URL"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--verify-keys", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args()
    if not args.redis_url:
        parser.error("give --redis-url or set BATCHSCORE_REDIS_URL (a db you may write to)")
    client = _client(args.redis_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    store = OnlineStore(client, prefix)
    try:
        version, keys = publish_rows(store, args.rows, 1)
        ways = {
            "idle: no lookup (the machine's noise)": lambda: time.sleep(0.25),
            "get_many: pipelined read slices": lambda: store.get_many(keys),
        }
        measured: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
        for _ in range(args.repeat):  # paired: both ways in each repeat
            for way, read in ways.items():
                measured[way].append(timed_lookup(read, args.redis_url, store.pointer))
        print(f"\nlookup of {args.rows:,} keys, medians of {args.repeat} paired repeats")
        print(f"{'way':40} {'lookup s':>9} {'other GET worst ms':>19} {'p99 ms':>7}")
        for way, runs in measured.items():
            seconds, worst, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{way:40} {seconds:9.3f} {worst:19.2f} {p99:7.2f}")
        delete_prefix(store)

        version, _ = publish_rows(store, args.verify_keys, args.shards)
        samples, counts = [], []
        for _ in range(args.repeat):
            began = time.perf_counter()
            checked = store.verify(version)
            samples.append(time.perf_counter() - began)
            began = time.perf_counter()
            counted = rows_stored(store, version)
            counts.append(time.perf_counter() - began)
        print(
            f"\nchecking a {args.verify_keys:,}-row version ({args.shards} shards) before the "
            f"switch, medians of {args.repeat}"
        )
        print(f"  sampled HEXISTS ({checked:,} keys): {statistics.median(samples):.3f} s")
        print(f"  exact count by HLEN ({counted:,} rows): {statistics.median(counts):.3f} s")
    finally:
        delete_prefix(store)


if __name__ == "__main__":
    main()

"""Benchmark: a large lookup, and what another client sees meanwhile; the cost of checking
a version's keys before the switch.

    BATCHSCORE_REDIS_URL=redis://127.0.0.1:6379/13 python benchmarks/bench_lookup.py
    python benchmarks/bench_lookup.py --redis-url redis://127.0.0.1:6379/13 --rows 100000 \
        --repeat 5 --verify-keys 1000000

What runs (under a prefix of its own, deleted at the end; nothing else is touched):

* `--rows` keys of one published version, values shaped like the flow's (~110 bytes).
* A lookup of all of them with `OnlineStore.get_many` (the pointer, then MGETs of
  `READ_SLICE` keys) and, paired in the same repeat, the previous way: one Lua script
  reading the pointer and every key (`--repeat` times each; medians).
* Meanwhile a prober in another process (no GIL shared with the lookup) GETs one key in
  a loop on its own connection: its worst and 99th-percentile latency during each lookup.
* A version of `--verify-keys` keys in `--shards` shards: the sampled EXISTS check that
  `publish` runs (`OnlineStore.verify`) against an exact count of the version's keys by
  SCAN, the alternative that needs no sample.
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
import redis

import batchscore.online.store as online_module
from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.store import READ_SLICE, OnlineStore
from batchscore.versions import new_version

# The lookup before this change: every key in one script, Redis busy for all of it.
_ONE_SCRIPT = """
local version = redis.call('GET', KEYS[1])
if not version then return {false} end
local values = {version}
local base = ARGV[1] .. ':' .. version .. ':'
for first = 2, #ARGV, 1000 do
  local names = {}
  for i = first, math.min(first + 999, #ARGV) do names[#names + 1] = base .. ARGV[i] end
  local found = redis.call('MGET', unpack(names))
  for i = 1, #found do values[#values + 1] = found[i] end
end
return values
"""


def probe(url: str, key: str, ready: Any, stop: Any, results: Any) -> None:
    """GET `key` in a loop until `stop`: every round trip's latency."""
    client = redis.Redis.from_url(url)
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
    store.stage(version, {"model": "bench"})
    keys = pc.cast(pa.array(np.arange(rows)), pa.string())
    value = '{"label":1,"class":"malignant","proba":0.981234,"threshold":0.5,"model":"svc","model_version":"0123456789ab"}'  # noqa: E501
    values = pa.array([value] * rows, pa.string())
    bounds = np.linspace(0, rows, shards + 1, dtype=int)
    for shard in range(shards):
        first, last = int(bounds[shard]), int(bounds[shard + 1])
        store.write(
            version, shard, keys.slice(first, last - first), values.slice(first, last - first)
        )
    assert store.publish(version, rows, shards)
    return version, keys.to_pylist()


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


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    names = list(client.scan_iter(match=f"{prefix}:*", count=5_000))
    for first in range(0, len(names), 5_000):
        client.unlink(*names[first : first + 5_000])


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
    client = connect(Settings(_env_file=None, redis_url=args.redis_url))
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    store = OnlineStore(client, prefix)
    try:
        version, keys = publish_rows(store, args.rows, 1)
        probe_key = store.key(version, keys[0])
        one_script = client.register_script(_ONE_SCRIPT)

        def sliced(size: int):
            def read() -> None:
                online_module.READ_SLICE = size
                try:
                    store.get_many(keys)
                finally:
                    online_module.READ_SLICE = READ_SLICE

            return read

        ways = {
            "idle: no lookup (the machine's noise)": lambda: time.sleep(0.25),
            f"get_many, MGET slices of {READ_SLICE:,}": sliced(READ_SLICE),
            "get_many, MGET slices of 500": sliced(500),
            "get_many, MGET slices of 250": sliced(250),
            "before: one Lua script over every key": lambda: one_script(
                keys=[store.pointer], args=[prefix, *keys]
            ),
        }
        measured: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
        for _ in range(args.repeat):  # paired: both ways in each repeat
            for way, read in ways.items():
                measured[way].append(timed_lookup(read, args.redis_url, probe_key))
        print(f"\nlookup of {args.rows:,} keys, medians of {args.repeat} paired repeats")
        print(f"{'way':40} {'lookup s':>9} {'other GET worst ms':>19} {'p99 ms':>7}")
        for way, runs in measured.items():
            seconds, worst, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{way:40} {seconds:9.3f} {worst:19.2f} {p99:7.2f}")
        delete_prefix(client, prefix)

        version, _ = publish_rows(store, args.verify_keys, args.shards)
        samples, scans = [], []
        for _ in range(args.repeat):
            began = time.perf_counter()
            checked = store.verify(version)
            samples.append(time.perf_counter() - began)
            began = time.perf_counter()
            counted = sum(1 for _ in client.scan_iter(match=f"{prefix}:{version}:*", count=5_000))
            scans.append(time.perf_counter() - began)
        size = client.dbsize()
        print(
            f"\nchecking a {args.verify_keys:,}-key version ({args.shards} shards) before the "
            f"switch, db of {size:,} keys, medians of {args.repeat}"
        )
        print(f"  sampled EXISTS ({checked:,} keys): {statistics.median(samples):.3f} s")
        print(f"  exact count by SCAN ({counted:,} keys): {statistics.median(scans):.3f} s")
    finally:
        delete_prefix(client, prefix)


if __name__ == "__main__":
    main()

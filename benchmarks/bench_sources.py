"""Range reads of an `s3://` input: the project's reader against `pyarrow.fs`.

    python benchmarks/bench_sources.py                  # 200 MB object, median of 5
    python benchmarks/bench_sources.py --mb 64 --repeat 3

Issue 19 asks for a maintained library unless a measurement says otherwise. Against moto's
S3 server (a separate process on a free local port), the same object is read sequentially
in 8 MiB reads, and its last 1 MiB (a Parquet footer's place) is read 200 times, through:

* `storage.sources.open_source` (boto3 `get_object` with a `Range`, behind a 256 KiB
  `BufferedReader`): what every scoring task uses;
* `pyarrow.fs.S3FileSystem(endpoint_override=..., scheme="http")`'s input file.

Printed: MB/s, milliseconds per small read, and each path's import time in a fresh process
(each Metaflow task pays it).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import boto3

READ = 8 << 20
TAIL = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3)]  # fmt: skip
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}  # fmt: skip
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        size = args.mb << 20
        s3.put_object(Bucket="bench", Key="rows.csv", Body=os.urandom(size))
        results = {name: {"seq": [], "tail": []} for name in ("batchscore", "pyarrow.fs")}
        for _ in range(args.repeat):
            for name, opener in (("batchscore", _ours), ("pyarrow.fs", _arrow)):
                handle = opener(endpoint, size)
                started = time.perf_counter()
                total = 0
                while chunk := handle.read(READ):
                    total += len(chunk)
                assert total == size, (name, total)
                results[name]["seq"].append(size / 2**20 / (time.perf_counter() - started))
                started = time.perf_counter()
                for _ in range(200):
                    handle.seek(size - TAIL)
                    assert len(handle.read(TAIL)) == TAIL
                results[name]["tail"].append((time.perf_counter() - started) / 200 * 1e3)
                handle.close()
    finally:
        server.terminate()
        server.wait()
    imports = {
        "batchscore": _import_seconds("import batchscore.storage.sources, boto3; boto3.client"),
        "pyarrow.fs": _import_seconds("import pyarrow.fs"),
    }
    print(f"\n**{args.mb} MB object on moto's S3 server, median of {args.repeat}**\n")
    print("| reader | sequential MB/s (8 MiB reads) | ms per 1 MiB read at the end | import s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {statistics.median(r['seq']):,.0f} | "
              f"{statistics.median(r['tail']):.1f} | {imports[name]:.2f} |")  # fmt: skip
    ours, arrow = (statistics.median(results[n]["seq"]) for n in results)
    print(f"\nbatchscore / pyarrow.fs, sequential throughput: {ours / arrow:.2f}x")


def _ours(endpoint: str, size: int):
    from batchscore.config import Settings
    from batchscore.storage.sources import SourceFile, open_source

    settings = Settings(_env_file=None, store_url="s3://bench/store", redis_url="unused")
    return open_source(SourceFile("s3://bench/rows.csv", size), settings)


def _arrow(endpoint: str, size: int):
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1",
        access_key="bench", secret_key="bench",
    )  # fmt: skip
    return s3.open_input_file("bench/rows.csv")


if __name__ == "__main__":
    main()

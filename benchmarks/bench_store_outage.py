"""The object store lost in the middle of a batch run: how long until the run gives up?

    python benchmarks/bench_store_outage.py                 # defaults vs .env.example's bounds
    python benchmarks/bench_store_outage.py --limit 900     # wait longer for the defaults

Once: a moto S3 server (standing in for MinIO) holding both the batchscore store and
Metaflow's datastore, and TrainModelsFlow `--cv_folds 2` recorded in SQLite (embedded Redis).
Then, per configuration, BatchProcessingFlow runs through a TCP proxy in front of that server,
and the proxy is closed (connections dropped, new ones refused: the server is gone) as soon
as the first `batch_processing` task starts. Printed: the seconds from the outage to the
launcher's exit (or `> limit` when it is still waiting), and the launcher's lines naming the
store. Configurations:

* **Metaflow defaults**: no `METAFLOW_S3_*` setting. Each datastore write retries 20 times
  with exponential backoff capped at 6 minutes (`S3_TRANSIENT_RETRY_COUNT`), each try with
  botocore's 10 adaptive attempts (`S3_CLIENT_RETRY_CONFIG`): the run waits for hours.
* **.env.example**: the four `METAFLOW_S3_*` / `METAFLOW_DATATOOLS_CLIENT_PARAMS` values that
  `.env.example` and docker-compose.yaml set (read here from `.env.example` itself).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tcp_proxy import TcpProxy  # noqa: E402  (the tests' proxy: cut it, never the server)

BOUNDS = (
    "METAFLOW_S3_RETRY_COUNT",
    "METAFLOW_S3_TRANSIENT_RETRY_COUNT",
    "METAFLOW_S3_CLIENT_RETRY_CONFIG",
    "METAFLOW_DATATOOLS_CLIENT_PARAMS",
)
_STARTED = re.compile(r"\[[^/]+/batch_processing/\d+ \(pid \d+\)\] Task is starting")


def bounds_from_env_example() -> dict[str, str]:
    """The bounds exactly as `.env.example` writes them (the file users copy to `.env`)."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        name, _, value = line.partition("=")
        if name in BOUNDS:
            found[name] = value.strip("'")  # quoted for a shell's `. ./.env`
    missing = set(BOUNDS) - set(found)
    if missing:
        raise SystemExit(f".env.example does not set {sorted(missing)}")
    return found


def start_moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto's S3 server did not start")


def environment(work: Path, endpoint: str, buckets: tuple[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHSCORE_", "METAFLOW_", "AWS_"))
    }
    env.update(
        {
            "BATCHSCORE_HOME": str(work / "home"),
            "BATCHSCORE_STORE_URL": f"s3://{buckets[0]}",
            "BATCHSCORE_DATABASE_URL": f"sqlite:///{work / 'metrics.db'}",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "METAFLOW_USER": "bench",
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{buckets[1]}/metaflow",
            "METAFLOW_S3_ENDPOINT_URL": endpoint,
            "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work / "metaflow"),
            "PYTHONWARNINGS": "ignore::FutureWarning",
        }
    )
    return env


def outage(env: dict[str, str], proxy: TcpProxy, work: Path, limit: float) -> tuple[str, list[str]]:
    """Run the batch flow, close the proxy when a shard task starts; (seconds, store lines)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "metaflow" / "batch_processing.py"), "run"],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    cut_at: list[float] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip())
            if not cut_at and _STARTED.search(line):
                proxy.close()
                cut_at.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    while process.poll() is None:  # at most `limit` after the cut (15 minutes before it)
        waited = time.monotonic() - (cut_at[0] if cut_at else started)
        if waited > (limit if cut_at else 900):
            break
        time.sleep(0.5)
    if process.poll() is None:
        process.kill()
        process.wait()
        waited = f"> {limit:.0f}"
    else:
        waited = f"{time.monotonic() - cut_at[0]:.0f}" if cut_at else "no cut"
    reader.join(timeout=5)
    # The steps' hint names a variable; Metaflow's own line names the object and endpoint.
    hints = [line for line in lines if "AWS_ENDPOINT_URL_S3 (" in line or "STORE_URL (" in line]
    metaflow = [line for line in lines if "Error: Could not connect" in line]
    return waited, hints[:1] + metaflow[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=300, help="seconds to wait after the cut")
    parser.add_argument(
        "--skip-defaults", action="store_true", help="only .env.example's bounds (minutes less)"
    )
    args = parser.parse_args()
    import boto3

    server, port = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-outage-") as folder:
            work = Path(folder)
            buckets = ("batch", "metaflow")
            client = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{port}",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
            direct = environment(work, f"http://127.0.0.1:{port}", buckets)
            trained = subprocess.run(
                [sys.executable, str(ROOT / "metaflow" / "train_models.py"), "run"]
                + ["--cv_folds", "2"],
                env=direct,
                cwd=work,
                capture_output=True,
                text=True,
            )
            if trained.returncode:
                raise SystemExit(trained.stdout[-3000:] + trained.stderr[-3000:])
            rows = []
            configurations = [("Metaflow defaults", {}), (".env.example", None)]
            for name, bounds in configurations[args.skip_defaults :]:
                proxy = TcpProxy("127.0.0.1", port)
                env = environment(work, proxy.url("http"), buckets)
                env.update(bounds_from_env_example() if bounds is None else bounds)
                waited, named = outage(env, proxy, work, args.limit)
                rows.append((name, waited, " / ".join(n.split("] ")[-1][:120] for n in named)))
    finally:
        server.kill()
        server.wait()
    print("| configuration | seconds from the outage to the exit | lines naming the store |")
    print("|---|---|---|")
    for name, waited, line in rows:
        print(f"| {name} | {waited} | {line or '-'} |")


if __name__ == "__main__":
    main()

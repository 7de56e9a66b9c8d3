"""`python -m batchscore ...`: look predictions up and check what is live, without Jupyter.

python -m batchscore status
python -m batchscore lookup 3f2a...            # one or more row keys
python -m batchscore lookup --csv rows.csv     # raw feature rows: keys computed here
python -m batchscore lookup --sample 5         # the first rows of the live version's input
python -m batchscore history                   # versions: status, rows, drift, gate
python -m batchscore rollback                  # readers back to the previous version
python -m batchscore promote VERSION           # publish a batch the gate blocked
python -m batchscore stop-embedded             # stop the embedded Redis server
python -m batchscore serve --port 8000          # the HTTP prediction service (batchscore.service)
"""

from __future__ import annotations

import argparse
import json
import math
import re
from datetime import UTC, datetime

from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchscore.config import Settings
from batchscore.online.embedded_redis import stop_server
from batchscore.online.errors import PublishError
from batchscore.online.store import OnlineStore
from batchscore.orchestration.preflight import redis_error
from batchscore.rows.errors import InputError
from batchscore.storage.tables import iter_frames
from batchscore.storage.tracking import TrackingError

ROW_KEY = re.compile(r"[0-9a-f]{64}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchscore", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="the live prediction-set version, its size, model and age")
    lookup = commands.add_parser("lookup", help="predictions by row key or from raw feature rows")
    lookup.add_argument("keys", nargs="*", help="row keys (hex SHA-256, or ids)")
    lookup.add_argument("--csv", help="CSV/Parquet path or URL of raw feature rows")
    lookup.add_argument("--limit", type=int, default=0, help="only the first N rows of --csv")
    lookup.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="the first N rows of the table the live version was scored from",
    )
    history = commands.add_parser("history", help="batch runs and their versions, newest first")
    history.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    commands.add_parser("rollback", help="switch readers back to the previous published version")
    promote = commands.add_parser("promote", help="publish a staged version the gate blocked")
    promote.add_argument("version", help="the version, as `history` lists it")
    commands.add_parser("stop-embedded", help="stop the embedded Redis server, if running")
    _add_serve(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    console = Console(width=140)
    if args.command == "serve":
        return _serve(args)
    try:
        if args.command == "stop-embedded":
            stopped = stop_server(settings.embedded_redis_path)
            console.print("embedded Redis stopped" if stopped else "embedded Redis was not running")
            return 0
        if args.command in ("history", "rollback", "promote"):
            return _operate(args, settings, console)
        online = OnlineStore.from_settings(settings)
        if args.command == "status":
            return _status(online, console)
        return _lookup(online, args, settings, console)
    except (InputError, LookupError, PublishError, TrackingError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    except RedisError as exc:
        # Name the setting to fix, password masked: BATCHSCORE_REDIS_URL (...): connection refused
        console.print(f"[red]error:[/red] {escape(redis_error(settings, exc))}", highlight=False)
        return 2


def _operate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    from batchscore import operations

    if args.command == "rollback":
        previous, restored = operations.rollback(settings)
        console.print(f"readers switched from {previous} back to {restored}")
        return 0
    if args.command == "promote":
        retired = operations.promote(args.version, settings)
        console.print(f"{args.version} is live" + (f"; retired {retired}" if retired else ""))
        return 0
    rows = operations.history(settings, args.limit)
    if not rows:
        console.print("no batch run recorded yet: run metaflow/batch_processing.py")
        return 1
    table = Table(title="batch runs, newest first")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    return 0


def _status(online: OnlineStore, console: Console) -> int:
    status = online.status()
    if status["current"] is None:
        console.print("no prediction set published yet: run metaflow/batch_processing.py")
        return 1
    if math.isnan(status["published_at"]):  # its manifest (and keys) outlived their TTL
        console.print(
            f"the live prediction set {status['current']} has expired (ttl_days): "
            "run metaflow/batch_processing.py again"
        )
        return 1
    table = Table(title="live prediction set", show_header=False)
    published = datetime.fromtimestamp(status.pop("published_at"), UTC)
    status["published_at"] = published.isoformat(timespec="seconds")
    status["age"] = f"{status.pop('age_seconds') / 3600:.1f} h"
    for key, value in status.items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


def _lookup(
    online: OnlineStore, args: argparse.Namespace, settings: Settings, console: Console
) -> int:
    if args.sample:
        args.csv = online.status().get("input")
        args.limit = args.sample
        if not args.csv:
            raise LookupError("no published version to sample from")
    if bool(args.keys) == bool(args.csv):
        raise InputError("give row keys, --csv or --sample: exactly one of them")
    keys = list(args.keys)
    if args.csv:
        # Rows are keyed as the live version keyed them (its manifest says how), with the
        # batch flow's own checks: a missing column or a bad cell is named.
        version = online.current()
        _, id_column = online.key_scheme(version)
        columns = [] if id_column else online.feature_columns(version)
        text = [id_column] if id_column else []
        rows = 0
        for frame in iter_frames(args.csv, settings, numeric_columns=columns, text_columns=text):
            keys += online.keys_for(frame, version, columns, args.csv, rows + 1)
            rows += len(frame)
            if args.limit and len(keys) >= args.limit:
                keys = keys[: args.limit]
                break
    predictions = online.get_many(keys)
    version = online.current()
    table = Table(title=f"predictions ({version})")
    positive = _positive_class(online, version)
    proba = f"proba ({positive})" if positive else "proba (positive class)"
    for column in ("row key", "label", "class", proba, "model"):
        table.add_column(column)
    for key, prediction in zip(keys, predictions, strict=True):
        if prediction is None:
            table.add_row(key, "-", "not found", "-", "-")
        else:
            table.add_row(
                key,
                str(prediction["label"]),
                prediction["class"],
                f"{prediction['proba']:.4f}",
                prediction["model"],
            )
    console.print(table)
    found = sum(p is not None for p in predictions)
    console.print(f"{found} of {len(keys)} found")
    malformed = [
        k for k, p in zip(keys, predictions, strict=True) if p is None and not ROW_KEY.fullmatch(k)
    ]
    # Keys of a feature-hash version are SHA-256 hex; an id-keyed version takes any id.
    if malformed and not args.csv and version and online.key_scheme(version)[0] != "id":
        console.print(
            f"{', '.join(malformed[:3])}: row keys are 64 hex characters (the SHA-256 of a "
            "row's feature values); to look rows up from their values use --csv",
            highlight=False,
        )
    return 0 if found == len(keys) else 1


def _positive_class(online: OnlineStore, version: str | None) -> str | None:
    """The class `proba` is the probability of: label 1, the second of the version's classes."""
    classes = online.manifest_field(version, "classes")
    try:
        return str(json.loads(classes)[1]) if classes else None
    except (ValueError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------- serve


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="the HTTP prediction service (see /docs)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--access-log", action="store_true", help="log every request")


def _serve(args: argparse.Namespace) -> int:
    """Run the service under uvicorn; with several workers, their metrics are merged."""
    import os
    import tempfile

    import uvicorn

    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its counters here; /metrics adds them up (prometheus_client).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="batchscore-metrics-")
    uvicorn.run(
        "batchscore.service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        server_header=False,
    )
    return 0

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

`status`, `history` and `lookup` take `--json`: one JSON document on stdout, for scripts.
Tables never wrap a version or a row key, so either can be copied or found with grep.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

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
    status = commands.add_parser(
        "status", help="the live prediction-set version, its size, model and age"
    )
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
    for command in (status, lookup, history):
        command.add_argument(
            "--json", action="store_true", help="print one JSON document (for scripts)"
        )
    commands.add_parser("rollback", help="switch readers back to the previous published version")
    promote = commands.add_parser("promote", help="publish a staged version the gate blocked")
    promote.add_argument("version", help="the version, as `history` lists it")
    commands.add_parser("stop-embedded", help="stop the embedded Redis server, if running")
    _add_serve(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    # Messages are never folded at the terminal's width: a path or a URL stays one line.
    console = Console(soft_wrap=True)
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
            return _status(online, console, args.json)
        return _lookup(online, args, settings, console)
    except (InputError, LookupError, PublishError, TrackingError) as exc:
        return _error(console, str(exc), getattr(args, "json", False))
    except RedisError as exc:
        # Name the setting to fix, password masked: BATCHSCORE_REDIS_URL (...): connection refused
        return _error(console, redis_error(settings, exc), getattr(args, "json", False))


def _error(console: Console, message: str, as_json: bool) -> int:
    """Exit code 2; with --json the error is JSON too, so stdout always parses."""
    if as_json:
        _print_json({"error": message})
    else:
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 2


def _print_json(document: Any) -> None:
    """One JSON document on stdout (not through rich: no markup, colour or wrapping)."""
    print(json.dumps(document, indent=2, default=str))


def _print_table(console: Console, table: Table) -> None:
    """The table with its version and key columns (`no_wrap`) on one line, always.

    Into a pipe or a file every row is one line whatever its length (grep, copy); on a
    terminal the table is at least as wide as those columns need, other cells may fold.
    """
    natural = console.measure(table, options=console.options.update_width(1 << 16))
    width = max(console.width, natural.minimum) if console.is_terminal else natural.maximum
    # `print(width=...)` can only narrow: a wider table needs a console of its width.
    wide = Console(file=console.file, width=width) if width > console.width else console
    wide.print(table, soft_wrap=False)


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
    if args.json:
        _print_json(rows)
        return 0 if rows else 1
    if not rows:
        console.print("no batch run recorded yet: run metaflow/batch_processing.py")
        return 1
    table = Table(title="batch runs, newest first")
    for column in rows[0]:
        table.add_column(column, no_wrap=column == "version")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    _print_table(console, table)
    return 0


def _status(online: OnlineStore, console: Console, as_json: bool = False) -> int:
    status = online.status()
    if as_json:
        return _status_json(status)
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
    status["published_at"] = _iso(status.pop("published_at"))
    status["age"] = f"{status.pop('age_seconds') / 3600:.1f} h"
    for key, value in status.items():
        table.add_row(key, str(value))
    _print_table(console, table)
    return 0


def _status_json(status: dict[str, Any]) -> int:
    """The fields of `GET /v1/status` (`version` is the live one, null when none), plus
    `expired`: the live version's manifest and rows outlived their TTL. Exit 1 when no
    version can be read, as without --json."""
    version = status.pop("current")
    published = status.pop("published_at", math.nan)
    age = status.pop("age_seconds", math.nan)
    expired = version is not None and math.isnan(published)
    document = {
        "version": version,
        "expired": expired,
        "published_at": None if math.isnan(published) else _iso(published),
        "age_seconds": None if math.isnan(age) else round(age, 3),
        "model": status.pop("model", None),
        "rows": status.pop("keys", None),
        **status,
    }
    _print_json(document)
    return 0 if version is not None and not expired else 1


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _lookup(
    online: OnlineStore, args: argparse.Namespace, settings: Settings, console: Console
) -> int:
    if [bool(args.keys), bool(args.csv), bool(args.sample)].count(True) != 1:
        raise InputError("give row keys, --csv or --sample: exactly one of them")
    keys = _sample_keys(online, args.sample, settings) if args.sample else list(args.keys)
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
    version = online.current()
    predictions = online.get_many(keys, version)
    found = sum(p is not None for p in predictions)
    status = 0 if found == len(keys) else 1
    if args.json:  # the shape of the HTTP service's lookup answer, plus the count found
        _print_json({"version": version, "keys": keys, "predictions": predictions, "found": found})
        return status
    table = Table(title=f"predictions ({version})")
    positive = _positive_class(online, version)
    proba = f"proba ({positive})" if positive else "proba (positive class)"
    table.add_column("row key", no_wrap=True)
    for column in ("label", "class", proba, "model"):
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
    _print_table(console, table)
    console.print(f"{found} of {len(keys)} found")
    malformed = [
        k for k, p in zip(keys, predictions, strict=True) if p is None and not ROW_KEY.fullmatch(k)
    ]
    # Keys of a feature-hash version are SHA-256 hex; an id-keyed version takes any id.
    if malformed and args.keys and version and online.key_scheme(version)[0] != "id":
        console.print(
            f"{', '.join(malformed[:3])}: row keys are 64 hex characters (the SHA-256 of a "
            "row's feature values); to look rows up from their values use --csv",
            highlight=False,
        )
    return status


def _sample_keys(online: OnlineStore, count: int, settings: Settings) -> list[str]:
    """Keys of the first `count` rows the live version published: rows its run set aside
    (`--bad_rows quarantine`) are left out here too, instead of failing the strict check."""
    from batchscore.rows.published import read_published_rows

    version = online.current()
    source = online.manifest_field(version, "input")
    if not source:
        raise LookupError("no published version to sample from")
    _, id_column = online.key_scheme(version)
    columns = online.feature_columns(version)
    rows = read_published_rows(source, columns, settings, id_column, limit=count)
    return online.keys_for(rows, version, columns, source)


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

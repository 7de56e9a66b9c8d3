"""The HTTP prediction service: applications in any language read predictions over HTTP.

    python -m batchscore serve [--host 127.0.0.1] [--port 8000] [--workers N]

Routes (the HTTP contract in docs/architecture.md):
    GET  /v1/predictions/{row_key}    one prediction; 404 when the key is absent
    POST /v1/predictions:batchGet     {"keys": [...]}: predictions in request order, null for misses
    POST /v1/predictions:lookup       {"rows": [{feature: value}, ...]}: keys computed here
    GET  /v1/status, /healthz, /readyz, /metrics, /docs

Every answer comes from one version: `current` is read in the same pipeline as the rows,
which are named under the version the previous answer came from; when the pointer has moved,
the rows are read again under the new version. So a publish or rollback is seen by the very
next request and never mixed into an answer. On a Redis Cluster the pipeline is split by
node. A version's rows are decoded into the JSON prediction by its `Layout` (the one place
that knows the Redis layout), with its constants read once per version.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
import redis
import redis.asyncio as aredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from batchscore.config import Settings
from batchscore.online.connection import cluster_mode, connect_async
from batchscore.online.layout import FIELDS, Layout, plan_reads
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import BAD_ID_REASON, is_usable_id, row_keys
from batchscore.rows.validation import is_number
from batchscore.service.docs import mount_docs

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # keys or rows per request
MAX_BODY_BYTES = 16 * 1024 * 1024  # 10,000 rows of ~30 features take ~6 MB of JSON
MAX_KEY_CHARS = 256
MGET_SLICE = 1_000  # rows per read command: Redis is never held for a whole large request
_INLINE_ROWS = 500  # lookups up to this many rows are keyed on the event loop (~0.5 ms)
_RETRIES = 3  # re-reads when the pointer moves mid-request (a publish or rollback)


# ------------------------------------------------------------------ errors and responses


class JSONAnswer(Response):
    """orjson-encoded JSON; stored predictions are embedded as `orjson.Fragment`s."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """An answer other than 200: its status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONAnswer:
        return JSONAnswer(
            {"error": self.code, "message": self.message, **self.extra}, status_code=self.status
        )


class NoLiveVersion(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "no_live_version", "no prediction set is published yet")


class NoKeyScheme(ApiError):
    def __init__(self, version: str) -> None:
        message = f"version {version} records no feature columns or row layout"
        super().__init__(503, "no_key_scheme", message)


def _bad_row(index: int, column: str, problem: str) -> ApiError:
    return ApiError(
        422, "invalid_row", f"rows[{index}], column {column!r}: {problem}", row=index, column=column
    )


# ------------------------------------------------------------------ reading Redis


class Reader:
    """One-version reads of the online store, on the event loop (asyncio Redis client).

    Names and the rows' layout come from `OnlineStore` and `Layout`, so the layout is
    defined once. A read is one pipeline: the pointer, then the rows under the version
    the last answer came from (every row is from that version: its names say so). When
    the pointer names another version, the rows are read again under it.
    """

    def __init__(self, store: OnlineStore, client: aredis.Redis) -> None:
        self.store = store
        self.client = client
        self.cluster = cluster_mode(client)
        self._seen: str | None = None  # the version the last answer came from
        self._layouts: dict[str, Layout] = {}  # versions never change once published

    async def live_version(self) -> str:
        version = await self.client.get(self.store.pointer)
        if version is None:
            self._seen = None
            raise NoLiveVersion()
        self._seen = version.decode()
        return self._seen

    async def read(
        self, keys_for: Callable[[Layout], Awaitable[Sequence[str]]]
    ) -> tuple[str, Sequence[str], list[bytes | None]]:
        """(version, keys, JSON predictions) all from one version; `keys_for(layout)`
        gives the keys, since a version's key scheme decides them."""
        version = self._seen or await self.live_version()
        for _ in range(_RETRIES):
            try:
                layout = await self.layout(version)
                keys = await keys_for(layout)
            except NoKeyScheme:  # the version seen last may be retired by now
                if await self.live_version() == version:
                    raise
                version = self._seen
                continue
            live, values = await self._fetch(layout, keys)
            if live == version and len(keys) > MGET_SLICE and None in values:
                # The commands run one by one: a miss could be a version retired between
                # them, right after a switch. Confirm the pointer did not move.
                live = await self.live_version()
            if live is None:
                self._seen = None
                raise NoLiveVersion()
            self._seen = live
            if live == version:
                return version, keys, layout.jsons(values)
            version = live
        raise ApiError(503, "version_changing", "the live version kept changing; retry")

    async def _fetch(
        self, layout: Layout, keys: Sequence[str]
    ) -> tuple[str | None, list[bytes | None]]:
        """The pointer and the rows: on one Redis in the same command (one script) for up to
        MGET_SLICE keys, else in one pipeline (one round trip per node)."""
        pointer = None if self.cluster else self.store.pointer  # other slot on a cluster
        reads = plan_reads(layout, keys, MGET_SLICE, not self.cluster, pointer)
        if reads.carries_pointer and len(reads.commands) == 1:  # the usual request
            replies = [await self.client.execute_command(*reads.commands[0])]
            live = reads.pointer(replies)
        else:
            pipe = self.client.pipeline(transaction=False)
            if not reads.carries_pointer:
                pipe.get(self.store.pointer)
            for command in reads.commands:
                pipe.execute_command(*command)
            replies = await pipe.execute()
            if reads.carries_pointer:
                live = reads.pointer(replies)
            else:
                live, *replies = replies
        return (live.decode() if live is not None else None), reads.values(replies)

    async def layout(self, version: str) -> Layout:
        """The version's layout and constants (cached once complete: a version never
        changes); `NoKeyScheme` when its manifest is gone or records no feature columns."""
        layout = self._layouts.get(version)
        if layout is None:
            values = await self.client.hmget(self.store.manifest(version), list(FIELDS))
            layout = self.store.layout_of(version, values)
            if layout is None or (layout.compact and not layout.models):
                raise NoKeyScheme(version)
            if len(self._layouts) > 64:  # versions come and go: keep the cache small
                self._layouts.clear()
            self._layouts[version] = layout
        return layout


# ------------------------------------------------------------------ request bodies


async def _json_body(request: Request) -> Any:
    """The request's JSON, with the body size bounded before and while it is read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:  # NaN, Infinity, 1e999: not JSON, but common; refused later by row and column
            return json.loads(body)
        except (ValueError, RecursionError):
            message = f"the body is not valid JSON: {exc}"
            raise ApiError(400, "malformed_json", message) from None


def _too_large() -> ApiError:
    return ApiError(
        413, "body_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
    )


def _items(body: Any, field: str) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get(field), list):
        shape = f'{{"{field}": [...]}}'
        raise ApiError(422, "invalid_body", f"the body must be a JSON object {shape}")
    items = body[field]
    if not items:
        raise ApiError(422, "invalid_body", f"{field!r} is empty")
    if len(items) > MAX_BATCH:
        raise ApiError(
            422, "batch_too_large", f"at most {MAX_BATCH} {field} per request, got {len(items)}"
        )
    return items


def _check_key(key: Any, where: str) -> str:
    """A requested key: text of bounded length that obeys the id rule (a feature-hash key,
    64 hex digits, always does), so no key the batch can publish is refused here."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise ApiError(
            422, "invalid_key", f"{where}: a row key is text of 1 to {MAX_KEY_CHARS} characters"
        )
    if not is_usable_id(key):
        raise ApiError(422, "invalid_key", f"{where}: {key!r}: {BAD_ID_REASON}")
    return key


def _feature_keys(rows: list[Any], columns: list[str]) -> list[str]:
    """Row keys by the row-key contract; the first bad cell is named by row and column.
    Checked column-wise in bulk (types as a set, finiteness by numpy): the usual, clean
    request pays ~0.1 ms per 100 rows; only a bad one is searched cell by cell."""
    matrix = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ApiError(
                422, "invalid_row", f"rows[{index}] is not an object", row=index, column=None
            )
        try:
            matrix.append([row[c] for c in columns])
        except KeyError:
            missing = next(c for c in columns if c not in row)
            raise _bad_row(index, missing, "missing") from None
    if not {type(value) for values in matrix for value in values} <= {float, int}:
        for index, values in enumerate(matrix):  # the batch's row rule: a bool is 1 or 0
            for column, value in zip(columns, values, strict=True):
                if not is_number(value):
                    raise _bad_row(index, column, f"{value!r} is not a number")
    try:
        array = np.array(matrix, dtype="float64")
    except OverflowError:  # an integer beyond float64's range
        array = np.array([[_as_float(v) for v in values] for values in matrix])
    if not np.isfinite(array).all():
        index, at = (int(i[0]) for i in np.nonzero(~np.isfinite(array)))
        text = repr(matrix[index][at])
        text = text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
        raise _bad_row(index, columns[at], f"{text} cannot be keyed (NaN or infinite)")
    return row_keys(array)


def _as_float(value: float | int) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _id_keys(rows: list[Any], column: str) -> list[str]:
    """Ids as keys, by the batch flow's id rule (`rows.keys`): an id the batch published is
    reachable here. JSON integers are ids as text; other non-text values are refused."""
    keys = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ApiError(
                422, "invalid_row", f"rows[{index}] is not an object", row=index, column=None
            )
        if column not in row:
            raise _bad_row(index, column, "missing (this version keys rows by this id column)")
        value = row[column]
        if type(value) is int:
            value = str(value)
        if not isinstance(value, str) or not is_usable_id(value):
            raise _bad_row(index, column, f"{value!r} is not a usable id: {BAD_ID_REASON}")
        keys.append(value)
    return keys


# ------------------------------------------------------------------ metrics


_METRICS = CollectorRegistry()  # in-process; with several workers, see metrics_registry()
REQUESTS = Histogram(
    "batchscore_http_request_duration_seconds",
    "HTTP request latency by route, method and status (its _count: requests)",
    ["route", "method", "status"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=_METRICS,
)
LOOKUP_KEYS = Counter(
    "batchscore_lookup_keys",
    "Keys looked up, by result (hit or miss)",
    ["result"],
    registry=_METRICS,
)


class LiveVersionCollector:
    """Read at scrape time from Redis: the live version's age and whether Redis answers."""

    def __init__(self, store: OnlineStore) -> None:
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("batchscore_redis_up", "1 when Redis answered this scrape")
        age = GaugeMetricFamily(
            "batchscore_live_version_age_seconds", "Seconds since the live version was published"
        )
        info = GaugeMetricFamily(
            "batchscore_live_version", "The live prediction-set version", labels=["version"]
        )
        try:
            version = self.store.current()
            published = self.store.manifest_field(version, "published_at")
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        if version is not None:
            info.add_metric([version], 1)
            yield info
            if published is not None:
                age.add_metric([], time.time() - float(published))
                yield age


def metrics_registry(store: OnlineStore) -> CollectorRegistry:
    """What /metrics exposes: this process's metrics, or every worker's when
    PROMETHEUS_MULTIPROC_DIR is set (`serve --workers N` sets it), plus the live version."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_METRICS_VIEW)
    registry.register(LiveVersionCollector(store))
    return registry


class _View:
    """Exposes `_METRICS` inside another registry (a registry cannot be registered)."""

    def collect(self):
        return _METRICS.collect()


_METRICS_VIEW = _View()


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task): latency and count by route template."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            REQUESTS.labels(
                getattr(route, "path", "unmatched"), scope["method"], str(status)
            ).observe(time.perf_counter() - start)


class InternalErrorMiddleware:
    """An unexpected error becomes a JSON 500 and the connection stays open (Starlette's
    own handler answers, then re-raises, and the server drops the keep-alive connection).
    The stack trace goes to the log, never to the client."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:  # too late for a clean answer: let the server close the connection
                raise
            await ApiError(500, "internal", "internal error").response()(scope, receive, send)


# ------------------------------------------------------------------ the app


class BatchGetRequest(BaseModel):
    keys: list[str] = Field(max_length=MAX_BATCH, examples=[["ccb8603827b81009bc42827e1d23a34"]])


class LookupRequest(BaseModel):
    rows: list[dict[str, float | str]] = Field(
        max_length=MAX_BATCH, examples=[[{"mean radius": 17.99, "mean texture": 10.38}]]
    )


class PredictionAnswer(BaseModel):
    version: str
    key: str
    prediction: dict[str, Any]


class BatchAnswer(BaseModel):
    version: str
    predictions: list[dict[str, Any] | None]


class LookupAnswer(BatchAnswer):
    keys: list[str]


class ErrorAnswer(BaseModel):
    error: str
    message: str


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (orjson, own limits and errors)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorAnswer} for status in statuses}


def _unavailable(exc: RedisError) -> ApiError:
    reason = "timed out" if isinstance(exc, redis.TimeoutError) else "unreachable"
    if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        reason = f"error ({type(exc).__name__})"
    return ApiError(503, "redis_unavailable", f"Redis {reason}")


async def _constant(keys: Sequence[str]) -> Sequence[str]:
    return keys


def _fragment(value: bytes | None) -> orjson.Fragment | None:
    """A prediction's JSON text, embedded in the answer as it is."""
    return orjson.Fragment(value) if value is not None else None


def _count(values: list[bytes | None]) -> None:
    misses = values.count(None)
    if misses:
        LOOKUP_KEYS.labels("miss").inc(misses)
    if len(values) > misses:
        LOOKUP_KEYS.labels("hit").inc(len(values) - misses)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app (a factory: uvicorn's workers each build their own)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = await run_in_threadpool(OnlineStore.from_settings, settings, "service")
        async_client = connect_async(settings, "service")
        app.state.reader = Reader(store, async_client)
        app.state.metrics = metrics_registry(store)
        # Everything loaded so far (FastAPI, pandas, pyarrow: ~100k objects) lives as long as
        # the process: out of the collector's sight, a full collection takes ~3 ms, not 200.
        gc.collect()
        gc.freeze()
        yield
        await async_client.aclose()
        store.close()

    app = FastAPI(
        title="batchscore predictions",
        summary="Published batch predictions, read from Redis",
        version="1",
        lifespan=lifespan,
        default_response_class=JSONAnswer,
        docs_url=None,  # FastAPI's /docs and /redoc load from a CDN: mount_docs serves /docs
        redoc_url=None,
    )
    mount_docs(app)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(MetricsMiddleware)  # the outermost: it sees the 500s too

    @app.exception_handler(ApiError)
    async def service_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RedisError)
    async def redis_error(_: Request, exc: RedisError) -> Response:
        log.warning("Redis: %s", exc)
        return _unavailable(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONAnswer(
            {"error": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return ApiError(422, "invalid_request", f"{where}: {first.get('msg')}").response()

    def reader(request: Request) -> Reader:
        return request.app.state.reader

    @app.get(
        "/v1/predictions/{row_key}",
        response_model=None,
        responses={200: {"model": PredictionAnswer}, **_errors(404, 422, 503)},
        summary="One row's prediction by its row key",
    )
    async def get_prediction(row_key: str, request: Request) -> Response:
        _check_key(row_key, "row_key")
        version, _, values = await reader(request).read(lambda _: _constant([row_key]))
        _count(values)
        if values[0] is None:
            raise ApiError(
                404,
                "not_found",
                f"no prediction for key {row_key!r} in version {version}",
                version=version,
            )
        return JSONAnswer(
            {"version": version, "key": row_key, "prediction": orjson.Fragment(values[0])}
        )

    @app.post(
        "/v1/predictions:batchGet",
        response_model=None,
        openapi_extra=_body_doc(BatchGetRequest),
        responses={200: {"model": BatchAnswer}, **_errors(400, 413, 422, 503)},
        summary=f"Predictions for up to {MAX_BATCH:,} row keys, in request order",
    )
    async def batch_get(request: Request) -> Response:
        keys = _items(await _json_body(request), "keys")
        for index, key in enumerate(keys):
            _check_key(key, f"keys[{index}]")
        version, _, values = await reader(request).read(lambda _: _constant(keys))
        _count(values)
        return JSONAnswer({"version": version, "predictions": [_fragment(v) for v in values]})

    @app.post(
        "/v1/predictions:lookup",
        response_model=None,
        openapi_extra=_body_doc(LookupRequest),
        responses={200: {"model": LookupAnswer}, **_errors(400, 413, 422, 503)},
        summary=f"Predictions for up to {MAX_BATCH:,} raw feature rows (keys computed here)",
    )
    async def lookup(request: Request) -> Response:
        rows = _items(await _json_body(request), "rows")
        online = reader(request)

        async def keys_for(layout: Layout) -> list[str]:
            if layout.id_column:
                return _id_keys(rows, layout.id_column)
            if not layout.feature_columns:
                raise NoKeyScheme(layout.rows)
            if len(rows) <= _INLINE_ROWS:
                return _feature_keys(rows, layout.feature_columns)
            # Thousands of rows: hash them off the event loop, other requests go on.
            return await run_in_threadpool(_feature_keys, rows, layout.feature_columns)

        version, keys, values = await online.read(keys_for)
        _count(values)
        return JSONAnswer(
            {"version": version, "keys": keys, "predictions": [_fragment(v) for v in values]}
        )

    @app.get("/v1/status", summary="The live version: its age, model and rows")
    async def status(request: Request) -> Response:
        info = await run_in_threadpool(reader(request).store.status)
        if info.get("current") is None:
            raise NoLiveVersion()
        published = info.pop("published_at")
        age = info.pop("age_seconds")
        return JSONAnswer(
            {
                "version": info.pop("current"),
                "age_seconds": None if math.isnan(age) else round(age, 3),
                "published_at": None if math.isnan(published) else published,
                "model": info.pop("model", None),
                "rows": info.pop("keys"),
                **info,
            }
        )

    @app.get("/healthz", summary="The process is alive (Redis is not asked)")
    async def healthz() -> Response:
        return JSONAnswer({"status": "alive"})

    @app.get(
        "/readyz",
        summary="Ready: Redis answers and a version is live",
        responses=_errors(503),
    )
    async def readyz(request: Request) -> Response:
        version = await reader(request).live_version()
        return JSONAnswer({"status": "ready", "version": version})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, request.app.state.metrics)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app

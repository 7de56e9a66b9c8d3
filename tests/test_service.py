"""The HTTP prediction service as a client sees it: the real server process on a free port,
the real Redis (through the cuttable proxy), plain HTTP calls."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer
from tcp_proxy import TcpProxy
from test_online import connect_url

from batchscore.batch.predictions import LoadedModel
from batchscore.online.store import OnlineStore
from batchscore.rows.keys import row_keys
from batchscore.versions import new_version

pytestmark = pytest.mark.services

DATA = load_breast_cancer(as_frame=True).frame
COLUMNS = [c for c in DATA.columns if c != "target"]
ROWS = DATA[COLUMNS].head(50)
KEYS = row_keys(ROWS.to_numpy())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m batchscore serve` in a child process, and an HTTP client for it."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.port = free_port()
        self.log = cwd / "serve.log"
        self.expect_traceback = False  # a test of the 500 answer sets it
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batchscore", "serve", "--port", str(self.port), *args],
            env={**clean, **env},
            cwd=cwd,  # no developer .env is read
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    host_port = redis_url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    yield proxy
    proxy.close()


def _env(redis_url: str, prefix: str, proxy: TcpProxy, tmp_path: Path) -> dict[str, str]:
    db = redis_url.rsplit("/", 1)[1]
    return {
        "BATCHSCORE_REDIS_URL": proxy.url("redis", f"/{db}"),
        "BATCHSCORE_REDIS_PREFIX": prefix,  # this test's own keys (conftest cleans them)
        "BATCHSCORE_HOME": str(tmp_path / "home"),
    }


def _server(env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    server = Server(env, tmp_path)
    yield server
    server.stop()
    if not server.expect_traceback:  # every other error is an expected one
        assert "Traceback" not in server.log.read_text()


@pytest.fixture
def server(
    topology_url: str, redis_url: str, redis_prefix: str, proxy: TcpProxy, tmp_path: Path
) -> Iterator[Server]:
    """The service on one Redis (through the cuttable proxy) or on the 3-master cluster
    (any node's plain URL): tests taking it run against both."""
    env = _env(redis_url, redis_prefix, proxy, tmp_path)
    if topology_url != redis_url:
        env["BATCHSCORE_REDIS_URL"] = topology_url
    yield from _server(env, tmp_path)


@pytest.fixture
def proxied_server(
    redis_url: str, redis_prefix: str, proxy: TcpProxy, tmp_path: Path
) -> Iterator[Server]:
    """The service on one Redis through the proxy (tests that cut the connection)."""
    yield from _server(_env(redis_url, redis_prefix, proxy, tmp_path), tmp_path)


@pytest.fixture
def store(topology_url: str, redis_prefix: str) -> Iterator[OnlineStore]:
    store = OnlineStore(connect_url(topology_url), redis_prefix)
    yield store
    store.close()


@pytest.fixture
def single_store(redis_client, redis_prefix: str) -> OnlineStore:
    return OnlineStore(redis_client, redis_prefix)


def _proba(key: str) -> float:
    return round(int(hashlib.sha256(key.encode()).hexdigest()[:4], 16) / 65535, 6)


def _model(version: str) -> LoadedModel:
    """A model whose version names the prediction set's, so a mixed answer shows."""
    return LoadedModel("svc", None, hashlib.sha256(version.encode()).hexdigest(), 0.5)


def model_version(version: str) -> str:
    return _model(version).version


def _value(version: str, key: str) -> str:
    """The prediction every reader returns for `key` in `version`."""
    proba = _proba(key)
    return json.dumps(
        {
            "label": int(proba >= 0.5),
            "class": "malignant" if proba >= 0.5 else "benign",
            "proba": proba,
            "threshold": 0.5,
            "model": "svc",
            "model_version": model_version(version),
        }
    )


def publish(store: OnlineStore, run: int, keys: list[str] = KEYS, **meta: str) -> str:
    version = new_version(f"BatchProcessingFlow/{run}")
    if "key_scheme" not in meta and not all(re.fullmatch("[0-9a-f]{64}", k) for k in keys):
        meta = {"key_scheme": "id", "id_column": "id", **meta}
    store.stage(
        version,
        {"model": "svc", "feature_columns": COLUMNS, "classes": ["benign", "malignant"], **meta},
    )
    proba = np.array([_proba(k) for k in keys])
    store.write(version, 0, keys, [(_model(version), (proba >= 0.5).astype(int), proba)])
    assert store.publish(version, len(keys), 1)
    return version


def publish_first_layout(store: OnlineStore, run: int, keys: list[str]) -> str:
    """A version as published before the compact layout: one JSON string per row, and a
    manifest that does not record its key scheme (the settings then say)."""
    version = new_version(f"BatchProcessingFlow/{run}")
    for key in keys:
        store.client.set(f"{store.prefix}:{version}:{key}", _value(version, key))
    store.client.hset(
        store.manifest(version),
        mapping={
            "model": "svc",
            "feature_columns": json.dumps(COLUMNS),
            "shard:0": len(keys),
            "status": "staged",
        },
    )
    store.client.zadd(store.staged, {version: 1})
    assert store.publish(version, len(keys), 1)
    return version


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


# ----------------------------------------------------------------------- routes


def test_readiness_before_and_after_a_publish(server, store):
    assert server.http.get("/healthz").json() == {"status": "alive"}
    body = _error(server.http.get("/readyz"), 503, "no_live_version")
    assert "no prediction set" in body["message"]
    _error(server.http.get(f"/v1/predictions/{KEYS[0]}"), 503, "no_live_version")
    _error(server.http.get("/v1/status"), 503, "no_live_version")

    version = publish(store, 1)
    ready = server.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "version": version}

    status = server.http.get("/v1/status").json()
    assert status["version"] == version
    assert status["rows"] == len(KEYS)
    assert status["model"] == "svc"
    assert 0 <= status["age_seconds"] < 60


def test_get_one_prediction_or_404(server, store):
    version = publish(store, 1)
    response = server.http.get(f"/v1/predictions/{KEYS[3]}")
    assert response.status_code == 200
    assert response.json() == {
        "version": version,
        "key": KEYS[3],
        "prediction": json.loads(_value(version, KEYS[3])),
    }
    body = _error(server.http.get(f"/v1/predictions/{'0' * 64}"), 404, "not_found")
    assert "0" * 64 in body["message"] and body["version"] == version
    _error(server.http.get("/v1/no-such-route"), 404, "not_found")
    _error(server.http.delete(f"/v1/predictions/{KEYS[3]}"), 405, "method_not_allowed")
    _error(server.http.get(f"/v1/predictions/{'k' * 300}"), 422, "invalid_key")


def test_batch_get_answers_in_request_order_with_null_for_misses(server, store):
    version = publish(store, 1)
    asked = [KEYS[5], "absent", KEYS[0], KEYS[5]]
    response = server.http.post("/v1/predictions:batchGet", json={"keys": asked})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == version
    assert body["predictions"] == [
        json.loads(_value(version, KEYS[5])),
        None,
        json.loads(_value(version, KEYS[0])),
        json.loads(_value(version, KEYS[5])),
    ]


def test_batch_get_of_thousands_of_keys_reads_in_slices_and_keeps_order(server, store):
    keys = [f"id{i:05d}" for i in range(2_500)]
    version = publish(store, 1, keys)
    asked = keys[::-1] + ["missing"]
    body = server.http.post("/v1/predictions:batchGet", json={"keys": asked}).json()
    assert body["version"] == version
    assert [p and p["proba"] for p in body["predictions"]] == [
        json.loads(_value(version, k))["proba"] for k in keys[::-1]
    ] + [None]


def test_lookup_computes_keys_from_raw_features(server, store):
    version = publish(store, 1)
    rows = ROWS.head(5).to_dict(orient="records")
    rows[1]["some label"] = "ignored"  # columns the model does not use are ignored
    rows[2] = {c: int(v) if float(v).is_integer() else v for c, v in rows[2].items()}
    unknown = {c: v + 1000 for c, v in rows[0].items() if c in COLUMNS}
    response = server.http.post("/v1/predictions:lookup", json={"rows": [*rows, unknown]})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == version
    assert body["keys"][:5] == KEYS[:5]
    assert body["predictions"][:5] == [json.loads(_value(version, k)) for k in KEYS[:5]]
    assert body["predictions"][5] is None


BAD_CELLS = [
    (None, "missing"),  # the column is dropped from the row
    ("12.5", "is not a number"),
    ("null", "is not a number"),
    ("NaN", "NaN or infinite"),
    ("Infinity", "NaN or infinite"),
    ("-Infinity", "NaN or infinite"),
    ("1e999", "NaN or infinite"),
    ("1" + "0" * 400, "100000000000...(401 digits) cannot be"),
]


def test_lookup_bad_row_is_422_naming_row_and_column(server, store):
    """Every kind of bad cell, a request each, to one server (a server of its own per
    case cost a second a case)."""
    publish(store, 1)
    column = COLUMNS[7]
    for cell, problem in BAD_CELLS:
        rows = ROWS.head(3).to_dict(orient="records")
        if cell is None:
            del rows[2][column]
            body = json.dumps({"rows": rows})
        else:
            rows[2][column] = "@CELL@"
            literal = json.dumps(cell) if cell == "12.5" else cell
            body = json.dumps({"rows": rows}).replace('"@CELL@"', literal)
        response = server.http.post(
            "/v1/predictions:lookup", content=body, headers={"content-type": "application/json"}
        )
        error = _error(response, 422, "invalid_row")
        assert error["row"] == 2 and error["column"] == column, (cell, error)
        assert f"rows[2], column {column!r}" in error["message"], (cell, error)
        assert problem in error["message"], (cell, error)


def test_lookup_reads_a_boolean_as_one_or_zero(server, store):
    """The one row rule (rows/validation.py): a boolean feature is 1 or 0, as in training
    and in the batch, so true and 1 key the same row."""
    rows = ROWS.head(1).to_dict(orient="records")
    rows[0][COLUMNS[7]] = 1
    version = publish(store, 1, row_keys([[float(rows[0][c]) for c in COLUMNS]]))
    as_bool = json.dumps({"rows": rows}).replace(f'"{COLUMNS[7]}": 1', f'"{COLUMNS[7]}": true')
    answer = server.http.post(
        "/v1/predictions:lookup", content=as_bool, headers={"content-type": "application/json"}
    ).json()
    assert answer["version"] == version and answer["predictions"][0] is not None


def test_lookup_of_many_rows(server, store):
    """Past a few hundred rows the keys are hashed off the event loop: same answer."""
    rows = DATA[COLUMNS]
    version = publish(store, 1, row_keys(rows.to_numpy()))
    body = {"rows": rows.to_dict(orient="records")}
    answer = server.http.post("/v1/predictions:lookup", json=body).json()
    assert answer["version"] == version and len(answer["predictions"]) == len(rows)
    assert None not in answer["predictions"]
    assert answer["keys"] == row_keys(rows.to_numpy())


def test_an_internal_error_is_a_json_500_without_stack_trace(server, store):
    version = publish(store, 1)
    store.client.hset(store.manifest(version), "feature_columns", "not json")
    server.expect_traceback = True
    rows = ROWS.head(1).to_dict(orient="records")
    response = server.http.post("/v1/predictions:lookup", json={"rows": rows})
    assert _error(response, 500, "internal")["message"] == "internal error"
    assert "Traceback" in server.log.read_text()  # the trace stays in the server's log
    assert response.headers.get("connection") != "close"
    for _ in range(3):  # the same keep-alive connection goes on serving
        assert server.http.get(f"/v1/predictions/{KEYS[0]}").status_code == 200


@pytest.mark.parametrize("recorded", [True, False], ids=["manifest", "settings"])
def test_lookup_by_id_column(redis_url, redis_prefix, proxy, single_store, tmp_path, recorded):
    """A version keyed by an id column: the lookup keys rows by that id, as text. The
    version's manifest says so; for a version that does not, BATCHSCORE_ID_COLUMN does."""
    env = _env(redis_url, redis_prefix, proxy, tmp_path)
    if recorded:
        publish(single_store, 1, ["007", "42"], key_scheme="id", id_column="customer")
    else:
        publish_first_layout(single_store, 1, ["007", "42"])
        env["BATCHSCORE_ID_COLUMN"] = "customer"
    server = Server(env, tmp_path)
    try:
        rows = [{"customer": "007"}, {"customer": 42}, {"customer": "7"}]
        body = server.http.post("/v1/predictions:lookup", json={"rows": rows}).json()
        assert body["keys"] == ["007", "42", "7"]
        assert [p and p["model"] for p in body["predictions"]] == ["svc", "svc", None]
        bad = server.http.post("/v1/predictions:lookup", json={"rows": [{"customer": "a b"}]})
        assert _error(bad, 422, "invalid_row")["column"] == "customer"
        missing = server.http.post("/v1/predictions:lookup", json={"rows": [{"id": "007"}]})
        assert "keys rows by this id column" in _error(missing, 422, "invalid_row")["message"]
    finally:
        server.stop()


def test_a_version_keyed_by_feature_hash_ignores_the_id_setting(
    redis_url, redis_prefix, proxy, single_store, tmp_path
):
    publish(single_store, 1, key_scheme="feature_hash")
    env = {**_env(redis_url, redis_prefix, proxy, tmp_path), "BATCHSCORE_ID_COLUMN": "customer"}
    server = Server(env, tmp_path)
    try:
        rows = ROWS.head(2).to_dict(orient="records")
        body = server.http.post("/v1/predictions:lookup", json={"rows": rows}).json()
        assert body["keys"] == KEYS[:2] and None not in body["predictions"]
    finally:
        server.stop()


def test_malformed_json_is_400(server, store):
    publish(store, 1)
    for body in (b'{"keys": ["a"', b"\xff\xfe", b"", b'{"keys": [1e999'):
        response = server.http.post("/v1/predictions:batchGet", content=body)
        assert "not valid JSON" in _error(response, 400, "malformed_json")["message"]
    for body in ({"keys": "abc"}, ["abc"], {"rows": []}, {"keys": [1]}):
        response = server.http.post("/v1/predictions:batchGet", json=body)
        assert response.status_code == 422, response.text


def test_body_and_batch_size_limits(server, store):
    publish(store, 1)
    too_many = server.http.post("/v1/predictions:batchGet", json={"keys": ["k"] * 10_001})
    assert "at most 10000" in _error(too_many, 422, "batch_too_large")["message"]
    too_many = server.http.post("/v1/predictions:lookup", json={"rows": [{}] * 10_001})
    _error(too_many, 422, "batch_too_large")
    ok = server.http.post("/v1/predictions:batchGet", json={"keys": ["k"] * 10_000})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 10_000

    huge = b'{"keys": ["' + b"k" * (17 * 1024 * 1024) + b'"]}'
    _error(server.http.post("/v1/predictions:batchGet", content=huge), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"keys": ["'
        for _ in range(17):
            yield b"k" * 1024 * 1024
        yield b'"]}'

    response = server.http.post("/v1/predictions:batchGet", content=chunks())
    _error(response, 413, "body_too_large")


# ------------------------------------------------------------- versions and faults


def test_publish_and_rollback_are_seen_at_once_and_never_mixed(server, store):
    first = publish(store, 1)
    assert server.http.get(f"/v1/predictions/{KEYS[0]}").json()["version"] == first
    second = publish(store, 2)
    for version in (second, first):
        if version == first:  # a rollback: the pointer switched back, atomically
            store.client.set(store.pointer, first)
        answer = server.http.post("/v1/predictions:batchGet", json={"keys": KEYS}).json()
        assert answer["version"] == version
        assert {p["model_version"] for p in answer["predictions"]} == {model_version(version)}
        single = server.http.get(f"/v1/predictions/{KEYS[1]}").json()
        assert single["version"] == version
        assert single["prediction"]["model_version"] == model_version(version)
        rows = ROWS.head(10).to_dict(orient="records")
        lookup = server.http.post("/v1/predictions:lookup", json={"rows": rows}).json()
        assert {p["model_version"] for p in lookup["predictions"]} == {model_version(version)}


def test_lookup_after_the_last_seen_version_was_retired(server, store):
    """The version the service answered from last is gone, manifest and all: the next
    lookup follows the pointer instead of failing on the missing manifest."""
    first = publish(store, 1)
    assert server.http.get(f"/v1/predictions/{KEYS[0]}").json()["version"] == first
    publish(store, 2)
    third = publish(store, 3)
    assert first in store.retire(keep=1)
    rows = ROWS.head(3).to_dict(orient="records")
    answer = server.http.post("/v1/predictions:lookup", json={"rows": rows}).json()
    assert answer["version"] == third and None not in answer["predictions"]


def test_redis_down_is_503_and_the_service_recovers(proxied_server, single_store, proxy):
    server = proxied_server
    publish(single_store, 1)
    assert server.http.get(f"/v1/predictions/{KEYS[0]}").status_code == 200
    proxy.cut()
    started = time.monotonic()
    for call in (
        lambda: server.http.get(f"/v1/predictions/{KEYS[0]}"),
        lambda: server.http.post("/v1/predictions:batchGet", json={"keys": KEYS[:2]}),
        lambda: server.http.get("/readyz"),
        lambda: server.http.get("/v1/status"),
    ):
        body = _error(call(), 503, "redis_unavailable")
        assert body["message"] == "Redis unreachable"  # short: no host, no password
    assert time.monotonic() - started < 10  # bounded waits, no hanging client
    assert server.http.get("/healthz").status_code == 200  # alive, just not ready
    metrics = server.http.get("/metrics")
    assert metrics.status_code == 200 and "batchscore_redis_up 0.0" in metrics.text

    proxy.restore()
    assert server.http.get("/readyz").status_code == 200
    assert server.http.get(f"/v1/predictions/{KEYS[0]}").status_code == 200


# ---------------------------------------------------------------- observability


def _samples(text: str) -> dict[str, list]:
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.samples
    return families


def test_metrics_are_prometheus_text(server, store):
    version = publish(store, 1)
    for key in (KEYS[0], KEYS[1], "absent"):
        server.http.get(f"/v1/predictions/{key}")
    server.http.post("/v1/predictions:batchGet", json={"keys": [KEYS[2], "gone"]})
    response = server.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    metrics = _samples(response.text)

    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in metrics["batchscore_http_request_duration_seconds"]
        if s.name.endswith("_count")
    }
    assert requests[("/v1/predictions/{row_key}", "200")] == 2
    assert requests[("/v1/predictions/{row_key}", "404")] == 1
    assert requests[("/v1/predictions:batchGet", "200")] == 1
    buckets = [
        s
        for s in metrics["batchscore_http_request_duration_seconds"]
        if s.name.endswith("_bucket") and s.labels["route"] == "/v1/predictions/{row_key}"
    ]
    assert buckets and all("le" in s.labels for s in buckets)

    lookups = {s.labels["result"]: s.value for s in metrics["batchscore_lookup_keys"]}
    assert lookups == {"hit": 3, "miss": 2}
    age = metrics["batchscore_live_version_age_seconds"][0].value
    assert 0 <= age < 60 and not math.isnan(age)
    assert metrics["batchscore_live_version"][0].labels == {"version": version}
    assert metrics["batchscore_redis_up"][0].value == 1


def test_metrics_add_up_across_workers(redis_url, redis_prefix, proxy, single_store, tmp_path):
    publish(single_store, 1)
    server = Server(_env(redis_url, redis_prefix, proxy, tmp_path), tmp_path, "--workers", "2")
    try:
        for _ in range(20):  # new connections: spread over both workers
            with httpx.Client(base_url=str(server.http.base_url)) as client:
                assert client.get(f"/v1/predictions/{KEYS[0]}").status_code == 200
        metrics = _samples(server.http.get("/metrics").text)
        counts = [
            s.value
            for s in metrics["batchscore_http_request_duration_seconds"]
            if s.name.endswith("_count") and s.labels["route"] == "/v1/predictions/{row_key}"
        ]
        assert sum(counts) == 20
    finally:
        server.stop()


def test_openapi_docs_are_served(server):
    docs = server.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = server.http.get("/openapi.json").json()
    assert {
        "/v1/predictions/{row_key}",
        "/v1/predictions:batchGet",
        "/v1/predictions:lookup",
        "/v1/status",
        "/healthz",
        "/readyz",
    } <= set(spec["paths"])
    body = spec["paths"]["/v1/predictions:lookup"]["post"]["requestBody"]
    assert "rows" in json.dumps(body)


# ---------------------------------------------------------------------- Compose


def test_compose_runs_the_api_from_the_runner_image():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]
    api, runner = compose["api"], compose["runner"]
    assert "profiles" not in api  # the default profile: `docker compose up` starts it
    assert api["image"] == runner["image"] and api["build"] == runner["build"]
    assert "batchscore serve" in " ".join(api["command"]) and "0.0.0.0" in api["command"]
    assert api["ports"] == ["127.0.0.1:${API_PORT:-8000}:8000"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    library = {k: v for k, v in runner["environment"].items() if k.startswith("BATCHSCORE_")}
    assert {k: api["environment"].get(k) for k in library} == library

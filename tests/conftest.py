"""Shared fixtures: real PostgreSQL and Redis, a moto S3 server standing in for MinIO.

Service URLs come from TEST_DATABASE_URL / TEST_REDIS_URL (defaults: the machine's
local servers). A missing service skips its tests, or fails them when REQUIRE_SERVICES=1.
Metaflow's datastore and BATCHSCORE_HOME always live in temporary folders.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="batchscore-tests-"))

# Metaflow reads its configuration when first imported: set it before any test imports it.
# The user name by the flows' own rule (a usable METAFLOW_USER, else the login name, else
# `batchscore`): imported here as the flows import it, before Metaflow.
import batchscore.orchestration.metaflow_user  # noqa: E402, F401

os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(_SESSION_TMP / "metaflow-local")
os.environ.setdefault("METAFLOW_DEFAULT_METADATA", "local")
# A developer's .env must not leak into the tests: every variable is set explicitly.
for _name in ("STORE_URL", "DATABASE_URL", "REDIS_URL", "ID_COLUMN", "HOME", "REDIS_PREFIX"):
    os.environ.pop(f"BATCHSCORE_{_name}", None)


# The S3 endpoint too: this process's Metaflow client reads artifacts through it. Its port
# is held, bound and listening, from now on (moto serves on this very socket later), so no
# other process can take it in between.
_MOTO_SOCKET = socket.create_server(("127.0.0.1", 0))
_MOTO_PORT = _MOTO_SOCKET.getsockname()[1]
os.environ["METAFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{_MOTO_PORT}"
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ[_name] = _value

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


# A test that reaches a real service carries the `services` marker whichever way it gets
# there, so `-m "not services"` leaves exactly those out: from these fixtures (directly or
# through another fixture) it is added here; a parameter that reaches one only at run time
# (`request.getfixturevalue`) carries it itself (`pytest.param(..., marks=pytest.mark.services)`),
# and `_service_marker_is_true` fails a test that reached one without it. `flows` is written
# on each test that runs a flow (tests/test_layout.py checks that none lacks it).
_SERVICE_FIXTURES = frozenset(
    {"postgres_server_url", "redis_server_url", "s3_endpoint", "redis_cluster_url", "topology_url"}
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups it adds
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if _SERVICE_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.services)
        for shared in ("service_training", "fresh_install"):
            if shared in fixtures:
                # Under pytest-xdist (`make test`: --dist loadgroup) the tests sharing a
                # session's training run or fresh install run on one worker, so it is made
                # once there too.
                item.add_marker(pytest.mark.xdist_group(shared))
    # The longest first (whole flows, fresh installs): on two workers, a test of a minute
    # or two that starts last is the suite's tail.
    items.sort(key=lambda item: not (item.get_closest_marker("flows")
                                     or item.get_closest_marker("slow")))  # fmt: skip


def pytest_sessionfinish(session, exitstatus):
    from batchscore.online.embedded_redis import stop_server

    for pidfile in _SESSION_TMP.rglob("redis.pid"):
        stop_server(pidfile.with_name("redis.db"))
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _service_marker_is_true(request) -> Iterator[None]:
    """Fail a test that reached a service (a fixture asked for at run time included) but
    is not marked `services`: `make test-fast` would run it."""
    yield
    reached = _SERVICE_FIXTURES.intersection(request.fixturenames)
    if reached and request.node.get_closest_marker("services") is None:
        pytest.fail(
            f"{request.node.nodeid} reached {sorted(reached)} but is not marked `services`: "
            "mark it, or its parameter (pytest.param(..., marks=pytest.mark.services))"
        )


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A BATCHSCORE_HOME of its own; its embedded Redis (if started) is stopped after."""
    path = tmp_path / "home"
    yield path
    from batchscore.online.embedded_redis import stop_server

    stop_server(path / "redis.db")


@pytest.fixture
def embedded_env(home: Path) -> dict[str, str]:
    """Environment for embedded mode: no services at all."""
    return {"BATCHSCORE_HOME": str(home), "METAFLOW_DEFAULT_DATASTORE": "local"}


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(TEST_DATABASE_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        _unavailable(f"PostgreSQL at {TEST_DATABASE_URL}", exc)
    finally:
        engine.dispose()
    return TEST_DATABASE_URL


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the real server, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"batchscore_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ----------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        _unavailable(f"Redis at {TEST_REDIS_URL}", exc)
    finally:
        client.close()
    return TEST_REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    """This test's own key prefix: tests share one Redis db (and may run at once, in other
    processes or other checkouts), so each writes and cleans only under its own prefix."""
    return f"t{uuid.uuid4().hex[:12]}"


def keyspace(client, prefix: str) -> set[str]:
    """Every key of a test's prefix: control keys, rows and owner hashes (a version's keys
    carry the prefix inside a hash tag, `{prefix...}`)."""
    return {k.decode() for k in client.scan_iter(match=f"*{prefix}*", count=5_000)}


@pytest.fixture
def redis_url(redis_server_url: str, redis_prefix: str) -> Iterator[str]:
    """The test Redis; every key of this test's prefix is deleted afterwards."""
    import redis

    yield redis_server_url
    client = redis.Redis.from_url(redis_server_url)
    names = list(keyspace(client, redis_prefix))
    for first in range(0, len(names), 5_000):
        client.unlink(*names[first : first + 5_000])
    client.close()


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free local port: a real S3 protocol endpoint, like MinIO."""
    try:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from moto.server import ThreadedMotoServer
        from werkzeug.serving import make_server
    except ImportError as exc:  # pragma: no cover - moto is a test requirement
        _unavailable("moto's S3 server", exc)

    class HeldPortMotoServer(ThreadedMotoServer):
        """moto's server on the socket held since start-up, instead of binding anew."""

        def _server_entry(self) -> None:
            self._server = make_server(
                "127.0.0.1",
                _MOTO_PORT,
                DomainDispatcherApplication(create_backend_app),
                threaded=True,
                request_handler=MotoRequestHandler,
                fd=_MOTO_SOCKET.fileno(),
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    server = HeldPortMotoServer(ip_address="127.0.0.1", port=_MOTO_PORT, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{_MOTO_PORT}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str) -> dict[str, str]:
    """Credentials and endpoint for the store and for Metaflow's S3 datastore."""
    return _create_buckets(s3_endpoint)


def execute_notebook(notebooks: Path, env: dict[str, str]) -> str:
    """Run `notebooks/predictions.ipynb` as `jupyter nbconvert --execute` does (kernel in
    `notebooks/`, the environment set for it); returns what its cells printed."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(notebooks / "predictions.ipynb", as_version=4)
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(notebooks)}},
        ).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def _create_buckets(s3_endpoint: str) -> dict[str, str]:
    """Fresh buckets for the store and Metaflow's S3 datastore on the endpoint, and the
    environment (credentials, endpoint, URLs) that points both at them."""
    import boto3

    suffix = uuid.uuid4().hex[:8]
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    batch, mf = f"batch-{suffix}", f"metaflow-{suffix}"
    client.create_bucket(Bucket=batch)
    client.create_bucket(Bucket=mf)
    return {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "BATCHSCORE_STORE_URL": f"s3://{batch}",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{mf}/metaflow",
        "METAFLOW_S3_ENDPOINT_URL": s3_endpoint,
    }


@pytest.fixture
def service_env(
    home: Path, postgres_url: str, redis_url: str, redis_prefix: str, s3_env: dict[str, str]
) -> dict[str, str]:
    """Environment for service mode: real PostgreSQL and Redis, S3 on moto."""
    return {
        **s3_env,
        "BATCHSCORE_HOME": str(home),
        "BATCHSCORE_DATABASE_URL": postgres_url,
        "BATCHSCORE_REDIS_URL": redis_url,
        "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        "METAFLOW_DEFAULT_DATASTORE": "s3",
    }


@pytest.fixture
def settings_for(monkeypatch: pytest.MonkeyPatch):
    """Settings built from an env dict, without reading any .env file."""
    from batchscore.config import Settings

    def build(env: dict[str, str]) -> Settings:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return Settings(_env_file=None)

    return build


# ------------------------------------------------------------------ Redis Cluster


def _free_ports(count: int) -> list[int]:
    """Ports free now, whose port + 10000 (the cluster bus) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10_000 > 65_535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        ports.append(port)
    return ports


def start_redis_cluster(folder: Path, masters: int = 3):
    """A real Redis Cluster of `masters` nodes on free loopback ports: (url, processes)."""
    import subprocess
    import time

    import redis

    for _attempt in range(3):
        ports = _free_ports(masters)
        processes = []
        for port in ports:
            node = folder / str(port)
            node.mkdir(parents=True, exist_ok=True)
            processes.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000", "--appendonly", "no", "--save", "",
                     "--dir", str(node), "--maxmemory-policy", "noeviction"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and not up:
            try:
                up = all(redis.Redis(port=p, socket_timeout=1).ping() for p in ports)
            except redis.RedisError:
                time.sleep(0.05)
        created = up and subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60,
        ).returncode == 0  # fmt: skip
        while created and time.monotonic() < deadline + 20:
            info = redis.Redis(port=ports[0]).cluster("info")
            if info.get("cluster_state") == "ok":
                return f"redis://127.0.0.1:{ports[0]}", processes
            time.sleep(0.1)
        stop_redis_cluster(processes)
    raise RuntimeError("could not start a local Redis Cluster")


def stop_redis_cluster(processes) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A 3-master Redis Cluster started for this session, stopped after it."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unavailable("a Redis Cluster", RuntimeError("redis-server/redis-cli not installed"))
    folder = _SESSION_TMP / "redis-cluster"
    try:
        url, processes = start_redis_cluster(folder)
    except Exception as exc:
        _unavailable("a Redis Cluster", exc)
    yield url
    stop_redis_cluster(processes)


@pytest.fixture(params=["redis", "cluster"])
def topology_url(request, redis_prefix: str) -> Iterator[str]:
    """One Redis (db 15) or the session's Redis Cluster; this test's keys deleted after.
    Tests that take it run against both topologies."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_url")
        return
    from redis.cluster import RedisCluster

    url = request.getfixturevalue("redis_cluster_url")
    yield url
    client = RedisCluster.from_url(url)
    names = list(client.scan_iter(match=f"*{redis_prefix}*", count=5_000))
    for name in names:
        client.unlink(name)
    client.close()


# ------------------------------------------------------------- flows, trained once


def start_flow(flow_file: str, env: dict[str, str], cwd: Path, method: str = "run", **params):
    """Run a flow through Metaflow's Runner to its end, successful or not:
    (status, run, output). `env` is added to this process's environment."""
    from metaflow import Runner

    cwd.mkdir(parents=True, exist_ok=True)
    runner = Runner(str(ROOT / "metaflow" / flow_file), env=env, cwd=str(cwd))
    with getattr(runner, method)(**params) as running:
        return running.status, running.run, running.stdout + running.stderr


def make_project(folder: Path) -> Path:
    """A project folder as a user has it: pyproject.toml on top, the notebook in notebooks/."""
    (folder / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", folder)
    shutil.copy(ROOT / "notebooks" / "predictions.ipynb", folder / "notebooks")
    return folder


class ServiceTraining:
    """One TrainModelsFlow run in service mode, shared by the tests that score with it.

    It ran from a project folder whose `.env` held the services (the Compose path), with
    Metaflow's own variables from the environment. Its database is a template: each test
    gets a copy of its own (`trained_service_env`), so records a test adds stay its own.
    """

    def __init__(self, run, env: dict[str, str], database: str, project: Path) -> None:
        self.run, self.env, self.database, self.project = run, env, database, project


@pytest.fixture(scope="session")
def service_training(
    postgres_server_url: str, redis_server_url: str, s3_endpoint: str
) -> Iterator[ServiceTraining]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"batchscore_trained_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    project = make_project(_SESSION_TMP / f"trained-{name}")
    env = {
        **_create_buckets(s3_endpoint),
        "BATCHSCORE_HOME": str(project / ".batchscore"),
        "BATCHSCORE_DATABASE_URL": make_url(postgres_server_url)
        .set(database=name)
        .render_as_string(hide_password=False),
        "BATCHSCORE_REDIS_URL": redis_server_url,  # `start` checks it is reachable
        "BATCHSCORE_REDIS_PREFIX": f"t{uuid.uuid4().hex[:12]}",
        "METAFLOW_DEFAULT_DATASTORE": "s3",
    }
    in_dotenv = {k: v for k, v in env.items() if not k.startswith("METAFLOW_")}
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in in_dotenv.items()))
    metaflow_env = {k: v for k, v in env.items() if k.startswith("METAFLOW_")}
    status, run, output = start_flow("train_models.py", metaflow_env, project, cv_folds=2)
    assert status == "successful", output
    try:
        yield ServiceTraining(run, env, name, project)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def trained_service_env(
    service_training: ServiceTraining,
    postgres_server_url: str,
    redis_url: str,
    redis_prefix: str,
    home: Path,
) -> Iterator[dict[str, str]]:
    """`service_env` with the shared training already recorded: a copy of its database
    (PostgreSQL's CREATE DATABASE ... TEMPLATE), its store and Metaflow buckets, and this
    test's own Redis prefix and home."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"batchscore_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{service_training.database}"'))
    try:
        yield {
            **service_training.env,
            "BATCHSCORE_HOME": str(home),
            "BATCHSCORE_DATABASE_URL": make_url(postgres_server_url)
            .set(database=name)
            .render_as_string(hide_password=False),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        }
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def trained_service_env_local_datastore(trained_service_env: dict[str, str]) -> dict[str, str]:
    """`trained_service_env` with Metaflow's own artifacts on its local datastore, for tests
    of what the batch does (its state lives in PostgreSQL, Redis and the S3 store): the S3
    datastore costs ~1 s a task (a subprocess per save), and the service run of
    tests/test_flows.py covers it."""
    return {**trained_service_env, "METAFLOW_DEFAULT_DATASTORE": "local"}


def fresh_copy(target: Path) -> None:
    """The committed HEAD, as a user clones it (outside git: the files a clone holds)."""
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    else:
        shutil.copytree(
            ROOT,
            target,
            ignore=shutil.ignore_patterns(
                ".venv", ".batchscore", ".metaflow", ".env", "__pycache__"
            ),
        )


def run_command(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    """Run a command to success and return what it printed (its tail, should it fail)."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


class FreshInstall:
    """A fresh clone and a new virtualenv holding the seed's own install."""

    def __init__(self, clone: Path, python: str, env: dict[str, str]) -> None:
        self.clone, self.python, self.env = clone, python, env


@pytest.fixture(scope="session")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> FreshInstall:
    """`pip install -r requirements.txt` in a new virtualenv, in a fresh clone, from a new
    user's shell: none of the test session's Metaflow or batchscore settings, no
    METAFLOW_USER. One install (~30 s) for the plain-pip and the packaging tests, which
    installs the project on its own beside it (`pip install --no-deps --target`); the
    pins `pip install .` would resolve are requirements.txt's (test_packaging checks).
    `--no-compile` installs the same files without their bytecode, which the interpreter
    writes on first import: compiling every package up front took 24 of the install's
    54 CPU-seconds, for the few modules the flows import."""
    clone = tmp_path_factory.mktemp("fresh") / "batchscore"
    fresh_copy(clone)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("METAFLOW_", "BATCHSCORE_", "VIRTUAL_ENV", "PYTHON"))
    }
    subprocess.run([sys.executable, "-m", "venv", str(clone / "venv")], check=True)
    python = str(clone / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-compile"]
    run_command([*pip, "-r", "requirements.txt"], clone, env)
    return FreshInstall(clone, python, env)

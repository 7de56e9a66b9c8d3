"""Fail fast: every configured service is reached before any work, and a failure is one line
naming the variable and the masked URL."""

from __future__ import annotations

from pathlib import Path

import pytest
from tcp_proxy import closed_port

from batchscore.orchestration.preflight import ServiceError, check_services

ROOT = Path(__file__).resolve().parents[1]


def test_reachable_services_pass(service_env, settings_for):
    check_services(settings_for(service_env))


def test_embedded_defaults_need_no_service(settings_for, tmp_path):
    check_services(settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")}))


@pytest.mark.services
def test_unreachable_redis_names_the_setting(service_env, settings_for):
    port = closed_port()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    with pytest.raises(ServiceError) as caught:
        check_services(settings_for({**service_env, "BATCHSCORE_REDIS_URL": url}))
    assert str(caught.value) == (
        f"BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:{port}/0): connection refused"
    )


@pytest.mark.services
def test_wrong_redis_password_names_the_setting(service_env, settings_for, redis_url):
    url = redis_url.replace("redis://", "redis://:wrong-pw@")
    try:
        check_services(settings_for({**service_env, "BATCHSCORE_REDIS_URL": url}))
    except ServiceError as exc:
        assert str(exc).startswith("BATCHSCORE_REDIS_URL (redis://:***@")
        assert "wrong-pw" not in str(exc)
    # (A server without requirepass accepts any password: then there is nothing to report.)


@pytest.mark.services
def test_unreachable_database_names_the_setting(service_env, settings_for):
    port = closed_port()
    url = f"postgresql+psycopg2://batchscore:s3cret-pw@127.0.0.1:{port}/batchscore"
    with pytest.raises(ServiceError) as caught:
        check_services(settings_for({**service_env, "BATCHSCORE_DATABASE_URL": url}))
    assert str(caught.value) == (
        f"BATCHSCORE_DATABASE_URL (postgresql+psycopg2://batchscore:***@127.0.0.1:{port}"
        "/batchscore): connection refused"
    )


@pytest.mark.services
def test_missing_database_names_the_setting(service_env, settings_for, postgres_url):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(database="no_such_db_here").render_as_string(False)
    with pytest.raises(ServiceError) as caught:
        check_services(settings_for({**service_env, "BATCHSCORE_DATABASE_URL": url}))
    assert str(caught.value).startswith("BATCHSCORE_DATABASE_URL (")
    assert str(caught.value).endswith(
        '/no_such_db_here): database "no_such_db_here" does not exist'
    )


@pytest.mark.services
def test_missing_bucket_names_the_store(service_env, settings_for):
    env = {**service_env, "BATCHSCORE_STORE_URL": "s3://no-such-bucket-here"}
    with pytest.raises(ServiceError) as caught:
        check_services(settings_for(env))
    assert str(caught.value) == "BATCHSCORE_STORE_URL (s3://no-such-bucket-here): no such bucket"


@pytest.mark.services
def test_unreachable_s3_endpoint_names_its_variable(service_env, settings_for):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ServiceError) as caught:
        check_services(settings_for({**service_env, "AWS_ENDPOINT_URL_S3": endpoint}))
    assert str(caught.value) == f"AWS_ENDPOINT_URL_S3 ({endpoint}): connection refused"


@pytest.mark.flows
@pytest.mark.services
@pytest.mark.parametrize("flow_file", ["train_models.py", "batch_processing.py"])
def test_flow_stops_in_start_with_one_line(flow_file, service_env, tmp_path):
    """A wrong database URL stops the run in `start`: one line, no traceback, no retries."""
    from metaflow import Runner

    port = closed_port()
    env = {
        **service_env,
        "BATCHSCORE_DATABASE_URL": f"postgresql+psycopg2://batchscore:s3cret-pw@127.0.0.1:{port}/x",
    }
    flow = str(ROOT / "metaflow" / flow_file)
    with Runner(flow, env=env, cwd=str(tmp_path)).run() as running:
        assert running.status == "failed"
        output = running.stdout + running.stderr
        run = running.run
    line = f"BATCHSCORE_DATABASE_URL (postgresql+psycopg2://batchscore:***@127.0.0.1:{port}/x)"
    assert f"{line}: connection refused" in output, output[-3000:]
    assert "Traceback" not in output
    assert "s3cret-pw" not in output
    assert [step.id for step in run] == ["start"]  # nothing after it ran
    # One attempt, even where `start` has @retry.
    assert output.count(f"{line}: connection refused") == 1


def test_notebook_names_the_setting_when_redis_is_unreachable(tmp_path, monkeypatch):
    """Run from notebooks/ as Jupyter does, against a Redis that is not there."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    port = closed_port()
    (project / ".env").write_text(f"BATCHSCORE_REDIS_URL=redis://:s3cret-pw@127.0.0.1:{port}/0\n")
    monkeypatch.setenv("BATCHSCORE_HOME", str(tmp_path / "home"))
    notebook = nbformat.read(ROOT / "notebooks" / "predictions.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(project / "notebooks")}},
    )
    with pytest.raises(CellExecutionError) as caught:
        client.execute()
    message = str(caught.value)
    assert f"BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:{port}/0): connection refused" in message
    assert "s3cret-pw" not in message


def test_a_password_in_a_drivers_message_is_masked_too():
    error = ServiceError("BATCHSCORE_REDIS_URL", "redis://:pw-123@h:1/0", "bad pw-123 given")
    assert str(error) == "BATCHSCORE_REDIS_URL (redis://:***@h:1/0): bad *** given"


@pytest.mark.services
def test_a_service_lost_mid_run_is_named_before_its_traceback(service_env, settings_for, capsys):
    # start's checks passed; later Redis (or the database) goes away. The step's error is
    # retried as before, but first one line says which setting points at the service.
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from batchscore.orchestration.fail_fast import _name_the_service
    from batchscore.orchestration.preflight import service_failure

    port = closed_port()
    redis_url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    db_url = f"postgresql+psycopg2://batchscore:s3cret-pw@127.0.0.1:{port}/batchscore"
    settings = settings_for(
        {**service_env, "BATCHSCORE_REDIS_URL": redis_url, "BATCHSCORE_DATABASE_URL": db_url}
    )
    with pytest.raises(redis.ConnectionError) as lost_redis:
        redis.Redis.from_url(redis_url).set("k", "v")
    assert service_failure(lost_redis.value, settings) == (
        f"BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:{port}/0): connection refused"
    )
    with pytest.raises(OperationalError) as lost_db, create_engine(db_url).connect() as conn:
        conn.execute(text("SELECT 1"))
    assert service_failure(lost_db.value, settings).startswith(
        "BATCHSCORE_DATABASE_URL (postgresql+psycopg2://batchscore:***@127.0.0.1:"
    )
    assert service_failure(ValueError("not a service"), settings) is None

    _name_the_service("ingest_redis", lost_redis.value)  # Settings() from the environment
    assert capsys.readouterr().err == (
        f"ingest_redis: BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:{port}/0): "
        "connection refused\n"
    )


@pytest.mark.services
def test_a_store_lost_mid_run_is_named_as_the_start_check_names_it(service_env, settings_for):
    """One name for one endpoint: an S3 endpoint that stops answering mid-run is reported
    under the variable `start` would name, the one a user must fix (issue 22, item 14)."""
    from batchscore.orchestration.preflight import service_failure
    from batchscore.storage.object_store import ObjectStore

    endpoint = f"http://127.0.0.1:{closed_port()}"
    settings = settings_for({**service_env, "AWS_ENDPOINT_URL_S3": endpoint})
    with pytest.raises(ServiceError) as at_start:
        check_services(settings)
    with pytest.raises(Exception) as mid_run:
        ObjectStore.from_settings(settings).get_bytes(f"{settings.resolved_store_url}/x.csv")
    assert service_failure(mid_run.value, settings) == str(at_start.value)
    assert str(at_start.value) == f"AWS_ENDPOINT_URL_S3 ({endpoint}): connection refused"

    # The endpoint answers, but the bucket is gone: the store's own variable, both times.
    gone = settings_for({**service_env, "BATCHSCORE_STORE_URL": "s3://no-such-bucket-here"})
    with pytest.raises(Exception) as no_bucket:
        ObjectStore.from_settings(gone).get_bytes("s3://no-such-bucket-here/x.csv")
    assert service_failure(no_bucket.value, gone).startswith(
        "BATCHSCORE_STORE_URL (s3://no-such-bucket-here): "
    )


def _env_example_bounds() -> dict[str, str]:
    from dotenv import dotenv_values

    values = dotenv_values(ROOT / ".env.example", interpolate=False)
    return {k: v for k, v in values.items() if k.startswith(("METAFLOW_S3_", "METAFLOW_DATAT"))}


def test_metaflow_gives_up_on_a_lost_store_within_seconds(tmp_path):
    """The write the issue found hanging (`S3.put`, as `Task.save_metadata` calls it, against
    an endpoint that is gone): with `.env.example`'s bounds Metaflow gives up in seconds
    and names the object; with its defaults it backs off for hours."""
    import json
    import os
    import subprocess
    import sys
    import time

    bounds = _env_example_bounds()
    assert set(bounds) >= {
        "METAFLOW_S3_RETRY_COUNT",
        "METAFLOW_S3_TRANSIENT_RETRY_COUNT",
        "METAFLOW_S3_CLIENT_RETRY_CONFIG",
        "METAFLOW_DATATOOLS_CLIENT_PARAMS",
    }
    for name in ("METAFLOW_S3_CLIENT_RETRY_CONFIG", "METAFLOW_DATATOOLS_CLIENT_PARAMS"):
        json.loads(bounds[name])  # Metaflow reads them as JSON
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_S3_")},
        **bounds,
        "METAFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    script = "from metaflow import S3\nS3(s3root='s3://metaflow/run').put('metadata', 'x')\n"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=100,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("Metaflow still retries S3 after 100 s: the bounds are not in effect")
    seconds = time.monotonic() - started
    assert done.returncode != 0
    assert "S3 operation failed" in done.stderr and "s3://metaflow/run/metadata" in done.stderr
    assert endpoint in done.stderr, done.stderr[-2000:]  # the store it could not reach
    print(f"gave up after {seconds:.0f} s")


def test_metaflows_datastore_lost_mid_run_is_named_after_the_endpoint(settings_for, tmp_path):
    """Metaflow's own S3 error (a step loading an artifact once the store is gone) gets the
    same one-line hint: the endpoint's variable, the one `start` names."""
    from metaflow.metaflow_config import S3_ENDPOINT_URL
    from metaflow.plugins.datatools.s3.s3 import MetaflowS3Exception

    from batchscore.orchestration.preflight import service_failure

    lost = MetaflowS3Exception(
        "S3 operation failed.\nKey requested: s3://metaflow/metaflow/Flow/1/start/1/0.data\n"
        f'Error: Could not connect to the endpoint URL: "{S3_ENDPOINT_URL}/metaflow"'
    )
    same = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path),
            "BATCHSCORE_STORE_URL": "s3://batch",
            "AWS_ENDPOINT_URL_S3": S3_ENDPOINT_URL,
        }
    )
    assert service_failure(lost, same) == (
        f"AWS_ENDPOINT_URL_S3 ({S3_ENDPOINT_URL}): no answer from the endpoint"
    )
    other = settings_for({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"})
    assert service_failure(lost, other).startswith(f"METAFLOW_S3_ENDPOINT_URL ({S3_ENDPOINT_URL})")

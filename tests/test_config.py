"""Settings: embedded defaults under BATCHSCORE_HOME, service URLs, masked description."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchscore.config import Settings, mask_url, project_root

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_resolve_under_an_absolute_home(settings_for, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_for({})
    home = (tmp_path / ".batchscore").resolve()
    assert settings.home == home
    assert settings.home.is_absolute()
    assert settings.resolved_store_url == home.joinpath("store").as_uri()
    assert settings.resolved_store_url.startswith("file:///")
    assert settings.resolved_database_url == f"sqlite:///{home / 'metrics.db'}"
    # An absolute SQLite path needs four slashes: sqlite:////tmp/...
    assert settings.resolved_database_url.startswith("sqlite:////")
    assert settings.embedded_redis_path == home / "redis.db"
    assert settings.redis_url is None
    assert settings.redis_prefix == "predictions"
    assert settings.id_column is None


def test_relative_home_is_made_absolute(settings_for, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_for({"BATCHSCORE_HOME": "sub/dir"})
    assert settings.home == (tmp_path / "sub" / "dir").resolve()
    assert settings.resolved_store_url == (tmp_path / "sub" / "dir" / "store").resolve().as_uri()


def test_explicit_urls_win_over_defaults(settings_for, tmp_path):
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path),
            "BATCHSCORE_STORE_URL": "s3://batch",
            "BATCHSCORE_DATABASE_URL": "postgresql+psycopg2://u:pw@db:5432/metrics",
            "BATCHSCORE_REDIS_URL": "redis://localhost:6379/0",
            "BATCHSCORE_REDIS_PREFIX": "scores",
            "BATCHSCORE_ID_COLUMN": "customer_id",
        }
    )
    assert settings.resolved_store_url == "s3://batch"
    assert settings.resolved_database_url == "postgresql+psycopg2://u:pw@db:5432/metrics"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.redis_prefix == "scores"
    assert settings.id_column == "customer_id"


def test_empty_values_mean_unset(settings_for, tmp_path, monkeypatch):
    # `.env` files often carry `NAME=` lines: an empty value must give the default.
    monkeypatch.chdir(tmp_path)
    settings = settings_for(
        {
            "BATCHSCORE_HOME": "",
            "BATCHSCORE_STORE_URL": "",
            "BATCHSCORE_DATABASE_URL": "",
            "BATCHSCORE_REDIS_URL": "",
            "BATCHSCORE_REDIS_PREFIX": "",
            "BATCHSCORE_ID_COLUMN": "",
            "AWS_ENDPOINT_URL_S3": "",
        }
    )
    home = (tmp_path / ".batchscore").resolve()
    assert settings.home == home
    assert settings.resolved_store_url == (home / "store").as_uri()
    assert settings.resolved_database_url == f"sqlite:///{home / 'metrics.db'}"
    assert settings.redis_url is None
    assert settings.redis_prefix == "predictions"
    assert settings.id_column is None
    assert settings.s3_endpoint_url is None


def test_s3_endpoint_and_credentials_are_read(settings_for, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    settings = settings_for(
        {
            "AWS_ENDPOINT_URL_S3": "http://localhost:9000",
            "AWS_ACCESS_KEY_ID": "minio-user",
            "AWS_SECRET_ACCESS_KEY": "minio-secret",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )
    assert settings.s3_endpoint_url == "http://localhost:9000"
    assert settings.aws_access_key_id == "minio-user"
    assert settings.aws_secret_access_key == "minio-secret"
    assert settings.aws_region == "eu-west-1"


def test_generic_aws_endpoint_is_a_fallback(settings_for, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert settings_for({"AWS_ENDPOINT_URL": "http://minio:9000"}).s3_endpoint_url == (
        "http://minio:9000"
    )


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("BATCHSCORE_REDIS_PREFIX=fromdotenv\nBATCHSCORE_HOME=h\n")
    settings = Settings()
    assert settings.redis_prefix == "fromdotenv"
    assert settings.home == (tmp_path / "h").resolve()


def test_settings_are_frozen(settings_for):
    settings = settings_for({})
    with pytest.raises(ValueError):
        settings.redis_prefix = "other"


@pytest.mark.parametrize(
    ("redis_url", "shown"),
    [
        ("redis://:s3cret-pw@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
        ("rediss://user:s3cret-pw@redis.example:6380/1", "rediss://user:***@redis.example:6380/1"),
        (
            "redis://redis.example:6379/0?password=s3cret-pw",
            "redis://redis.example:6379/0?password=***",
        ),
    ],
)
def test_describe_masks_passwords(settings_for, tmp_path, redis_url, shown):
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path),
            "BATCHSCORE_DATABASE_URL": "postgresql+psycopg2://batch:s3cret-pw@db.example:5432/m",
            "BATCHSCORE_REDIS_URL": redis_url,
        }
    )
    described = settings.describe()
    assert "s3cret-pw" not in str(described)
    assert described["database"] == "postgresql+psycopg2://batch:***@db.example:5432/m"
    assert "redis.example" in described["redis"]
    if shown:
        assert described["redis"] == shown
    assert described["redis prefix"] == "predictions"


def test_describe_embedded(settings_for, tmp_path):
    described = settings_for({"BATCHSCORE_HOME": str(tmp_path)}).describe()
    assert described == {
        "store": (tmp_path / "store").resolve().as_uri(),
        "database": f"sqlite:///{tmp_path.resolve() / 'metrics.db'}",
        "redis": f"embedded ({tmp_path.resolve() / 'redis.db'})",
        "redis prefix": "predictions",
    }


def test_embedded_defaults_are_refused_inside_a_kubernetes_pod(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("METAFLOW_KUBERNETES_WORKLOAD", "1")
    monkeypatch.setenv("BATCHSCORE_STORE_URL", "s3://batch")
    with pytest.raises(ValidationError, match="BATCHSCORE_DATABASE_URL, BATCHSCORE_REDIS_URL"):
        Settings(_env_file=None)
    monkeypatch.setenv("BATCHSCORE_DATABASE_URL", "postgresql+psycopg2://u@db/x")
    monkeypatch.setenv("BATCHSCORE_REDIS_URL", "redis://r:6379/0")
    assert Settings(_env_file=None).redis_url == "redis://r:6379/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6999/0", "redis://127.0.0.1:6999/0"),
        ("redis://:pw@127.0.0.1:6999/0", "redis://:***@127.0.0.1:6999/0"),
        # An empty password is still shown as ***: the reader cannot tell it was empty.
        ("redis://user:@h:1/0", "redis://user:***@h:1/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("postgresql+psycopg2://u:p%40ss@db:5432/x", "postgresql+psycopg2://u:***@db:5432/x"),
        ("redis://h/0?db=1&password=pw", "redis://h/0?db=1&password=***"),
    ],
)
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def make_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return project


def test_project_root_is_found_from_a_sub_folder(tmp_path):
    project = make_project(tmp_path)
    assert project_root(project / "notebooks") == project.resolve()
    assert project_root(project) == project.resolve()
    # Outside any project: the folder itself.
    (tmp_path / "elsewhere").mkdir()
    assert project_root(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()


def test_notebooks_folder_gets_the_projects_home_and_env(tmp_path, monkeypatch):
    # Jupyter runs the kernel in notebooks/: the default home and .env are the project's.
    project = make_project(tmp_path)
    monkeypatch.chdir(project / "notebooks")
    assert Settings().home == (project / ".batchscore").resolve()
    (project / ".env").write_text("BATCHSCORE_REDIS_PREFIX=fromproject\nBATCHSCORE_HOME=./h\n")
    settings = Settings()
    assert settings.redis_prefix == "fromproject"
    # A relative BATCHSCORE_HOME is relative to the project, not to notebooks/.
    assert settings.home == (project / "h").resolve()
    assert settings.embedded_redis_path == (project / "h" / "redis.db").resolve()


def test_env_example_derives_every_copy_of_a_secret(tmp_path, monkeypatch):
    """Settings read from .env.example get the values ${VAR} interpolation derives: each
    secret and port is written once (Compose interpolates the same file the same way)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    project = make_project(tmp_path)
    text = (ROOT / ".env.example").read_text()
    text = text.replace("change-me-minio-secret", "minio-pw-1")
    text = text.replace("change-me-minio", "minio-user-1")
    text = text.replace("change-me-redis", "redis-pw-1").replace("change-me-batchscore-db", "db-1")
    text = text.replace("REDIS_HOST_PORT=6379", "REDIS_HOST_PORT=6380")
    (project / ".env").write_text(text)
    monkeypatch.chdir(project / "notebooks")
    settings = Settings()
    assert settings.aws_access_key_id == "minio-user-1"
    assert settings.aws_secret_access_key == "minio-pw-1"
    assert settings.s3_endpoint_url == "http://localhost:9000"
    assert settings.redis_url == "redis://:redis-pw-1@localhost:6380/0"
    assert (
        settings.database_url == "postgresql+psycopg2://batchscore:db-1@localhost:5432/batchscore"
    )
    assert settings.home == (project / ".batchscore").resolve()


@pytest.mark.parametrize(
    ("environment", "dotenv", "expected"),
    [
        ({}, None, 2),
        ({"BATCHSCORE_STEP_RETRIES": "0"}, "BATCHSCORE_STEP_RETRIES=3\n", 0),
        ({}, "BATCHSCORE_STEP_RETRIES=3\n", 3),
        ({"BATCHSCORE_STEP_RETRIES": ""}, "BATCHSCORE_STEP_RETRIES=1\n", 1),  # empty: unset
        ({"batchscore_step_retries": "4"}, None, 4),  # any letter case, as Settings reads
        ({}, "BATCHSCORE_STEP_RETRIES=\n", 2),
    ],
)
def test_flows_read_step_retries_as_settings_does(
    tmp_path, monkeypatch, environment, dotenv, expected
):
    from batchscore.orchestration.retries import step_retries

    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.upper() == "BATCHSCORE_STEP_RETRIES"]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if dotenv is not None:
        Path(".env").write_text(dotenv)
    assert step_retries() == Settings().step_retries == expected


@pytest.mark.parametrize("value", ["5", "-1", "two"])
def test_bad_step_retries_is_refused_naming_the_variable(tmp_path, monkeypatch, value):
    from batchscore.orchestration.retries import step_retries

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHSCORE_STEP_RETRIES", value)
    with pytest.raises(ValueError, match="BATCHSCORE_STEP_RETRIES"):
        step_retries()
    with pytest.raises(ValueError):
        Settings()

"""Settings from the environment (and an optional `.env`), per the configuration contract.

Every variable is optional: unset, each service falls back to an embedded default under
`BATCHSCORE_HOME`, so the same commands run with no services at all.

`.env` and a relative `BATCHSCORE_HOME` belong to the project, not to the working directory:
Jupyter runs a notebook's kernel in `notebooks/`, a shell may sit in any sub-folder, and all
of them must find the same `.env` and the same embedded home (see `project_root`).
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchscore.project import PROJECT_MARKERS, project_root

__all__ = ["PROJECT_MARKERS", "Settings", "mask_url", "project_root"]


def mask_url(url: str) -> str:
    """`url` with its password, if any, shown as `***`: safe to print or log."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else netloc
    # redis-py also takes the password as a query parameter: ?password=...
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class Settings(BaseSettings):
    """The whole configuration contract; read once per process with `Settings()`."""

    # env_ignore_empty: a `NAME=` line in `.env` means "unset", not "the empty string"
    # (an empty BATCHSCORE_HOME would otherwise put everything in the current folder).
    model_config = SettingsConfigDict(
        env_prefix="BATCHSCORE_",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    def __init__(self, **values: Any) -> None:
        # `.env` of the project, wherever inside it the process runs; `_env_file=None`
        # (the tests) reads none. python-dotenv expands ${VAR} in it, as Compose does.
        values.setdefault("_env_file", project_root() / ".env")
        super().__init__(**values)

    home: Path = Path(".batchscore")
    store_url: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "predictions"
    id_column: str | None = None
    # Metaflow @retry count for the I/O steps; fault tests set 0 to fail fast. The flows
    # read it with `retries.step_retries()` (no pydantic), which honours these bounds.
    step_retries: int = Field(2, ge=0, le=4)  # Metaflow allows at most 4
    # Threads each scoring task gives the models' OpenMP/BLAS pools (unset: the flow sizes
    # them, cores / concurrent tasks; see sizing.py). Set: this value wins.
    scoring_threads: int | None = Field(None, ge=1)
    # Published versions kept in Redis: the live one and the one `rollback` returns to
    # (fewer than 2 would also pull the version from under a reader mid-read).
    keep_versions: int = Field(2, ge=2)

    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str | None = Field(None, validation_alias="AWS_DEFAULT_REGION")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Relative to the project, not the working directory: a notebook in notebooks/
        # must reach the home `make run` filled. Absolute, since Metaflow runs each step in
        # its own process, possibly from another folder.
        return (project_root() / home.expanduser()).resolve()

    @field_validator("store_url", "database_url", "redis_url", "id_column", "s3_endpoint_url")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _services_on_kubernetes(self) -> Settings:
        # A pod's disk dies with it: embedded defaults there would "succeed" and lose
        # every model, record and prediction. Refuse instead.
        if os.environ.get("METAFLOW_KUBERNETES_WORKLOAD"):
            missing = [
                f"BATCHSCORE_{name.upper()}"
                for name in ("store_url", "database_url", "redis_url")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"running on Kubernetes, but {', '.join(missing)} unset: embedded "
                    "defaults would be lost with the pod (add them to METAFLOW_KUBERNETES_SECRETS)"
                )
        return self

    @cached_property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.home / "store").as_uri()

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'metrics.db'}"

    @property
    def embedded_redis_path(self) -> Path:
        return self.home / "redis.db"

    def describe(self) -> dict[str, str]:
        """Where each service lives, credentials masked: safe to print or log."""
        from sqlalchemy.engine import make_url

        redis = mask_url(self.redis_url) if self.redis_url else None
        return {
            "store": self.resolved_store_url,
            "database": make_url(self.resolved_database_url).render_as_string(hide_password=True),
            "redis": redis or f"embedded ({self.embedded_redis_path})",
            "redis prefix": self.redis_prefix,
        }

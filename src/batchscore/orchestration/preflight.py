"""Fail fast: reach every configured service before any work starts, and name the setting.

A wrong `BATCHSCORE_DATABASE_URL` should stop a run in its first second, not after five
models trained. Both flows' `start` steps call `require_services`, the notebook's first cell
`check_services`; a failure is one line a user can act on:

    BATCHSCORE_REDIS_URL (redis://:***@127.0.0.1:6999/0): connection refused
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from batchscore.config import Settings, mask_url

CONNECT_TIMEOUT_SECONDS = 5

# Short, actionable reasons for the messages drivers give (psycopg2, redis-py, botocore);
# None: the matched text itself (its group, if it has one). First match wins.
_REASONS = (
    (r'database "[^"]+" does not exist', None),
    (r"server closed the connection unexpectedly", "the server closed the connection"),
    (r"called without any password configured", "the server has no password: drop it from the URL"),
    (r"connection refused|\berrno 111\b|\berror 111\b", "connection refused"),
    (
        r"name or service not known|could not translate host name|nodename nor servname"
        r"|temporary failure in name resolution|name resolution",
        "unknown host",
    ),
    (r"timed? ?out", "timed out"),
    (r"could not connect to the endpoint url", "no answer from the endpoint"),  # botocore's
    (
        r"password authentication failed|invalid password|wrongpass|authentication required"
        r"|noauth|invalid username-password|auth.* failed|no password supplied",
        "authentication failed (check the password)",
    ),
    (r"connection to server at [^\n]*? failed: ([^\n]+)", None),  # psycopg2, any other cause
)


class ServiceError(RuntimeError):
    """A configured service cannot be used; the message names the variable and masked URL."""

    def __init__(self, variable: str, url: str, reason: str) -> None:
        password = urlsplit(url).password
        if password and password != "***":  # a driver's message must not leak it either
            reason = reason.replace(password, "***")
        self.variable, self.url, self.reason = variable, mask_url(url), reason
        super().__init__(f"{variable} ({self.url}): {reason}")


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the drivers' messages run to several lines."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    for pattern, short in _REASONS:
        if match := re.search(pattern, text):
            return short or match.group(match.lastindex or 0).strip()
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def require_services(settings: Settings) -> None:
    """For a flow's `start`: on a ServiceError print its one line and end the step at once.

    A plain exception would cost a traceback, and a MetaflowException's message is printed
    with every `*` taken as a highlight marker (the `***` of a masked password vanishes).
    Exiting with Metaflow's "do not retry" code fails the task and the run at once, even
    under @retry, with this line as the only error output.
    """
    try:
        check_services(settings)
    except ServiceError as exc:
        from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(METAFLOW_EXIT_DISALLOW_RETRY) from None


def check_services(settings: Settings) -> None:
    """Reach the object store, the database and Redis; raise ServiceError at the first one
    that fails. Embedded defaults are created on first use and need no check."""
    check_store(settings)
    if settings.database_url:
        check_database(settings.database_url)
    if settings.redis_url:
        check_redis(settings)


def check_store(settings: Settings) -> None:
    url = settings.resolved_store_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        folder = Path(unquote(parts.path))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError("BATCHSCORE_STORE_URL", url, exc.strerror or str(exc)) from None
        return
    if parts.scheme != "s3":
        raise ServiceError("BATCHSCORE_STORE_URL", url, "use file:// or s3://")
    from botocore.exceptions import BotoCoreError, ClientError

    from batchscore.storage.object_store import s3_client

    try:
        s3_client(settings).head_bucket(Bucket=parts.netloc)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ServiceError("BATCHSCORE_STORE_URL", url, "no such bucket") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ServiceError(
                "BATCHSCORE_STORE_URL",
                url,
                "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            ) from None
        raise ServiceError("BATCHSCORE_STORE_URL", url, reason(exc)) from None
    except BotoCoreError as exc:
        raise ServiceError(*store_setting(settings, exc), reason(exc)) from None


def store_setting(settings: Settings, exc: BaseException) -> tuple[str, str]:
    """The variable (and its URL) a user must fix when the object store fails with `exc`:
    the S3 endpoint's when the endpoint itself is unreachable (no S3 answer at all), else
    the store's. The start-of-run check and the mid-run hint both name it this way."""
    from botocore.exceptions import ClientError

    answered = any(isinstance(e, ClientError) for e in _chain(exc))
    if settings.s3_endpoint_url and not answered:
        return "AWS_ENDPOINT_URL_S3", settings.s3_endpoint_url
    return "BATCHSCORE_STORE_URL", settings.resolved_store_url


def check_database(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ServiceError("BATCHSCORE_DATABASE_URL", url, str(exc)) from None
    if parsed.get_backend_name() == "sqlite":
        return  # a file, created on first use
    shown = parsed.render_as_string(hide_password=True)
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS} if "psycopg" in url else {}
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (ArgumentError, ImportError) as exc:
        raise ServiceError("BATCHSCORE_DATABASE_URL", shown, str(exc)) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except SQLAlchemyError as exc:
        raise ServiceError("BATCHSCORE_DATABASE_URL", shown, reason(exc)) from None
    finally:
        engine.dispose()


def check_redis(settings: Settings) -> None:
    """PING the configured Redis (or any node of a cluster) through the one connection
    factory, with the short waits of its `check` policy."""
    import redis

    from batchscore.online.connection import connect

    url = settings.redis_url or ""
    try:
        client = connect(settings, "check")
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise ServiceError("BATCHSCORE_REDIS_URL", url, reason(exc)) from None
    client.close()


# Errors a service raises mid-run, by the module defining them, and the setting behind it.
_SERVICE_ERRORS = (
    ("redis.", "BATCHSCORE_REDIS_URL"),
    ("sqlalchemy.", "BATCHSCORE_DATABASE_URL"),
    ("psycopg2", "BATCHSCORE_DATABASE_URL"),
    ("botocore.", "BATCHSCORE_STORE_URL"),
    ("metaflow.plugins.datatools.s3.", "METAFLOW_S3_ENDPOINT_URL"),  # Metaflow's datastore
)


def service_failure(exc: BaseException, settings: Settings | None = None) -> str | None:
    """One line naming the setting (and masked URL) behind a service error met after
    `start`'s checks passed, such as Redis going away mid-write; None for any other error."""
    for error in _chain(exc):
        module = type(error).__module__ + "."
        variable = next((v for prefix, v in _SERVICE_ERRORS if module.startswith(prefix)), None)
        if variable:
            settings = settings or Settings()
            if variable == "BATCHSCORE_STORE_URL":
                return _named(*store_setting(settings, error), error)
            if variable == "METAFLOW_S3_ENDPOINT_URL":
                return _named(*datastore_setting(settings), error)
            url = {
                "BATCHSCORE_REDIS_URL": settings.redis_url,
                "BATCHSCORE_DATABASE_URL": settings.resolved_database_url,
                "BATCHSCORE_STORE_URL": settings.resolved_store_url,
            }[variable]
            return _named(variable, url, error)
    return None


def datastore_setting(settings: Settings) -> tuple[str, str]:
    """The variable to fix when Metaflow's S3 datastore stops answering: the endpoint's.
    When Metaflow uses the store's own endpoint (as `.env.example` and Compose set it), that
    is AWS_ENDPOINT_URL_S3, the name `start` and the store's errors use too."""
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3, S3_ENDPOINT_URL

    if S3_ENDPOINT_URL and settings.s3_endpoint_url == S3_ENDPOINT_URL:
        return "AWS_ENDPOINT_URL_S3", S3_ENDPOINT_URL
    if S3_ENDPOINT_URL:
        return "METAFLOW_S3_ENDPOINT_URL", S3_ENDPOINT_URL
    return "METAFLOW_DATASTORE_SYSROOT_S3", DATASTORE_SYSROOT_S3 or "s3://"


def redis_error(settings: Settings, exc: BaseException) -> str:
    """A Redis failure met later (CLI, notebook), named after its setting like the checks."""
    return _named("BATCHSCORE_REDIS_URL", settings.redis_url, exc)


def _named(variable: str, url: str | None, exc: BaseException) -> str:
    where = mask_url(url) if url else "embedded"
    return f"{variable} ({where}): {reason(exc)}"

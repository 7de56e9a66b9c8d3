"""The one way to reach Redis: a client for `BATCHSCORE_REDIS_URL`, or the embedded server."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from batchscore.config import Settings
from batchscore.online.embedded_redis import ensure_server

if TYPE_CHECKING:  # pandas and the table readers cost every batch-flow step 0.3 s to import
    pass

log = logging.getLogger(__name__)


def connect(settings: Settings) -> redis.Redis:
    """A client for `BATCHSCORE_REDIS_URL`, or the embedded Redis when none is set.

    Connection errors are retried with jittered backoff; every write is idempotent
    (SET of a key, HSET of a shard's count), so replaying a pipeline is safe.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=5)
    errors = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    if settings.redis_url:
        return redis.Redis.from_url(
            settings.redis_url,
            retry=retry,
            retry_on_error=errors,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
    socket = ensure_server(settings.embedded_redis_path)
    return redis.Redis(unix_socket_path=str(socket), retry=retry, retry_on_error=errors)

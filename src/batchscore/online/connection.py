"""The one way to reach Redis: clients for `BATCHSCORE_REDIS_URL`, or the embedded server.

One Redis or a Redis Cluster: a plain `redis://` URL of any node works, and cluster mode
is detected here (`INFO cluster`), once per URL and process. One timeout policy, by use:

    batch    writes and operations: waits up to 30 s, retried with jittered backoff
             (every write is idempotent, so replaying a pipeline is safe)
    service  the HTTP service: 1 s, one quick retry, then an error (a 503)
    check    the start-of-run check: 5 s to connect, 10 s to answer, no retry
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from batchscore.config import Settings

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aredis

log = logging.getLogger(__name__)

Use = Literal["batch", "service", "check"]


@dataclass(frozen=True)
class Policy:
    connect_timeout: float
    socket_timeout: float
    retries: int
    backoff: bool  # jittered exponential backoff between retries (else none)


POLICIES: dict[str, Policy] = {
    "batch": Policy(connect_timeout=5, socket_timeout=30, retries=5, backoff=True),
    "service": Policy(connect_timeout=1, socket_timeout=1, retries=1, backoff=False),
    "check": Policy(connect_timeout=5, socket_timeout=10, retries=0, backoff=False),
}


def _options(policy: Policy, asyncio: bool = False) -> dict[str, Any]:
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

    if asyncio:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    backoff = ExponentialWithJitterBackoff(base=0.1, cap=2.0) if policy.backoff else NoBackoff()
    return {
        "socket_connect_timeout": policy.connect_timeout,
        "socket_timeout": policy.socket_timeout,
        "retry": Retry(backoff, policy.retries),
    }


def _retry_on(options: dict[str, Any]) -> dict[str, Any]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    errors = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    return {**options, "retry_on_error": errors}


@functools.lru_cache(maxsize=16)
def is_cluster(url: str) -> bool:
    """Whether the Redis at `url` is a node of a Redis Cluster (`cluster_enabled:1`)."""
    import redis

    policy = POLICIES["check"]
    client = redis.Redis.from_url(
        url, socket_connect_timeout=policy.connect_timeout, socket_timeout=policy.socket_timeout
    )
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:  # INFO renamed or refused (a managed service's ACL): one Redis
        return False
    finally:
        client.close()


def _cluster_url(url: str) -> str:
    """A cluster has only database 0: `/0` is accepted, and a path naming another refused."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(
            f"BATCHSCORE_REDIS_URL names database {parts.path.strip('/')}, but a Redis "
            "Cluster has only database 0: drop the path"
        )
    return urlunsplit(parts._replace(path=""))


class HiredisPacker:
    """Packs a command as redis-py's hiredis packer does, minus its per-argument pass
    (a new tuple, an isinstance check per argument): hiredis is called on the arguments
    as they are, and only what it refuses (a bytearray, a wrong type) goes through
    redis-py's own packer, which converts it or raises its own error.

    The batch writer sends two arguments a row, so that pass cost as much as packing:
    `benchmarks/bench_write.py --keys 1000000 --models champion`, medians of 3, two runs
    each: 526k-564k rows/s and 2.13-2.29 CPU-s (client + Redis) with redis-py's packer,
    645k-668k rows/s and 1.81-1.90 CPU-s with this one (1.2x). Given to redis-py through
    its `command_packer` connection argument."""

    def __init__(self) -> None:
        import hiredis  # imported by the client that uses it, not by every step

        self._pack = hiredis.pack_command

    def pack(self, *args: Any) -> list[bytes]:
        command = args[0]  # "CLIENT SETINFO": redis-py names some commands in two words
        if (" " if isinstance(command, str) else b" ") in command:
            args = (*command.split(), *args[1:])
        try:
            return [self._pack(args)]
        except TypeError:
            from redis.connection import HiredisRespSerializer

            return HiredisRespSerializer().pack(*args)


@functools.cache
def _packing_connection() -> type:
    """A `redis.Connection` with `HiredisPacker` (a cluster client takes a connection
    class, not packer arguments)."""
    import redis

    class PackingConnection(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(command_packer=HiredisPacker(), **kwargs)

    return PackingConnection


def connect(settings: Settings, use: Use = "batch") -> redis.Redis:
    """A client for `BATCHSCORE_REDIS_URL` (a `RedisCluster` on a cluster node), or for
    the embedded Redis when none is set; its timeouts and retries follow `use`."""
    import redis
    from redis.cluster import RedisCluster

    options = _options(POLICIES[use])
    if use == "batch":
        options = _retry_on(options)
    if settings.redis_url:
        if is_cluster(settings.redis_url):
            return RedisCluster.from_url(
                _cluster_url(settings.redis_url), connection_class=_packing_connection(), **options
            )
        url = settings.redis_url
    else:
        from urllib.parse import quote

        from batchscore.online.embedded_redis import ensure_server

        url = f"unix://{quote(str(ensure_server(settings.embedded_redis_path)))}"
    return redis.Redis.from_url(
        url, health_check_interval=30, command_packer=HiredisPacker(), **options
    )


def connect_async(settings: Settings, use: Use = "service") -> aredis.Redis:
    """The asyncio client of `connect` (the HTTP service reads on its event loop)."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster

    options = _options(POLICIES[use], asyncio=True)
    if settings.redis_url:
        if is_cluster(settings.redis_url):
            return RedisCluster.from_url(_cluster_url(settings.redis_url), **options)
        return aredis.Redis.from_url(settings.redis_url, **options)
    from batchscore.online.embedded_redis import ensure_server

    socket = ensure_server(settings.embedded_redis_path)
    return aredis.Redis(unix_socket_path=str(socket), **options)


def cluster_mode(client: Any) -> bool:
    """Whether `client` (sync or asyncio) talks to a Redis Cluster."""
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncCluster)

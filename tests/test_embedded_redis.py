"""The embedded Redis: one real server per BATCHSCORE_HOME, shared, durable, stoppable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from batchscore.online.embedded_redis import _paths, ensure_server, stop_server


@pytest.fixture
def db_path(home: Path) -> Path:
    return home / "redis.db"  # the `home` fixture stops this server after the test


def _client(socket: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(socket), socket_timeout=5)


def _server_pid(socket: Path) -> int:
    client = _client(socket)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def test_ensure_server_twice_is_one_server(db_path):
    first = ensure_server(db_path)
    second = ensure_server(db_path)
    assert first == second
    assert first.exists()
    pid = int((db_path.parent / "redis.pid").read_text())
    assert _server_pid(first) == pid
    assert _server_pid(second) == pid
    assert (db_path.parent / "redis.log").read_text().count("Redis is starting") == 1


def test_server_listens_only_on_its_socket(db_path):
    socket = ensure_server(db_path)
    client = _client(socket)
    try:
        assert client.config_get("port")["port"] == "0"
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        client.close()


def test_data_survives_stop_and_restart(db_path):
    socket = ensure_server(db_path)
    client = _client(socket)
    client.set("predictions:current", "v1")
    client.hset("predictions:manifest:v1", mapping={"model": "svc", "shard:0": 3})
    client.close()
    old_pid = _server_pid(socket)

    assert stop_server(db_path) is True
    assert not (db_path.parent / "redis.pid").exists()
    assert stop_server(db_path) is False  # nothing left to stop

    socket = ensure_server(db_path)
    assert _server_pid(socket) != old_pid
    client = _client(socket)
    try:
        assert client.get("predictions:current") == b"v1"
        assert client.hgetall("predictions:manifest:v1") == {b"model": b"svc", b"shard:0": b"3"}
    finally:
        client.close()


def test_stop_without_a_server(tmp_path):
    assert stop_server(tmp_path / "never-started" / "redis.db") is False


def test_concurrent_processes_share_one_server(db_path):
    script = textwrap.dedent(
        f"""
        import redis
        from pathlib import Path
        from batchscore.online.embedded_redis import ensure_server

        socket = ensure_server(Path({str(db_path)!r}))
        client = redis.Redis(unix_socket_path=str(socket))
        client.incr("starts")
        print(socket, client.info("server")["process_id"])
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert len({tuple(o) for o in outputs}) == 1, outputs  # same socket, same server pid
    socket = Path(outputs[0][0])
    assert _server_pid(socket) == int(outputs[0][1])
    client = _client(socket)
    try:
        assert client.get("starts") == b"3"
    finally:
        client.close()
    assert (db_path.parent / "redis.log").read_text().count("Redis is starting") == 1


def test_deep_home_gets_a_short_socket(tmp_path):
    # Unix socket paths are limited to ~107 bytes: a deep BATCHSCORE_HOME must still work.
    db_path = tmp_path / ("d" * 60) / ("e" * 60) / "home" / "redis.db"
    socket, pidfile, _ = _paths(db_path)
    assert len(str(socket)) <= 100
    assert pidfile.parent == db_path.parent
    try:
        assert ensure_server(db_path) == socket
        client = _client(socket)
        assert client.ping()
        client.close()
        assert socket.parent.stat().st_mode & 0o777 == 0o700
    finally:
        stop_server(db_path)
        if socket.parent.exists():
            socket.parent.rmdir()  # redis-server removed its socket on shutdown


def test_a_stale_pidfile_naming_another_process_is_never_signalled(db_path):
    # The server died without cleaning up and its pid now belongs to some other process.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        (db_path.parent / "redis.pid").write_text(f"{other.pid}\n")
        assert stop_server(db_path) is False
        assert other.poll() is None  # not signalled
        socket = ensure_server(db_path)  # starts a real server instead of trusting the file
        assert _server_pid(socket) != other.pid
        assert _client(socket).ping()
        assert stop_server(db_path) is True
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()

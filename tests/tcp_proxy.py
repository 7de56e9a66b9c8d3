"""A small TCP proxy the fault tests can cut, so they never stop the shared servers."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream server until told to fail.

    - `cut()`: drop every open connection and refuse new ones (the server "dies").
    - `restore()`: accept connections again.
    - `fail_after(n)`: cut once `n` more bytes went upstream (dies mid-write).
    - `blip_after(n)`: the same, then refuse one reconnection and accept the next (a short
      outage that ends on a condition, not on a timer racing the client's backoff).
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._down = False
        self._budget: int | None = None
        self._refusals_left: int | None = None  # refuse this many, then restore
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str, rest: str = "") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{rest}"

    def cut(self) -> None:
        with self._lock:
            self._down = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        with self._lock:
            self._down = False
            self._budget = None

    def fail_after(self, upstream_bytes: int) -> None:
        with self._lock:
            self._budget = upstream_bytes

    def blip_after(self, upstream_bytes: int, refusals: int = 1) -> None:
        with self._lock:
            self._budget = upstream_bytes
            self._refusals_left = refusals

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
                if down and self._refusals_left is not None:
                    self._refusals_left -= 1
                    if self._refusals_left < 0:  # refused enough: back up
                        self._down, self._budget, self._refusals_left = False, None, None
                        down = False
            if down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream:
                    with self._lock:
                        if self._budget is not None:
                            self._budget -= len(data)
                            exhausted = self._budget <= 0
                        else:
                            exhausted = False
                    if exhausted:
                        self.cut()
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.close()


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

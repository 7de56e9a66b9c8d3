"""`/docs` renders with no internet: a real headless Chromium loads the page from the real
server, with every host name but 127.0.0.1 unresolvable (a CDN cannot answer), and
Swagger UI must draw the API's operations.

Needs Debian's `chromium` (`.ci/run` installs it): without it the test skips, or fails
under REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.services

REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"
# The HTTP contract's operations, as Swagger UI lists them once it has rendered.
OPERATIONS = [
    "/v1/predictions/{row_key}",
    "/v1/predictions:batchGet",
    "/v1/predictions:lookup",
    "/v1/status",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "no chromium on PATH (apt-get install -y chromium)"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (REQUIRE_SERVICES=1)")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def service(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[str]:
    """`python -m batchscore serve` on a free port; its base URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")} | {
        "BATCHSCORE_REDIS_URL": redis_url,
        "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        "BATCHSCORE_HOME": str(tmp_path / "home"),
    }
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "batchscore", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,  # no developer .env is read
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with no way out."""
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Offline: every name but the server's address fails to resolve, so a page
            # that needs a CDN stays blank here as it would on a machine without internet.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",  # let the scripts fetch /openapi.json and draw
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_docs_render_offline(service, tmp_path):
    dom = _dom(f"{service}/docs", tmp_path / "chromium-profile")
    # Swagger UI drew the API: its title and every operation of the HTTP contract.
    assert 'class="title">batchscore predictions' in dom, dom[-3000:]
    for path in OPERATIONS:
        assert f'data-path="{path}"' in dom, path
    assert "Failed to load API definition" not in dom
    page = httpx.get(f"{service}/docs")
    assert "cdn." not in page.text and "https://" not in page.text  # nothing from outside


def test_docs_assets_are_served_by_the_service(service):
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        answer = httpx.get(f"{service}/docs/assets/{asset}")
        assert answer.status_code == 200 and len(answer.content) > 500, asset
    assert httpx.get(f"{service}/docs/oauth2-redirect").status_code == 200
    assert httpx.get(f"{service}/docs/assets/no-such-file.js").status_code == 404

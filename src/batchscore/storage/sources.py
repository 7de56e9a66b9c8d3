"""Where a batch input's bytes live: the files it names, their sizes, and byte ranges of them.

An input is a local path (a file, a directory or a glob), a `file://` URL, an `s3://`
object, prefix or glob, or an `http(s)://` URL (with basic-auth user info if the server
needs it). Every read is a range: a scoring task reads its own slice of a file, never
the whole input, and nothing is copied to a scratch file first.
"""

from __future__ import annotations

import base64
import fnmatch
import glob
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from batchscore.rows.errors import InputError

if TYPE_CHECKING:
    from batchscore.config import Settings

_BUFFER = 256 << 10  # a remote read asks for at least this much (fewer small requests)
HTTP_TIMEOUT_SECONDS = 30  # per request: a stalled server fails the read, never hangs it
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".txt")
_WILDCARD = re.compile(r"[*?\[]")


def masked(uri: str) -> str:
    """`uri` safe to print, log or record: user info and query string hidden (a password,
    a presigned URL's signature)."""
    parts = urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))


@dataclass(frozen=True)
class SourceFile:
    """One file of an input: its URI (as the user gave it, credentials included; shown
    only through `masked`) and its size in bytes."""

    uri: str
    size: int

    @property
    def shown(self) -> str:
        return masked(self.uri)


def list_files(source: str, settings: Settings) -> list[SourceFile]:
    """The files an input names, in a stable (sorted) order: one file, the table files of a
    directory or `s3://` prefix (recursively: Hive-style `date=.../` folders), or those a
    glob matches. Files whose names start with `_` or `.` (`_SUCCESS`, `.crc`) are skipped."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        return [SourceFile(source, _http_size(source))]
    if parts.scheme == "s3":
        return _s3_files(source, settings)
    path = unquote(parts.path) if parts.scheme == "file" else source
    if _WILDCARD.search(path):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
        files = sorted(p for p in found if p.is_file() and _is_table(p.name))
        if not files:
            raise InputError(f"{source}: no CSV or Parquet file matches")
        return [SourceFile(str(p), p.stat().st_size) for p in files]
    base = Path(path)
    if base.is_dir():
        files = sorted(p for p in base.rglob("*") if p.is_file() and _is_table(p.name))
        files = [p for p in files if not _hidden(p.relative_to(base).parts)]
        if not files:
            raise InputError(f"{source}: the directory holds no CSV or Parquet file")
        return [SourceFile(str(p), p.stat().st_size) for p in files]
    if not base.is_file():
        raise InputError(f"{source}: no such file")
    return [SourceFile(source, base.stat().st_size)]


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(("_", ".")) for part in parts)


def _is_table(name: str) -> bool:
    return not name.startswith(("_", ".")) and name.lower().endswith(TABLE_SUFFIXES)


def _s3_files(source: str, settings: Settings) -> list[SourceFile]:
    from batchscore.storage.object_store import s3_client

    parts = urlsplit(source)
    bucket, key = parts.netloc, unquote(parts.path).lstrip("/")
    client = s3_client(settings)
    wildcard = _WILDCARD.search(key)
    prefix = key[: wildcard.start()] if wildcard else key
    try:
        if not wildcard and key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                return [SourceFile(source, int(head["ContentLength"]))]
            except Exception as exc:  # 404: perhaps a prefix; anything else: named below
                if _status(exc) not in (403, 404):
                    raise
            prefix = key + "/"
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"]
                if wildcard and not fnmatch.fnmatchcase(name, key):
                    continue
                if _is_table(name.rsplit("/", 1)[-1]) and not _hidden(
                    tuple(name[len(prefix) :].split("/"))
                ):
                    found.append(SourceFile(f"s3://{bucket}/{name}", int(item["Size"])))
    except Exception as exc:
        raise InputError(f"{masked(source)}: cannot read: {exc}") from exc
    if not found:
        raise InputError(f"{masked(source)}: no such file, and no CSV or Parquet file under it")
    return sorted(found, key=lambda f: f.uri)


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None) or {}
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(code) if code else None


# ----------------------------------------------------------------------------- reading


def open_source(file: SourceFile, settings: Settings) -> BinaryIO:
    """A seekable binary file over `file`; remote reads are range requests of what is read."""
    parts = urlsplit(file.uri)
    if parts.scheme in ("http", "https"):
        return io.BufferedReader(RangeReader(file, _http_fetch(file.uri)), _BUFFER)
    if parts.scheme == "s3":
        return io.BufferedReader(RangeReader(file, _s3_fetch(file.uri, settings)), _BUFFER)
    path = unquote(parts.path) if parts.scheme == "file" else file.uri
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise InputError(f"{file.uri}: cannot read: {exc}") from exc


class RangeReader(io.RawIOBase):
    """A remote object as a seekable raw file: each read is one range request.

    `requested` counts the bytes asked for, so a benchmark can show that the tasks of a
    run read the input about once between them; `total_requested` adds up every reader's.
    """

    total_requested = 0

    def __init__(self, file: SourceFile, fetch) -> None:
        self.file, self._fetch, self._position = file, fetch, 0
        self.requested = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.file.size}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer) -> int:
        end = min(self.file.size, self._position + len(buffer))
        if end <= self._position:
            return 0
        data = self._fetch(self._position, end)
        self.requested += end - self._position
        RangeReader.total_requested += end - self._position
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _s3_fetch(uri: str, settings: Settings):
    from batchscore.storage.object_store import s3_client

    parts = urlsplit(uri)
    bucket, key = parts.netloc, unquote(parts.path).lstrip("/")
    client = s3_client(settings)

    def fetch(start: int, end: int) -> bytes:
        try:
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            return response["Body"].read()
        except Exception as exc:
            raise InputError(f"{uri}: cannot read bytes {start}-{end - 1}: {exc}") from exc

    return fetch


def http_request(uri: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """A urllib request for `uri`: its user info (if any) sent as basic auth, not as part
    of the host name; the caller opens it with `HTTP_TIMEOUT_SECONDS`."""
    import urllib.request

    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    request = urllib.request.Request(
        urlunsplit(parts._replace(netloc=netloc)), headers=headers or {}, method=method
    )
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def http_error(uri: str, exc: Exception) -> InputError:
    # urllib's messages can repeat the URL: never show its credentials.
    text = str(exc)
    parts = urlsplit(uri)
    for secret in (parts.password, parts.username, parts.query):
        if secret:
            text = text.replace(secret, "***")
    return InputError(f"{masked(uri)}: cannot download: {text}")


def _http_size(uri: str) -> int:
    import urllib.request

    try:
        request = http_request(uri, {"Range": "bytes=0-0"})
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:  # noqa: S310
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if response.status == 206 and total.isdigit():
                return int(total)
            length = response.headers.get("Content-Length")
            if length is None:
                raise InputError(f"{masked(uri)}: the server gives no size for the file")
            return int(length)
    except InputError:
        raise
    except Exception as exc:
        raise http_error(uri, exc) from exc


def _http_fetch(uri: str):
    import urllib.request

    def fetch(start: int, end: int) -> bytes:
        try:
            request = http_request(uri, {"Range": f"bytes={start}-{end - 1}"})
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:  # noqa: S310
                if response.status == 206:
                    return response.read()
                # No range support: stream past what comes before the range.
                skipped = 0
                while skipped < start:
                    chunk = response.read(min(1 << 20, start - skipped))
                    if not chunk:
                        break
                    skipped += len(chunk)
                return response.read(end - start)
        except InputError:
            raise
        except Exception as exc:
            raise http_error(uri, exc) from exc

    return fetch

"""Where a batch input's bytes live: the files it names, their sizes, and byte ranges of them.

An input is a local path (a file, a directory or a glob), a `file://` URL, an `s3://`
object, prefix or glob, or an `http(s)://` URL (with basic-auth user info if the server
needs it). Every read is a range: a scoring task reads its own slice of a file, never
the whole input, and nothing is copied to a scratch file first.

An input may name environment variables as `${NAME}` (`https://${SRC_USER}:${SRC_PASSWORD}@
host/x.csv`, `${SIGNED_URL}`): `resolve` expands them only where the input is opened, so
Metaflow's parameters and artifacts, the manifest, the card and the logs hold the template,
never the credentials.
"""

from __future__ import annotations

import base64
import fnmatch
import glob
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from batchscore.rows.errors import InputError

if TYPE_CHECKING:
    from batchscore.config import Settings

_BUFFER = 256 << 10  # a remote read asks for at least this much (fewer small requests)
HTTP_TIMEOUT_SECONDS = 30  # per request: a stalled server fails the read, never hangs it
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".txt")
_WILDCARD = re.compile(r"[*?\[]")


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Query parameters that carry a credential: presigned S3/GCS URLs, Azure SAS, tokens, keys.
_SECRET_PARAMETER = re.compile(r"sig|signature|token|credential|secret|password|key", re.I)


def masked(uri: str) -> str:
    """`uri` safe to print, log or record: user info and query string hidden (a password,
    a presigned URL's signature), unless they only name environment variables (`${NAME}`)."""
    parts = urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host = netloc.rsplit("@", 1)
        netloc = netloc if _only_variables(user_info, ":") else "***@" + host
    query = parts.query
    if query and not all(_only_variables(v) for _, v in parse_qsl(query, True)):
        query = "***"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _only_variables(text: str, separators: str = "") -> bool:
    """Whether `text` is made of `${NAME}` references (and `separators`) alone."""
    rest = _VARIABLE.sub("", text)
    return bool(text) and not rest.strip(separators)


def variables(uri: str) -> list[str]:
    """The environment variables an input names as `${NAME}`, in order, once each."""
    return list(dict.fromkeys(_VARIABLE.findall(uri)))


def unset_variables(uri: str) -> list[str]:
    """The environment variables an input names that are not set here."""
    return [name for name in variables(uri) if name not in os.environ]


def resolve(uri: str) -> str:
    """The input to open: each `${NAME}` replaced by environment variable NAME (a value in
    the user info percent-encoded, so a password may hold `@`, `:` or `/`). Called only
    where an input is opened: everything recorded or shown keeps the template."""
    if "${" not in uri:
        return uri
    missing = unset_variables(uri)
    if missing:
        raise InputError(
            f"{masked(uri)}: environment variable {missing[0]} is not set (the input names "
            f"it as ${{{missing[0]}}})"
        )
    user_info = _user_info_span(uri)

    def value(match: re.Match[str]) -> str:
        found = os.environ[match.group(1)]
        inside = user_info and user_info[0] <= match.start() < user_info[1]
        return quote(found, safe="") if inside else found

    return _VARIABLE.sub(value, uri)


def _user_info_span(uri: str) -> tuple[int, int] | None:
    """Where a URL's user info lies in its text (`${NAME}` references unexpanded)."""
    start = uri.find("://")
    if start < 0:
        return None
    start += 3
    end = uri.find("/", start)
    authority = uri[start : end if end >= 0 else len(uri)]
    at = authority.rfind("@")
    return (start, start + at) if at >= 0 else None


def credentials_in(uri: str) -> str | None:
    """What in `uri` looks like a credential written out (not named as `${NAME}`): its user
    info, or a query parameter such as a presigned URL's signature; None when nothing."""
    parts = urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        return None
    if "@" in parts.netloc and not _only_variables(parts.netloc.rsplit("@", 1)[0], ":"):
        return "user info (user:password@)"
    for name, value in parse_qsl(parts.query, True):
        if _SECRET_PARAMETER.search(name) and value and not _only_variables(value):
            return f"the query parameter {name!r}"
    return None


def _secrets(uri: str) -> list[str]:
    """The values of the variables `uri` names, as written and percent-encoded."""
    found = [os.environ.get(name, "") for name in variables(uri)]
    return [v for value in found if value for v in dict.fromkeys((value, quote(value, safe="")))]


@dataclass(frozen=True)
class SourceFile:
    """One file of an input: its URI (as the user gave it: `${NAME}` references unexpanded,
    credentials written out included, shown only through `masked`) and its size in bytes."""

    uri: str
    size: int

    @property
    def shown(self) -> str:
        return masked(self.uri)


def list_files(source: str, settings: Settings) -> list[SourceFile]:
    """The files an input names, in a stable (sorted) order: one file, the table files of a
    directory or `s3://` prefix (recursively: Hive-style `date=.../` folders), or those a
    glob matches. Files whose names start with `_` or `.` (`_SUCCESS`, `.crc`) are skipped."""
    parts = urlsplit(resolve(source))  # `${SIGNED_URL}`: its scheme is the value's
    if parts.scheme in ("http", "https"):
        return [SourceFile(source, _http_size(source))]
    if parts.scheme == "s3":
        return _s3_files(source, settings)
    # A file:// URL's files are named by their paths (a local path holds no credential).
    given = unquote(parts.path) if parts.scheme == "file" else source
    path = resolve(given)
    if _WILDCARD.search(path):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
        files = sorted(p for p in found if p.is_file() and _is_table(p.name))
        if not files:
            raise InputError(f"{source}: no CSV or Parquet file matches")
        return [SourceFile(_as_given(given, str(p)), p.stat().st_size) for p in files]
    base = Path(path)
    if base.is_dir():
        files = sorted(p for p in base.rglob("*") if p.is_file() and _is_table(p.name))
        files = [p for p in files if not _hidden(p.relative_to(base).parts)]
        if not files:
            raise InputError(f"{source}: the directory holds no CSV or Parquet file")
        return [SourceFile(_as_given(given, str(p)), p.stat().st_size) for p in files]
    if not base.is_file():
        raise InputError(f"{source}: no such file")
    return [SourceFile(source, base.stat().st_size)]


def _as_given(given: str, found: str) -> str:
    """A listed file named under the input's own `${NAME}` template where it can be (the
    template up to its first wildcard, resolved, begins the file's name), so that the plan
    Metaflow records holds no expanded value."""
    if "${" not in given:
        return found
    wildcard = _WILDCARD.search(given)
    base = given[: wildcard.start()] if wildcard else given
    opened = resolve(base)
    return base + found[len(opened) :] if found.startswith(opened) else found


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(("_", ".")) for part in parts)


def _is_table(name: str) -> bool:
    return not name.startswith(("_", ".")) and name.lower().endswith(TABLE_SUFFIXES)


def _s3_files(source: str, settings: Settings) -> list[SourceFile]:
    from batchscore.storage.object_store import s3_client

    parts = urlsplit(resolve(source))
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
                    named = _as_given(source, f"s3://{bucket}/{name}")
                    found.append(SourceFile(named, int(item["Size"])))
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
    opened = resolve(file.uri)
    parts = urlsplit(opened)
    if parts.scheme in ("http", "https"):
        return io.BufferedReader(RangeReader(file, _http_fetch(file.uri)), _BUFFER)
    if parts.scheme == "s3":
        return io.BufferedReader(RangeReader(file, _s3_fetch(file.uri, settings)), _BUFFER)
    path = unquote(parts.path) if parts.scheme == "file" else opened
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise InputError(f"{file.shown}: cannot read: {exc}") from exc


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

    parts = urlsplit(resolve(uri))
    bucket, key = parts.netloc, unquote(parts.path).lstrip("/")
    client = s3_client(settings)

    def fetch(start: int, end: int) -> bytes:
        try:
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            return response["Body"].read()
        except Exception as exc:
            raise InputError(f"{masked(uri)}: cannot read bytes {start}-{end - 1}: {exc}") from exc

    return fetch


def http_request(uri: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """A urllib request for `uri` (`${NAME}` references resolved): its user info (if any)
    sent as basic auth, not as part of the host name; the caller opens it with
    `HTTP_TIMEOUT_SECONDS`."""
    import urllib.request

    parts = urlsplit(resolve(uri))
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
    """The error of a failed download of `uri` (as given: a template stays one), without
    its credentials: urllib's messages can repeat the URL."""
    text = str(exc)
    if "${" in uri:
        opened = resolve(uri)
        text = text.replace(opened, uri)
        for secret in _secrets(uri):
            text = text.replace(secret, "***")
    parts = urlsplit(uri)
    for secret in (parts.password, parts.username, parts.query):
        if secret and not _only_variables(secret):
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

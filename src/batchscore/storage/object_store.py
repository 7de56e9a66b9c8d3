"""Object store for data, models and plots: a `file://` folder (embedded) or `s3://` (MinIO, AWS).

Objects are addressed by a key relative to the store root (`models/run/svc.joblib`) and
reported as full URIs, so the database can record exactly where each artifact lives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from batchscore.config import Settings


class StoreError(RuntimeError):
    """An object could not be read or written; the message names the object."""


class ObjectStore(ABC):
    """Common interface; `ObjectStore.from_settings()` picks the backend from the URL."""

    root: str

    @staticmethod
    def from_settings(settings: Settings) -> ObjectStore:
        return ObjectStore.from_url(settings.resolved_store_url, settings)

    @staticmethod
    def from_url(url: str, settings: Settings | None = None) -> ObjectStore:
        scheme = urlparse(url).scheme
        if scheme == "file":
            return LocalStore(url)
        if scheme == "s3":
            return S3Store(url, settings or Settings())
        raise StoreError(f"unsupported store URL {url!r}: use file:// or s3://")

    @staticmethod
    def read_uri(uri: str, settings: Settings | None = None) -> bytes:
        """The bytes at a full `file://` or `s3://` URI, whichever store wrote it."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return LocalStore("file:///").get_bytes(unquote(parsed.path))
        if parsed.scheme == "s3":
            return S3Store(f"s3://{parsed.netloc}", settings or Settings()).get_bytes(uri)
        raise StoreError(f"unsupported object URI {uri!r}: use file:// or s3://")

    def _base(self) -> str:
        root = self.root.rstrip("/")
        # The filesystem root `file:///` must not collapse to `file:`.
        return root + "//" if root.endswith(":") else root

    def uri(self, key: str) -> str:
        return f"{self._base()}/{key.lstrip('/')}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store (a bare key passes through)."""
        prefix = self._base() + "/"
        if "://" not in uri:
            return uri.lstrip("/")
        if not uri.startswith(prefix):
            raise StoreError(f"{uri} is not inside the store {self.root}")
        return uri[len(prefix) :]

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str: ...

    @abstractmethod
    def put_stream(self, key: str, fill: Callable[[BinaryIO], object]) -> str:
        """Write an object by letting `fill` write into it, never as one bytes object in memory."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> str: ...

    @abstractmethod
    def get_bytes(self, key_or_uri: str) -> bytes: ...

    @abstractmethod
    def exists(self, key_or_uri: str) -> bool: ...

    @abstractmethod
    def delete(self, key_or_uri: str) -> None: ...

    @abstractmethod
    def local_copy(self, key_or_uri: str) -> AbstractContextManager[Path]:
        """A local file with the object's bytes, for readers that need a seekable path."""


class LocalStore(ObjectStore):
    def __init__(self, url: str) -> None:
        self.path = Path(unquote(urlparse(url).path))
        self.root = self.path.as_uri()

    def _path(self, key_or_uri: str) -> Path:
        return self.path / self.key_of(key_or_uri)

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write(key, lambda out: out.write(data))

    def put_stream(self, key: str, fill: Callable[[BinaryIO], object]) -> str:
        return self._write(key, fill)

    def put_file(self, key: str, path: Path) -> str:
        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, out)

        return self._write(key, copy)

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> str:
        """Write beside, then rename: a reader never sees half a file, and concurrent
        writers of one key never share a temporary file. The file gets the mode the umask
        gives any new file (0644 usually, not mkstemp's 0600), so a container or service
        running as another user can read the store."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "xb") as out:
                fill(out)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.uri(key)

    def get_bytes(self, key_or_uri: str) -> bytes:
        path = self._path(key_or_uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"object not found: {self.uri(self.key_of(key_or_uri))}") from None

    def exists(self, key_or_uri: str) -> bool:
        return self._path(key_or_uri).is_file()

    def delete(self, key_or_uri: str) -> None:
        self._path(key_or_uri).unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, key_or_uri: str) -> Iterator[Path]:
        path = self._path(key_or_uri)
        if not path.is_file():
            raise StoreError(f"object not found: {self.uri(self.key_of(key_or_uri))}")
        yield path


class S3Store(ObjectStore):
    def __init__(self, url: str, settings: Settings) -> None:
        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = s3_client(settings)

    def _key(self, key_or_uri: str) -> str:
        key = self.key_of(key_or_uri)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, action: str, key_or_uri: str, exc: Exception) -> StoreError:
        uri = self.uri(self.key_of(key_or_uri))
        return StoreError(f"cannot {action} {uri}: {exc}")

    def put_bytes(self, key: str, data: bytes) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:  # botocore raises many unrelated types
            raise self._error("write", key, exc) from exc
        return self.uri(key)

    def put_stream(self, key: str, fill: Callable[[BinaryIO], object]) -> str:
        # Spooled through a temporary file, which boto3 uploads in parts: memory stays
        # small whatever the object's size.
        with tempfile.TemporaryFile() as spool:
            fill(spool)
            spool.seek(0)
            try:
                self.client.upload_fileobj(spool, self.bucket, self._key(key))
            except Exception as exc:
                raise self._error("write", key, exc) from exc
        return self.uri(key)

    def put_file(self, key: str, path: Path) -> str:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except Exception as exc:
            raise self._error("write", key, exc) from exc
        return self.uri(key)

    def get_bytes(self, key_or_uri: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key_or_uri))
            return response["Body"].read()
        except Exception as exc:
            raise self._error("read", key_or_uri, exc) from exc

    def exists(self, key_or_uri: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key_or_uri))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise self._error("check", key_or_uri, exc) from exc
        return True

    def delete(self, key_or_uri: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key_or_uri))
        except Exception as exc:
            raise self._error("delete", key_or_uri, exc) from exc

    @contextmanager
    def local_copy(self, key_or_uri: str) -> Iterator[Path]:
        suffix = "".join(Path(self.key_of(key_or_uri)).suffixes)
        with tempfile.TemporaryDirectory(prefix="batchscore-") as tmp:
            path = Path(tmp) / f"object{suffix}"
            try:
                self.client.download_file(self.bucket, self._key(key_or_uri), str(path))
            except Exception as exc:
                raise self._error("read", key_or_uri, exc) from exc
            yield path


def s3_client(settings: Settings):
    """A boto3 S3 client for the configured endpoint (MinIO needs path-style addressing)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        region_name=settings.aws_region or "us-east-1",
        config=Config(
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )

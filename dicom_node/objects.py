"""Cluster mode's object store: how staged inputs and results move between the node and its
workers on other hosts (``cluster.objects``).

Two implementations behind one :class:`ObjectStore` protocol: :class:`S3ObjectStore`, any
S3-compatible service (SeaweedFS for a self-hosted site, Ceph, a cloud) through boto3, and
:class:`FolderObjectStore`, a folder mounted on every host (``file:///mnt/shared/...``). The
embedded node uses neither; boto3 is imported only when an S3 store is made.

Keys are relative, ``/``-separated paths (``inputs/<study key>/<sha256>``,
``results/<job>/attempt-<n>/...``) made of hashed UIDs and job numbers only, so a bucket listing
or an access log names no patient. A reader sees an object whole or not at all: S3 writes are
atomic per object, and the folder store writes beside and renames; a download lands in a
temporary file renamed into place once complete and synced.

Failures are the error tree's (:mod:`dicom_node.errors`): :class:`ObjectStoreUnavailable`
(Transient: no answer, a timeout, a 5xx), :class:`ObjectStoreRefused` (SetupFault: no bucket,
credentials refused), :class:`ObjectMissing` (no object under the key); messages name the store
and the key. The S3 client's timeouts and retries are short, so an outage fails a call within
seconds: the caller (the sweeper, a worker) tries again later rather than hanging.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from dicom_node.errors import (
    ObjectMissing,
    ObjectStoreRefused,
    ObjectStoreUnavailable,
)
from dicom_node.store import fsync_dir

if TYPE_CHECKING:
    from dicom_node.config import ObjectsConfig

__all__ = [
    "FolderObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "check_key",
    "object_store",
    "write_atomically",
]

PARTIAL_SUFFIX = ".partial"


class ObjectStore(Protocol):
    """Where a cluster's inputs and results live between hosts (keys: see the module)."""

    def put_file(self, key: str, path: Path) -> None:
        """Store the file's content under ``key``, replacing what was there."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Write the object to ``path``, atomically: complete and synced, or not at all."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (a plain string prefix, as S3's), sorted."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` (not empty); how many."""
        ...


def check_key(key: str) -> str:
    """``key`` if it is a relative path both stores can hold the same way; ValueError if not.

    No leading or doubled ``/``, no ``.``/``..`` segment, no segment starting with ``.`` (the
    folder store's partial files), no backslash or control character.
    """
    if not key or key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise ValueError(f"object key {key!r} is not a relative /-separated path")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"object key {key!r} has an empty or dot segment")
    return key


def _check_prefix(prefix: str, *, allow_empty: bool) -> str:
    if not prefix:
        if allow_empty:
            return prefix
        raise ValueError("an empty prefix would delete the whole store")
    # A prefix may end inside a segment or with "/": check what it has as if it were a key.
    check_key(prefix.rstrip("/") or "/")
    return prefix


@contextmanager
def write_atomically(path: Path) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new content to: on success it is synced and renamed into
    place (the folder's entry synced too); on failure removed, ``path`` untouched.

    The temporary file sits beside ``path`` (a rename within one file system) under a name
    that starts with ``.``, which no key and no stored instance has.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
    try:
        with partial.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        fsync_dir(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- a folder mounted on every host ----------------------------------------------------------


class FolderObjectStore:
    """Objects as files under ``root`` (a shared mount: NFS, CephFS, SMB): key = relative path."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        if not root.is_absolute():
            raise ValueError(f"the object store folder {root} must be an absolute path")
        self.root = root
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ObjectStoreUnavailable(f"{self!r}: cannot create it: {exc}") from exc

    def __repr__(self) -> str:
        return f"FolderObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _io(self, key: str) -> Iterator[None]:
        """The folder's OSErrors as the tree's: a missing file names the key; anything else
        (an unmounted share, EIO, a full disk) is the store being unavailable for now."""
        try:
            yield
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{self!r}: no object {key!r}") from exc
        except OSError as exc:
            raise ObjectStoreUnavailable(f"{self!r}: {key!r}: {exc}") from exc

    def _check_root(self) -> None:
        if not self.root.is_dir():
            # Not created here: a share that is not mounted must not be filled on the host's
            # own disk, where the other hosts would never see it.
            raise ObjectStoreUnavailable(f"{self!r}: the folder does not exist (not mounted?)")

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        self._check_root()
        with self._io(key), path.open("rb") as source, write_atomically(target) as f:
            shutil.copyfileobj(source, f, 1 << 20)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        self._check_root()
        with self._io(key), write_atomically(target) as f:
            f.write(data)

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        self._check_root()
        with self._io(key), source.open("rb") as stored, write_atomically(path) as f:
            shutil.copyfileobj(stored, f, 1 << 20)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        self._check_root()
        with self._io(key):
            return source.read_bytes()

    def exists(self, key: str) -> bool:
        source = self._path(key)
        self._check_root()
        return source.is_file()

    def keys(self, prefix: str) -> list[str]:
        _check_prefix(prefix, allow_empty=True)
        self._check_root()
        # Walk only the folder the prefix's complete segments name.
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        if not folder.is_dir():
            return []
        found = []
        with self._io(prefix):
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                base = PurePosixPath(Path(dirpath).relative_to(self.root).as_posix())
                for name in filenames:
                    key = str(base / name) if str(base) != "." else name
                    if not name.startswith(".") and key.startswith(prefix):
                        found.append(key)
        return sorted(found)

    def delete_prefix(self, prefix: str) -> int:
        _check_prefix(prefix, allow_empty=False)
        keys = self.keys(prefix)
        with self._io(prefix):
            for key in keys:
                self._path(key).unlink(missing_ok=True)
            self._prune(self.root.joinpath(*prefix.split("/")[:-1]))
        return len(keys)

    def _prune(self, folder: Path) -> None:
        """Remove the folders under (and including) ``folder`` left empty, up to the root."""
        if not folder.is_dir():
            return
        for dirpath, _dirnames, _filenames in sorted(
            os.walk(folder), key=lambda w: len(w[0]), reverse=True
        ):
            _remove_if_empty(Path(dirpath))
        while folder != self.root and _remove_if_empty(folder):
            folder = folder.parent


def _remove_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False  # not empty (or another host wrote into it meanwhile)
    return True


# --- S3 --------------------------------------------------------------------------------------

# A call fails within seconds when the store is down (boto3's defaults: 60 s reads, up to
# minutes of retries): a refused connection fails in under a second after ATTEMPTS tries with
# the standard mode's short backoff; a frozen server (connections accepted, no answer) within
# ATTEMPTS x READ_TIMEOUT_S. The read timeout bounds each socket read, not a whole transfer.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
ATTEMPTS = 3
# Files above MULTIPART_BYTES go in parts of that size, several at once (boto3's transfer
# manager); a DICOM slice (0.5 MB) is one PUT.
MULTIPART_BYTES = 16 * 2**20
POOL_CONNECTIONS = 32  # staging uploads a series from a thread pool: one connection each

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_REFUSED_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidBucketName",
    "403",
}


def parse_s3_url(url: str) -> tuple[str, str]:
    """The bucket and the key prefix (no slashes at its ends; may be empty) of s3://bucket/p."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return parts.netloc, prefix


class S3ObjectStore:
    """Objects in an S3 bucket under a prefix (``s3://bucket/prefix``), through boto3."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        attempts: int = ATTEMPTS,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"max_attempts": attempts, "mode": "standard"},
                max_pool_connections=POOL_CONNECTIONS,
                # Self-hosted endpoints (http://seaweedfs:8333, an IP) have no per-bucket DNS.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=4,
        )
        if create_bucket:
            self.create_bucket(region)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.url!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _calls(self, key: str) -> Iterator[None]:
        """boto3's and botocore's exceptions as the tree's, naming the store and the key."""
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            raise self._client_error(key, exc) from exc
        except (BotoCoreError, S3UploadFailedError, S3TransferFailedError) as exc:
            # The transfer manager wraps a ClientError in S3UploadFailedError: look inside.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(key, cause) from exc
            raise ObjectStoreUnavailable(f"{self!r}: {key!r}: {exc}") from exc

    def _client_error(self, key: str, exc: Any) -> Exception:
        what = repr(key) if key else f"bucket {self.bucket!r}"
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return ObjectStoreRefused(f"{self!r}: bucket {self.bucket!r} does not exist")
        if code in _MISSING_CODES:
            return ObjectMissing(f"{self!r}: no object {key!r}")
        if code in _REFUSED_CODES:
            return ObjectStoreRefused(f"{self!r}: {what}: refused ({code})")
        if status is not None and 400 <= status < 500 and code not in ("RequestTimeout", "429"):
            return ObjectStoreRefused(f"{self!r}: {what}: {code or status}")
        return ObjectStoreUnavailable(f"{self!r}: {what}: {code or status}")

    def create_bucket(self, region: str | None = None) -> None:
        """Create the bucket unless it exists (it may, made by another host meanwhile)."""
        from botocore.exceptions import ClientError

        with self._calls(""):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
            arguments: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":  # AWS refuses the default region named
                arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._client.create_bucket(**arguments)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        with self._calls(key):
            if path.stat().st_size < MULTIPART_BYTES:
                # One PUT, without the transfer manager's threads and futures (a third of the
                # time per 0.5 MB slice); botocore rewinds the file for a retry.
                with path.open("rb") as body:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=body)
            else:
                self._client.upload_file(str(path), self.bucket, full, Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        with self._calls(key):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        with self._calls(key), write_atomically(path) as f:
            self._client.download_fileobj(self.bucket, full, f, Config=self._transfer)

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._calls(key):
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        return body

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            with self._calls(key):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectMissing:
            return False
        return True

    def keys(self, prefix: str) -> list[str]:
        _check_prefix(prefix, allow_empty=True)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: list[str] = []
        with self._calls(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                found += [item["Key"][strip:] for item in page.get("Contents", ())]
        return sorted(found)

    def delete_prefix(self, prefix: str) -> int:
        _check_prefix(prefix, allow_empty=False)
        keys = self.keys(prefix)
        with self._calls(prefix):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at most
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise ObjectStoreUnavailable(
                        f"{self!r}: deleting {prefix!r}: {len(answer['Errors'])} object(s)"
                        f" not deleted ({first.get('Code')})"
                    )
        return len(keys)


# --- from the configuration ------------------------------------------------------------------


def folder_of(url: str) -> Path:
    """The absolute folder of a file:///path URL."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ValueError(f"{url!r} is not a file:///path URL")
    return Path(unquote(parts.path))


def object_store(config: ObjectsConfig, *, create: bool = False) -> ObjectStore:
    """The store ``cluster.objects`` describes: S3 for s3://, a shared folder for file:///.

    ``create``: make the S3 bucket, or the folder, if it is missing (the node at start;
    workers only use what is there, so that one configured with a wrong bucket or an
    unmounted share fails instead of writing where nobody reads).
    """
    if config.url is None:
        raise ValueError("cluster.objects.url is not set")
    makers: dict[str, Callable[[], ObjectStore]] = {
        "s3": lambda: S3ObjectStore(
            str(config.url),
            endpoint_url=config.endpoint_url,
            region=config.region,
            access_key_id=config.access_key_id,
            secret_access_key=config.secret_access_key,
            create_bucket=create,
        ),
        "file": lambda: FolderObjectStore(folder_of(str(config.url)), create=create),
    }
    scheme = urlsplit(config.url).scheme
    if scheme not in makers:
        raise ValueError(f"cluster.objects.url {config.url!r}: s3:// or file:/// expected")
    return makers[scheme]()

"""Where the SCIN release is read from: the public GCS bucket or a local folder with the bucket's layout.

Both implementations offer the same small interface (:class:`ScinSource`) so the pipeline never cares
which one it talks to. Every object path handed to a source is checked before it reaches a URL or a
filesystem: image paths must pass :func:`scin_pipeline.core.paths.image_id_from_path`, and the only
other objects that may be read are the metadata files, by exact name.

Errors are mapped onto four kinds the caller can act on:

- :class:`ObjectMissing`: the object is not in the source (do not retry).
- :class:`SourceUnreachable`: the source cannot be talked to at all (network, DNS, wrong folder).
- :class:`SourceAccessDenied` (a SourceUnreachable): HTTP 401/403, or credentials that cannot be loaded or
  refreshed; the message names the credentials used (:class:`GcsAccess`) and what to try (do not retry).
- :class:`TransientSourceError`: 429/5xx or a connection broken mid-transfer (retry with backoff).
"""

from __future__ import annotations

import abc
import base64
import errno
import hashlib
import http.client
import json
import logging
import os
import socket
import stat as stat_module
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import google_crc32c

from scin_pipeline.core.atomic import write_text_atomic
from scin_pipeline.core.paths import (
    BUCKET,
    CASES_OBJECT,
    LABELS_OBJECT,
    UnsafeObjectPath,
    image_id_from_path,
)

logger = logging.getLogger(__name__)

SYNTHETIC_MARKER = "SYNTHETIC_DATA.md"
# Optional checksum manifest at the root of a local mirror; see write_mirror_manifest.
MIRROR_MANIFEST = "scin_mirror_checksums.json"
# The only non-image objects a source may be asked for.
NAMED_OBJECTS = frozenset({CASES_OBJECT, LABELS_OBJECT, SYNTHETIC_MARKER})

_COPY_CHUNK = 256 * 1024
# Hashing reads small chunks: every read allocates a new bytes object (google_crc32c accepts only
# bytes, not a view of a reused buffer), and 16 workers x 1 MiB chunks would be 16 MiB of churn.
_HASH_CHUNK = 64 * 1024
# HTTP statuses GCS documents as "retry with exponential backoff".
_TRANSIENT_HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ObjectInfo:
    path: str  # object path relative to the bucket root, e.g. "dataset/images/123.png"
    size: int
    crc32c: str | None  # base64 big-endian CRC32C, exactly as GCS reports it (None when unknown)
    md5: str | None  # base64 MD5 as GCS reports it (None when unknown)
    generation: str | None  # GCS generation; for a mirror str(st_mtime_ns)
    updated: str | None = None  # ISO timestamp if known


class ObjectMissing(FileNotFoundError):
    """The object does not exist in the source."""

    def __init__(self, path: str, source_uri: str, detail: str | None = None):
        message = f"{path} not found in {source_uri}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.path = path
        self.source_uri = source_uri


class SourceUnreachable(ConnectionError):
    """The source cannot be talked to at all; the message says where and why."""


class SourceAccessDenied(SourceUnreachable):
    """The source refused the caller (HTTP 401/403) or the configured credentials could not be used.

    A SourceUnreachable (every caller that stops on an unreachable source stops on this too), but never
    retried: a retry presents the same identity again.
    """


class TransientSourceError(IOError):
    """A failure worth retrying: HTTP 429/500/502/503/504 or a connection broken during a transfer."""


class CorruptObject(IOError):
    """Bytes read from the source do not match the size or checksum the source reports for them."""


# --------------------------------------------------------------------------------------------------
# Path checks and checksums shared by both sources and by fetch.


def check_object_path(path: str) -> str:
    """Return ``path`` if it may be read from a source, else raise UnsafeObjectPath.

    Images are validated by the one rule in core.paths; anything else must be one of the known
    metadata objects, compared as an exact string (so no normalisation can smuggle in ``..``).
    """
    if isinstance(path, str) and path in NAMED_OBJECTS:
        return path
    image_id_from_path(path)
    return path


def _check_prefix(prefix: str) -> str:
    """A listing prefix is text, but the mirror turns it into a folder, so hold it to the same rules."""
    if not isinstance(prefix, str):
        raise UnsafeObjectPath(str(prefix), "prefix is not a string")
    if prefix.startswith("/") or "\\" in prefix or "\x00" in prefix:
        raise UnsafeObjectPath(prefix, "absolute path, backslash or NUL in prefix")
    if any(ord(c) < 32 for c in prefix):
        raise UnsafeObjectPath(prefix, "control character in prefix")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise UnsafeObjectPath(prefix, "path traversal ('.' or '..' segment) in prefix")
    return prefix


def crc32c_b64(data: bytes) -> str:
    """CRC32C of ``data`` in the form GCS reports it: base64 of the big-endian 4-byte value."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def file_checksums(path: Path, *, md5: bool = False) -> tuple[int, str, str | None]:
    """Size, CRC32C (GCS form) and optionally MD5 (GCS form) of a file, streamed in small chunks."""
    crc = google_crc32c.Checksum()
    digest = hashlib.md5() if md5 else None
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            crc.update(chunk)
            if digest is not None:
                digest.update(chunk)
            size += len(chunk)
    md5_b64 = base64.b64encode(digest.digest()).decode("ascii") if digest is not None else None
    return size, base64.b64encode(crc.digest()).decode("ascii"), md5_b64


def describe_mismatch(expected: ObjectInfo, size: int, crc32c: str | None, md5: str | None) -> str | None:
    """None when the bytes described by (size, crc32c, md5) match ``expected``, else why not.

    CRC32C is preferred (GCS reports it for every object, composite ones included); MD5 is the fallback
    when only MD5 is known; with neither, only the size can be checked.
    """
    if expected.crc32c is not None:
        if crc32c != expected.crc32c or size != expected.size:
            return f"crc32c mismatch: expected {expected.crc32c} got {crc32c} (size {expected.size} vs {size})"
        return None
    if expected.md5 is not None:
        if md5 != expected.md5 or size != expected.size:
            return f"md5 mismatch: expected {expected.md5} got {md5} (size {expected.size} vs {size})"
        return None
    if size != expected.size:
        return f"size mismatch: expected {expected.size} got {size} (no checksum known)"
    return None


def _bytes_mismatch(expected: ObjectInfo, data: bytes) -> str | None:
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii") if expected.crc32c is None else None
    return describe_mismatch(expected, len(data), crc32c_b64(data), md5)


# --------------------------------------------------------------------------------------------------
# The interface.


class ScinSource(abc.ABC):
    """Read-only access to the SCIN release objects."""

    uri: str

    @abc.abstractmethod
    def stat(self, path: str) -> ObjectInfo:
        """Metadata of one object; raises ObjectMissing."""

    @abc.abstractmethod
    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        """Every object whose path starts with ``prefix``, keyed by path."""

    @abc.abstractmethod
    def read_bytes(self, path: str) -> tuple[bytes, ObjectInfo]:
        """A small object in memory (the CSVs), verified against its checksum when one is known."""

    @abc.abstractmethod
    def download_to(self, path: str, dest: Path) -> ObjectInfo:
        """Stream an object into ``dest`` (the caller makes it atomic and verifies it); raises ObjectMissing.

        Returns what the source reported for the bytes it served (not a checksum of ``dest``).
        """

    @abc.abstractmethod
    def check_reachable(self, timeout_s: float = 10) -> None:
        """Raise SourceUnreachable, with where and why, unless the source answers."""

    def is_synthetic(self) -> bool:
        """True when the source holds SYNTHETIC_DATA.md at its root (a synthetic demo mirror)."""
        try:
            self.stat(SYNTHETIC_MARKER)
        except ObjectMissing:
            return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --------------------------------------------------------------------------------------------------
# Google Cloud Storage.


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """exc and everything it wraps (cause, context, urllib3 ``reason``, exceptions in ``args``)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        stack.extend(
            [current.__cause__, current.__context__, getattr(current, "reason", None)]
            + [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        )
    return [e for e in seen if isinstance(e, BaseException)]


def describe_network_error(exc: BaseException) -> str:
    """A short human reason for a network failure, e.g. 'connection refused' or 'DNS lookup failed'."""
    chain = _exception_chain(exc)
    for err in chain:
        if isinstance(err, socket.gaierror):
            return f"DNS lookup failed ({err.strerror or err})"
    for err in chain:
        if isinstance(err, ConnectionRefusedError) or getattr(err, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
    for err in chain:
        if isinstance(err, TimeoutError) or "timed out" in str(err).lower():
            return "timed out"
    for err in chain:
        if isinstance(err, ConnectionResetError):
            return "connection reset by peer"
    for err in chain:
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _is_network_error_chain(exc: BaseException) -> bool:
    """Whether ``exc`` or anything it wraps is a network failure (a token refresh that never got an answer)."""
    from google.auth.exceptions import TransportError

    return any(_is_network_error(e) or isinstance(e, TransportError) for e in _exception_chain(exc))


def _is_network_error(exc: BaseException) -> bool:
    import requests
    import urllib3

    return isinstance(
        exc,
        (
            ConnectionError,
            TimeoutError,
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
        ),
    )


GcsAuth = Literal["anonymous", "application_default", "service_account_key"]
GCS_AUTH_MODES: tuple[str, ...] = get_args(GcsAuth)
# The pipeline only reads: a read-only token is all a leaked token could be used for.
GCS_READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


@dataclass(frozen=True)
class GcsAccess:
    """Who the GCS source reads as, and who pays for a requester-pays bucket.

    - ``anonymous`` (the default): no credentials; the bucket must be public (the SCIN release is).
    - ``application_default``: Google's Application Default Credentials, as ``google.auth.default`` finds
      them (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, a workload's
      attached service account).
    - ``service_account_key``: the service-account JSON key at ``service_account_key_file``.

    ``user_project`` is the project billed for a requester-pays bucket (sent as ``userProject`` on every
    request); billing needs an identity, so it is refused with ``anonymous``.
    """

    auth: str = "anonymous"
    service_account_key_file: str | None = None
    user_project: str | None = None

    def __post_init__(self) -> None:
        # Launchpad and environment values arrive as "" when cleared: the same as not set.
        for name in ("service_account_key_file", "user_project"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                object.__setattr__(self, name, None)
        if self.auth not in GCS_AUTH_MODES:
            raise ValueError(f"GCS auth {self.auth!r} is not one of {', '.join(GCS_AUTH_MODES)}")
        if self.auth == "service_account_key" and self.service_account_key_file is None:
            raise ValueError("GCS auth 'service_account_key' needs service_account_key_file (the JSON key's path)")
        if self.auth != "service_account_key" and self.service_account_key_file is not None:
            raise ValueError(
                f"service_account_key_file is set but GCS auth is {self.auth!r}: "
                "set auth to 'service_account_key' to read with that key"
            )
        if self.auth == "anonymous" and self.user_project is not None:
            raise ValueError(
                f"user_project {self.user_project!r} (requester pays) needs an identity to bill: "
                "set auth to 'application_default' or 'service_account_key'"
            )

    @property
    def is_anonymous(self) -> bool:
        return self.auth == "anonymous"

    def describe(self) -> str:
        """The credentials in words, as error messages and logs name them."""
        who = {
            "anonymous": "anonymous access",
            "application_default": "Application Default Credentials",
            "service_account_key": f"service-account key {self.service_account_key_file}",
        }[self.auth]
        return who + (f", billing project {self.user_project}" if self.user_project else "")

    def denied_hint(self, code: int | None) -> str:
        """What to try after HTTP ``code`` (401 or 403) with these credentials."""
        if self.auth == "anonymous":
            return (
                "the bucket is read anonymously, so it must be public; for a private bucket set the "
                "scin_source resource's auth to 'application_default' (after `gcloud auth application-default "
                "login`) or to 'service_account_key' with service_account_key_file; for a requester-pays "
                "bucket set user_project too"
            )
        who = (
            "the Application Default Credentials' identity (`gcloud auth application-default print-access-token` "
            "shows they load; `gcloud auth list` which account)"
            if self.auth == "application_default"
            else f"the service account in {self.service_account_key_file}"
        )
        if code == 401:
            return (
                f"the credentials were not accepted (expired, revoked or for another project): renew {who}, "
                "e.g. rerun `gcloud auth application-default login` or issue a new key"
            )
        billing = (
            f"; billing project {self.user_project} needs serviceusage.services.use granted to it"
            if self.user_project
            else "; if the bucket is requester pays, set user_project to a project to bill"
        )
        return f"grant {who} roles/storage.objectViewer (storage.objects.get and .list) on the bucket{billing}"


def gcs_client(access: GcsAccess):
    """A ``google.cloud.storage.Client`` reading as ``access`` says (nothing is sent until it is used).

    Credentials that cannot be loaded raise :class:`SourceAccessDenied` naming what was tried; the
    read-only scope is asked for, so a token minted here cannot write.
    """
    from google.cloud import storage

    if access.auth == "anonymous":
        return storage.Client.create_anonymous_client()
    if access.auth == "application_default":
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, project = google.auth.default(scopes=[GCS_READ_ONLY_SCOPE])
        except DefaultCredentialsError as exc:
            raise SourceAccessDenied(
                f"no Application Default Credentials found ({exc}); run `gcloud auth application-default "
                "login`, set GOOGLE_APPLICATION_CREDENTIALS to a key file, or set the scin_source resource's "
                "auth to 'service_account_key' with service_account_key_file"
            ) from exc
        # project=None would make the client look the project up again; "<none>" is its own "no project".
        return storage.Client(project=project or "<none>", credentials=credentials)
    from google.oauth2 import service_account

    key_file = Path(str(access.service_account_key_file)).expanduser()
    try:
        credentials = service_account.Credentials.from_service_account_file(str(key_file), scopes=[GCS_READ_ONLY_SCOPE])
    except FileNotFoundError as exc:
        raise SourceAccessDenied(f"service-account key file {key_file} not found (service_account_key_file)") from exc
    except IsADirectoryError as exc:
        raise SourceAccessDenied(f"service-account key file {key_file} is a folder, not a JSON key") from exc
    except PermissionError as exc:
        raise SourceAccessDenied(f"service-account key file {key_file} is not readable: {exc.strerror}") from exc
    except (ValueError, KeyError) as exc:  # json.JSONDecodeError and a missing field are ValueError / KeyError
        raise SourceAccessDenied(
            f"{key_file} is not a service-account JSON key ({type(exc).__name__}: {exc}); create one with "
            "`gcloud iam service-accounts keys create`"
        ) from exc
    return storage.Client(project=credentials.project_id or "<none>", credentials=credentials)


class GcsBucketSource(ScinSource):
    """A GCS bucket (the public SCIN bucket by default), read as ``access`` says (anonymous by default).

    ``STORAGE_EMULATOR_HOST`` is honoured (google-cloud-storage reads it when the client is built), which
    is how the tests and the benchmark point this at a local gcp-storage-emulator.
    """

    # google-cloud-storage is unannotated, so pyright takes each parameter's type from its default
    # (timeout int, checksum str, retry Retry); the float timeouts and the None checksum / retry it
    # documents carry a targeted `pyright: ignore` ("untyped GCS parameter").

    def __init__(
        self,
        bucket: str = BUCKET,
        timeout_s: float = 60.0,
        *,
        max_connections: int = 32,
        access: GcsAccess | None = None,
    ):
        from google.api_core.retry import Retry
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

        if not bucket or "/" in bucket:
            raise ValueError(f"not a bucket name: {bucket!r}")
        self.bucket_name = bucket
        self.uri = f"gs://{bucket}"
        self.timeout_s = timeout_s
        self.emulator_host = os.environ.get("STORAGE_EMULATOR_HOST") or None
        self.access = access or GcsAccess()
        self._client: storage.Client = gcs_client(self.access)
        # The client's bucket metadata cache only decorates tracing spans, yet on first use it starts a
        # background GET of the bucket resource (403 for anonymous callers of a public bucket). Off.
        self._client._bucket_metadata_cache = None  # pyright: ignore[reportAttributeAccessIssue]  # private; GCS tests it for truth
        # requests keeps 10 connections per host by default; parallel downloads need one per worker or
        # every extra worker opens (and throws away) a new TCP/TLS connection per object.
        import requests.adapters

        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max_connections)
        self._client._http.mount("https://", adapter)
        self._client._http.mount("http://", adapter)
        # user_project rides on the bucket: every request made through it (stat, list, download) carries it.
        self._bucket = self._client.bucket(bucket, user_project=self.access.user_project)
        # Metadata calls retry 429/5xx/connection errors within the source's timeout; downloads are
        # retried by the caller (fetch) so one policy decides how long an image may take.
        self._metadata_retry: Retry = DEFAULT_RETRY.with_timeout(timeout_s)

    # ---- error mapping -----------------------------------------------------------------------------

    def _where(self) -> str:
        where = f"{self.uri} (emulator at {self.emulator_host})" if self.emulator_host else self.uri
        return where if self.access == GcsAccess() else f"{where} with {self.access.describe()}"

    def _map_error(self, exc: BaseException, path: str | None, *, during_transfer: bool) -> BaseException:
        from google.api_core import exceptions as api_exceptions

        if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
            return self._map_error(exc.cause, path, during_transfer=during_transfer)
        if isinstance(exc, api_exceptions.NotFound):
            if path is None:
                return SourceUnreachable(f"cannot reach {self._where()}: bucket not found")
            return ObjectMissing(path, self.uri)
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            code = getattr(exc, "code", None)
            if code in _TRANSIENT_HTTP_STATUSES:
                return TransientSourceError(f"{path or self.uri}: HTTP {code} from {self._where()}: {exc.message}")
            if code in (401, 403):
                return SourceAccessDenied(
                    f"cannot reach {self.uri}: access denied (HTTP {code}: {exc.message}) for "
                    f"{path or 'listing'}, reading with {self.access.describe()}; " + self.access.denied_hint(code)
                )
            return exc  # another HTTP error: not ours to reinterpret
        from google.auth.exceptions import RefreshError

        if isinstance(exc, RefreshError) and not _is_network_error_chain(exc):
            # A token could not be minted (revoked key, disabled account, bad token_uri answer).
            return SourceAccessDenied(
                f"cannot reach {self.uri}: the credentials could not be refreshed ({exc}), reading with "
                f"{self.access.describe()}; " + self.access.denied_hint(401)
            )
        if _is_network_error(exc) or isinstance(exc, RefreshError):
            why = describe_network_error(exc)
            if during_transfer:
                return TransientSourceError(f"{path}: {why} while downloading from {self._where()}")
            return SourceUnreachable(f"cannot reach {self._where()}: {why}")
        return exc

    def _raise_mapped(self, exc: BaseException, path: str | None, *, during_transfer: bool):
        mapped = self._map_error(exc, path, during_transfer=during_transfer)
        if mapped is exc:
            raise exc
        raise mapped from exc

    # ---- interface ---------------------------------------------------------------------------------

    @staticmethod
    def _info_from_blob(blob) -> ObjectInfo:
        return ObjectInfo(
            path=blob.name,
            size=int(blob.size) if blob.size is not None else 0,
            crc32c=blob.crc32c,
            md5=blob.md5_hash,
            generation=str(blob.generation) if blob.generation is not None else None,
            updated=blob.updated.isoformat() if blob.updated is not None else None,
        )

    def stat(self, path: str) -> ObjectInfo:
        check_object_path(path)
        try:
            blob = self._bucket.get_blob(path, timeout=self.timeout_s, retry=self._metadata_retry)  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
        except Exception as exc:
            self._raise_mapped(exc, path, during_transfer=False)
        if blob is None:
            raise ObjectMissing(path, self.uri)
        return self._info_from_blob(blob)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        _check_prefix(prefix)
        listing: dict[str, ObjectInfo] = {}
        try:
            blobs = self._client.list_blobs(
                self._bucket,  # the bucket object, so user_project goes with the listing
                prefix=prefix or None,
                page_size=1000,  # the API maximum: one request per 1000 objects
                fields="items(name,size,crc32c,md5Hash,generation,updated),nextPageToken",
                timeout=self.timeout_s,  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
                retry=self._metadata_retry,
            )
            for blob in blobs:
                listing[blob.name] = self._info_from_blob(blob)
        except Exception as exc:
            self._raise_mapped(exc, None, during_transfer=False)
        return listing

    def read_bytes(self, path: str) -> tuple[bytes, ObjectInfo]:
        info = self.stat(path)
        # Pin the generation we just stat-ed so the bytes and the checksum describe the same object.
        blob = self._bucket.blob(path, generation=int(info.generation) if info.generation else None)
        try:
            data = blob.download_as_bytes(
                raw_download=True,
                checksum=None,  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
                timeout=self.timeout_s,  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
                retry=self._metadata_retry,
            )
        except Exception as exc:
            self._raise_mapped(exc, path, during_transfer=True)
        mismatch = _bytes_mismatch(info, data)
        if mismatch:
            raise CorruptObject(f"{path} from {self.uri}: {mismatch}")
        return data, info

    def download_to(self, path: str, dest: Path) -> ObjectInfo:
        check_object_path(path)
        blob = self._bucket.blob(path)
        written = 0
        try:
            with open(dest, "wb") as handle:
                counter = _CountingWriter(handle)
                # raw_download: the stored bytes, never a transcoded body, so the listed checksums apply.
                # checksum=None: fetch hashes the file itself against the listing (one pass, not two).
                # retry=None: fetch owns the retry policy for downloads.
                blob.download_to_file(counter, raw_download=True, checksum=None, retry=None, timeout=self.timeout_s)  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
                written = counter.written
        except Exception as exc:
            self._raise_mapped(exc, path, during_transfer=True)
        return ObjectInfo(
            path=path,
            size=written,
            crc32c=blob.crc32c,  # from the X-Goog-Hash header of this response, when sent
            md5=blob.md5_hash,
            generation=str(blob.generation) if blob.generation is not None else None,
        )

    def check_reachable(self, timeout_s: float = 10) -> None:
        try:
            # One tiny list call: works anonymously on a public bucket (a bucket GET does not).
            page = self._client.list_blobs(
                self._bucket,
                prefix="dataset/",
                max_results=1,
                timeout=timeout_s,  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
                retry=None,  # pyright: ignore[reportArgumentType]  # untyped GCS parameter
            )
            for _ in page:
                break
        except Exception as exc:
            mapped = self._map_error(exc, None, during_transfer=False)
            if isinstance(mapped, TransientSourceError):
                mapped = SourceUnreachable(f"cannot reach {self._where()}: {mapped}")
            if not isinstance(mapped, SourceUnreachable):
                mapped = SourceUnreachable(f"cannot reach {self._where()}: {type(exc).__name__}: {exc}")
            raise mapped from exc


class _CountingWriter:
    """A write-only file wrapper that counts bytes (the client only calls write)."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def seek(self, offset: int, whence: int = 0) -> int:
        # The client rewinds to 0 when the server transcodes a retried range request; start over.
        position = self._handle.seek(offset, whence)
        self._handle.truncate()
        self.written = position
        return position

    def tell(self) -> int:
        return self._handle.tell()


# --------------------------------------------------------------------------------------------------
# A local folder with the bucket's layout.


class LocalMirrorSource(ScinSource):
    """A folder laid out like the bucket: <root>/dataset/scin_cases.csv, .../dataset/images/<id>.png.

    Checksums are unknown (None) unless the mirror carries a manifest (:data:`MIRROR_MANIFEST`, written by
    :func:`write_mirror_manifest`); the generation is the file's mtime in nanoseconds, so a rewritten
    file looks like a new object.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self._manifest: dict[str, dict] | None = None

    # ---- safety ------------------------------------------------------------------------------------

    def _inside_root(self, candidate: Path) -> bool:
        return candidate == self.root or candidate.is_relative_to(self.root)

    def _resolve(self, path: str) -> Path:
        """The real file behind an object path, refusing any path or symlink that leaves the root."""
        check_object_path(path)
        resolved = (self.root / path).resolve()
        if not self._inside_root(resolved):
            raise UnsafeObjectPath(path, f"resolves outside the mirror root {self.root} (symlink?)")
        return resolved

    def _stat_file(self, path: str) -> tuple[Path, os.stat_result]:
        resolved = self._resolve(path)
        try:
            st = os.stat(resolved, follow_symlinks=False)
        except FileNotFoundError:
            raise ObjectMissing(path, self.uri) from None
        except NotADirectoryError:
            raise ObjectMissing(path, self.uri, "a parent is not a folder") from None
        if not stat_module.S_ISREG(st.st_mode):
            raise ObjectMissing(path, self.uri, "not a regular file")
        return resolved, st

    # ---- checksums ---------------------------------------------------------------------------------

    def _manifest_entries(self) -> dict[str, dict]:
        if self._manifest is None:
            entries: dict[str, dict] = {}
            manifest = self.root / MIRROR_MANIFEST
            if manifest.is_file() and self._inside_root(manifest.resolve()):
                try:
                    raw = json.loads(manifest.read_text(encoding="utf-8"))
                    objects = raw.get("objects", {}) if isinstance(raw, dict) else {}
                except (OSError, ValueError) as exc:
                    logger.warning("ignoring unreadable checksum manifest %s: %s", manifest, exc)
                    objects = {}
                for key, value in objects.items():
                    try:
                        check_object_path(key)
                    except UnsafeObjectPath:
                        continue  # a manifest is data too: entries for paths we would never read are dropped
                    if isinstance(value, dict):
                        entries[key] = value
            self._manifest = entries
        return self._manifest

    def _info(self, path: str, st: os.stat_result) -> ObjectInfo:
        entry = self._manifest_entries().get(path, {})
        return ObjectInfo(
            path=path,
            size=st.st_size,
            crc32c=entry.get("crc32c"),
            md5=entry.get("md5"),
            generation=str(st.st_mtime_ns),
            updated=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC).isoformat(),
        )

    # ---- interface ---------------------------------------------------------------------------------

    def stat(self, path: str) -> ObjectInfo:
        _, st = self._stat_file(path)
        return self._info(path, st)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        _check_prefix(prefix)
        # Walk the deepest folder the prefix names, then filter names by the full prefix.
        folder_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = (self.root / folder_part).resolve() if folder_part else self.root
        if not self._inside_root(start):
            raise UnsafeObjectPath(prefix, f"resolves outside the mirror root {self.root}")
        listing: dict[str, ObjectInfo] = {}
        if not start.is_dir():
            return listing
        stack = [(start, folder_part + "/" if folder_part else "")]
        while stack:
            folder, rel = stack.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = rel + entry.name
                    if entry.is_symlink():
                        target = Path(entry.path).resolve()
                        if not self._inside_root(target):
                            logger.warning(
                                "mirror %s: skipping %s, a symlink leading outside the root", self.root, name
                            )
                            continue
                    if entry.is_dir(follow_symlinks=False):
                        if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                            stack.append((Path(entry.path), name + "/"))
                        continue
                    if not name.startswith(prefix) or name == MIRROR_MANIFEST:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=True)
                    except OSError:
                        continue  # vanished or dangling symlink: not an object
                    if stat_module.S_ISREG(st.st_mode):
                        listing[name] = self._info(name, st)
        return listing

    def read_bytes(self, path: str) -> tuple[bytes, ObjectInfo]:
        resolved, st = self._stat_file(path)
        data = _read_no_follow(resolved)
        info = self._info(path, st)
        mismatch = _bytes_mismatch(info, data)
        if mismatch:
            raise CorruptObject(f"{path} in {self.uri}: {mismatch}")
        return data, info

    def download_to(self, path: str, dest: Path) -> ObjectInfo:
        resolved, st = self._stat_file(path)
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise ObjectMissing(path, self.uri) from None
        with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
            written = 0
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
                written += len(chunk)
        info = self._info(path, st)
        return ObjectInfo(info.path, written, info.crc32c, info.md5, info.generation, info.updated)

    def check_reachable(self, timeout_s: float = 10) -> None:
        if not self.root.exists():
            raise SourceUnreachable(f"cannot reach mirror {self.root}: folder does not exist")
        if not self.root.is_dir():
            raise SourceUnreachable(f"cannot reach mirror {self.root}: not a folder")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise SourceUnreachable(f"cannot reach mirror {self.root}: permission denied")
        if not (self.root / "dataset").is_dir():
            raise SourceUnreachable(
                f"cannot reach mirror {self.root}: no dataset/ folder (expected the bucket layout "
                "dataset/scin_cases.csv, dataset/scin_labels.csv, dataset/images/<id>.png)"
            )


def _read_no_follow(resolved: Path) -> bytes:
    # resolved is already a real path inside the root; O_NOFOLLOW stops a symlink swapped in since.
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def write_mirror_manifest(root: str | Path) -> Path:
    """Write :data:`MIRROR_MANIFEST` for a mirror: size, CRC32C and MD5 of every readable object.

    With it, a LocalMirrorSource verifies copies by checksum like the bucket, not only by size.
    """
    source = LocalMirrorSource(root)
    objects: dict[str, dict] = {}
    for prefix in ("dataset/", ""):
        for path, _ in sorted(source.list(prefix).items()):
            try:
                check_object_path(path)
            except UnsafeObjectPath:
                continue
            size, crc, md5 = file_checksums(source._resolve(path), md5=True)
            objects[path] = {"size": size, "crc32c": crc, "md5": md5}
    target = source.root / MIRROR_MANIFEST
    write_text_atomic(json.dumps({"format": 1, "objects": objects}, indent=1, sort_keys=True), target)
    return target


def open_source(location: str, *, timeout_s: float = 60.0, access: GcsAccess | None = None) -> ScinSource:
    """ "gcs" or "gs://<bucket>" -> the bucket, read as ``access`` says (anonymous by default); anything
    else is a local mirror folder, which takes no GCS credentials (given ones are an error, not ignored)."""
    access = access or GcsAccess()
    if location == "gcs":
        return GcsBucketSource(timeout_s=timeout_s, access=access)
    if location.startswith("gs://"):
        bucket = location[len("gs://") :].rstrip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"expected gs://<bucket> with no object path, got {location!r}")
        return GcsBucketSource(bucket, timeout_s=timeout_s, access=access)
    if access != GcsAccess():
        raise ValueError(
            f"GCS credentials ({access.describe()}) are set but the source {location!r} is a local folder; "
            "credentials apply to 'gcs' and gs://<bucket> sources only"
        )
    return LocalMirrorSource(location)


__all__ = [
    "CorruptObject",
    "GCS_AUTH_MODES",
    "GCS_READ_ONLY_SCOPE",
    "GcsAccess",
    "GcsAuth",
    "GcsBucketSource",
    "LocalMirrorSource",
    "MIRROR_MANIFEST",
    "NAMED_OBJECTS",
    "ObjectInfo",
    "ObjectMissing",
    "SYNTHETIC_MARKER",
    "ScinSource",
    "SourceAccessDenied",
    "SourceUnreachable",
    "TransientSourceError",
    "check_object_path",
    "crc32c_b64",
    "describe_mismatch",
    "describe_network_error",
    "file_checksums",
    "gcs_client",
    "open_source",
    "write_mirror_manifest",
]

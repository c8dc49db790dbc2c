"""``S3ArtifactStore``: artifacts in an S3-compatible bucket, with a bounded local cache.

The bucket is the store: object ``[<prefix>/]sha256/<digest>`` holds the artifact ``<digest>``.
QEMU and the host read files, so every artifact a host uses is first *materialized* in its local
cache, a ``LocalArtifactStore`` (same layout, same verified stat keys) under the host's
``artifacts/`` directory:

- ``put`` hashes the file (unless the caller gives the digest it computed from the same bytes),
  uploads it only when the bucket lacks the object, and returns once the upload completed (the
  object is durable), keeping the file in the cache. A file below ``multipart_threshold`` goes
  in one PUT carrying its SHA-256 (``x-amz-checksum-sha256``: the server refuses bytes that do
  not hash to the digest); a larger one in a multipart upload with a SHA-256 per part, after
  which a HEAD checks the object's size and its ``sha256`` metadata.
- ``local_path``/``verify`` download a missing artifact into a temporary file of the cache,
  hash it, and rename it into place only when it matches: a corrupt object raises
  ``ArtifactCorrupt`` and leaves nothing in the cache; an absent one raises ``ArtifactMissing``.
  A cache copy found corrupt is dropped and fetched again from the bucket. A deep ``verify``
  (the scrub's) checks the object with a HEAD and re-hashes a cached copy, downloading nothing.
- ``has``, ``size``, ``allocated``, ``entries``, ``delete`` and ``collect`` are about the bucket
  (``delete`` drops the cache copy too).

The cache is bounded by ``cache_bytes``. After each download or put that takes it over, the
least recently used copies are removed until it fits, except (the rule) an artifact that a VM
of this host runs on (``in_use``, the host's own references) and one used in the last
``RECENT_S`` seconds (a restore verifies its files a moment before it launches on them): the
budget may be overrun while these alone exceed it. An evicted artifact stays in the bucket and
is downloaded again when next needed.

Every botocore error is translated here into ``ArtifactMissing`` (no such object) or
``InternalError`` (anything else, the request named, never the credentials), chained with
``from``; botocore retries a failed request (``max_attempts``, standard mode) first.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import InternalError, ValidationError
from .digests import sha256_file
from .store import (
    GC_GRACE_S,
    ArtifactCorrupt,
    ArtifactInfo,
    ArtifactMissing,
    LocalArtifactStore,
    _valid_digest,
    damaged_among,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CACHE_BYTES = 20 << 30
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 32 << 20
MAX_ATTEMPTS = 5
#: an artifact used this recently is never evicted (see the module's docstring);
#: ``TENKI_ARTIFACT_RECENT_S`` sets another (an operator's tight cache, the tests')
RECENT_S = 120.0


@dataclass(frozen=True)
class S3Location:
    """Where artifacts live: ``s3://BUCKET[/PREFIX]`` on ``endpoint`` (None: AWS). Credentials
    are botocore's usual chain unless given (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, ...); the secret never appears in ``repr`` or in any message."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    #: attempts per request (botocore's standard retry mode: backoff with jitter between them)
    max_attempts: int = MAX_ATTEMPTS

    @classmethod
    def from_options(cls, artifacts: str | None, s3_endpoint: str | None) -> S3Location | None:
        """The ``--artifacts``/``--s3-endpoint`` options of ``tenki serve`` and ``tenki host
        run`` (the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``); None: no bucket."""
        if not artifacts:
            if s3_endpoint:
                raise ValidationError("an S3 endpoint without --artifacts s3://BUCKET",
                                      field="artifacts")
            return None
        return cls.parse(artifacts, endpoint=s3_endpoint or None,
                         region=os.environ.get("AWS_REGION")
                         or os.environ.get("AWS_DEFAULT_REGION"))

    @classmethod
    def parse(cls, url: str, *, endpoint: str | None = None, region: str | None = None,
              access_key: str | None = None, secret_key: str | None = None,
              max_attempts: int = MAX_ATTEMPTS) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment \
                or "@" in parts.netloc:
            raise ValidationError(f"not an s3://BUCKET[/PREFIX] URL: {url!r}", field="artifacts")
        if endpoint is not None:
            ep = urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname or ep.username \
                    or ep.password:
                raise ValidationError("not an http(s)://HOST[:PORT] URL without credentials",
                                      field="s3_endpoint")
        return cls(bucket=parts.netloc, prefix=parts.path.strip("/"), endpoint=endpoint or None,
                   region=region or None, access_key=access_key or None,
                   secret_key=secret_key or None, max_attempts=max_attempts)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def describe(self) -> str:
        return self.url + (f" at {self.endpoint}" if self.endpoint else "")

    def key(self, digest: str) -> str:
        return f"{self.prefix}/sha256/{digest}" if self.prefix else f"sha256/{digest}"

    @property
    def listing_prefix(self) -> str:
        return self.key("")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id=self.access_key,
                                        aws_secret_access_key=self.secret_key,
                                        region_name=self.region or None)
        config = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                        connect_timeout=5, read_timeout=60, s3={"addressing_style": "path"},
                        region_name=self.region or session.region_name or "us-east-1")
        return session.client("s3", endpoint_url=self.endpoint, config=config)


def _checksum(digest: str) -> str:
    return base64.b64encode(bytes.fromhex(digest)).decode()


class S3ArtifactStore:
    remote = True

    def __init__(self, cache_root: Path, location: S3Location, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 in_use: Callable[[], Iterable[str]] | None = None, client: Any = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunk: int = MULTIPART_CHUNK) -> None:
        from boto3.s3.transfer import TransferConfig

        self.location = location
        self.cache = LocalArtifactStore(cache_root)
        self.cache_bytes = cache_bytes
        #: digests a VM of this host runs on (never evicted); the host sets it
        self.in_use: Callable[[], Iterable[str]] = in_use or (lambda: ())
        self.client = client if client is not None else location.client()
        self.multipart_threshold = multipart_threshold
        self.recent_s = _recent_s()
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunk, max_concurrency=4)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        #: digest -> time.time() of its last use through this store (LRU order)
        self._used: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for entry in self.cache.objects.iterdir():
                if _valid_digest(entry.name):
                    st = entry.stat()
                    self._used[entry.name] = max(st.st_atime, st.st_ctime)

    # -- the boundary: every botocore error becomes one of ours ----------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, digest: str = "",
              kind: str = "artifact") -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if digest and (code in ("404", "NoSuchKey", "NotFound") or status == 404):
                raise ArtifactMissing(f"{kind} {digest[:12]} is missing from "
                                      f"{self.location.url}", digest=digest, kind=kind) from exc
            if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest") and digest:
                raise ArtifactCorrupt(f"{kind} {digest[:12]}: the object store refused its "
                                      f"content ({code}: it does not hash to its digest)",
                                      digest=digest, kind=kind) from exc
            raise InternalError(f"object store {self.location.describe()}: {what} failed: "
                                f"{code} {err.get('Message') or ''}".rstrip()) from exc
        except BotoCoreError as exc:
            raise InternalError(f"object store {self.location.describe()}: {what} failed: "
                                f"{type(exc).__name__}: {_safe(exc)}") from exc

    def check(self) -> None:
        """Fail now (``InternalError``) unless the bucket can be reached with the credentials."""
        self._call(f"access to bucket {self.location.bucket}",
                   lambda: self.client.head_bucket(Bucket=self.location.bucket))

    def _head(self, digest: str) -> dict[str, Any] | None:
        key = self.location.key(digest)
        try:
            head: dict[str, Any] = self._call(
                f"HEAD {key}", lambda: self.client.head_object(Bucket=self.location.bucket,
                                                               Key=key), digest=digest)
            return head
        except ArtifactMissing:
            return None

    @contextlib.contextmanager
    def _lock(self, digest: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            yield

    # -- the protocol ----------------------------------------------------------------------
    def temp_path(self) -> Path:
        return self.cache.temp_path()

    def put(self, src: Path, *, digest: str | None = None, move: bool = False) -> str:
        if digest is None:
            digest = sha256_file(src)
        if not _valid_digest(digest):
            raise ArtifactMissing(f"not an artifact digest: {digest[:80]!r}", digest=digest)
        with self._lock(digest):
            if self._head(digest) is None:
                self._upload(src, digest)
            self.cache.put(src, digest=digest, move=move)
            self._touch(digest)
        self._evict(keep={digest})
        return digest

    def _upload(self, src: Path, digest: str) -> None:
        key, bucket = self.location.key(digest), self.location.bucket
        size = src.stat().st_size
        meta = {"sha256": digest}
        if size < self.multipart_threshold:
            def one() -> None:
                with open(src, "rb") as f:
                    self.client.put_object(Bucket=bucket, Key=key, Body=f, ContentLength=size,
                                           ChecksumSHA256=_checksum(digest), Metadata=meta)
            self._call(f"PUT {key}", one, digest=digest)
        else:
            self._call(f"multipart upload of {key}", lambda: self.client.upload_file(
                str(src), bucket, key, Config=self.transfer,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": meta}), digest=digest)
            head = self._head(digest)
            got = None if head is None else (head.get("ContentLength"),
                                             head.get("Metadata", {}).get("sha256"))
            if got != (size, digest):
                raise InternalError(f"object store {self.location.describe()}: {key} is not "
                                    f"what was uploaded ({got} after a {size}-byte upload)")
        log.info("artifact %s: uploaded to %s (%d bytes)", digest[:12], self.location.url, size)

    def has(self, digest: str) -> bool:
        return _valid_digest(digest) and self._head(digest) is not None

    def local_path(self, digest: str) -> Path:
        path = self.cache.local_path(digest)  # ArtifactMissing for a malformed digest
        if not path.exists():
            self._fetch(digest, "artifact")
        self._touch(digest)
        return path

    def _fetch(self, digest: str, kind: str) -> None:
        """Download ``digest`` into the cache, verified before it becomes visible."""
        with self._lock(digest):
            if self.cache.local_path(digest).exists():
                return
            key = self.location.key(digest)
            tmp = self.cache.objects / f".{digest}.{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "wb") as f:
                    self._call(f"GET {key}", lambda: self.client.download_fileobj(
                        self.location.bucket, key, f, Config=self.transfer),
                        digest=digest, kind=kind)
                got = sha256_file(tmp)
                if got != digest:
                    raise ArtifactCorrupt(
                        f"{kind} {digest[:12]} is corrupt in {self.location.url} (its content "
                        f"hashes to {got[:12]})", digest=digest, kind=kind)
                self.cache.put(tmp, digest=digest, move=True)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("artifact %s: downloaded from %s", digest[:12], self.location.url)
        self._touch(digest)
        self._evict(keep={digest})

    def verify(self, digest: str, kind: str = "artifact", *, deep: bool = False) -> None:
        """A restore's or boot's check (``deep`` False) fetches what the cache lacks, verified.
        A ``deep`` one (the scrub, ``tenki admin verify``) checks the object is in the bucket
        with its recorded digest and re-hashes the cached copy if there is one, but downloads
        nothing: scrubbing every kept snapshot must not pull the bucket through the cache."""
        path = self.cache.local_path(digest)
        if deep:
            head = self._head(digest)
            if head is None:
                raise ArtifactMissing(f"{kind} {digest[:12]} is missing from "
                                      f"{self.location.url}", digest=digest, kind=kind)
            recorded = head.get("Metadata", {}).get("sha256")
            if recorded is not None and recorded != digest:
                raise ArtifactCorrupt(f"{kind} {digest[:12]} is corrupt in {self.location.url} "
                                      f"(its object records {recorded[:12]})",
                                      digest=digest, kind=kind)
            if not path.exists():
                return
        if not path.exists():
            self._fetch(digest, kind)  # hashed on the way in
        try:
            self.cache.verify(digest, kind, deep=deep)
        except ArtifactCorrupt as exc:
            # only a copy: drop it and fetch the bucket's (itself verified) again
            log.warning("%s: the cached copy is dropped and fetched again", exc.message)
            self.cache.delete(digest)
            self._fetch(digest, kind)
        self._touch(digest)

    def damaged(self, digests: dict[str, str], *, deep: bool = False) -> dict[str, str]:
        return damaged_among(self, digests, deep=deep)

    def size(self, digest: str) -> int:
        if self.cache.has(digest):
            return self.cache.size(digest)
        head = self._head(digest) if _valid_digest(digest) else None
        return int(head.get("ContentLength", 0)) if head else 0

    def allocated(self, digest: str) -> int:
        """The object's size: what the bucket bills (0 if absent)."""
        head = self._head(digest) if _valid_digest(digest) else None
        return int(head.get("ContentLength", 0)) if head else 0

    def delete(self, digest: str) -> int:
        key = self.location.key(digest)
        freed = self.allocated(digest)
        self._call(f"DELETE {key}", lambda: self.client.delete_object(
            Bucket=self.location.bucket, Key=key))
        self.cache.delete(digest)
        self._used.pop(digest, None)
        return freed

    def entries(self) -> list[ArtifactInfo]:
        prefix = self.location.listing_prefix

        def listing() -> list[ArtifactInfo]:
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    digest = obj["Key"][len(prefix):]
                    if _valid_digest(digest):
                        out.append(ArtifactInfo(digest, int(obj["Size"]), int(obj["Size"]),
                                                obj["LastModified"].timestamp()))
            return out
        return self._call(f"LIST {prefix}", listing)

    def collect(self, referenced: Iterable[str], grace_s: float = GC_GRACE_S) -> int:
        """Delete the objects nothing references (stored more than ``grace_s`` ago), then the
        cache's stale temporaries, and trim the cache to its budget."""
        keep = set(referenced)
        now = time.time()
        freed = 0
        for info in self.entries():
            if info.digest in keep or now - info.stored_at < grace_s:
                continue
            log.info("artifact %s: unreferenced, removed from %s", info.digest[:12],
                     self.location.url)
            freed += self.delete(info.digest)
        # cache copies of objects gone from the bucket, and stale temporaries
        listed = {i.digest for i in self.entries()}
        self.cache.collect(listed | keep, grace_s)
        self._evict()
        return freed

    def strays(self) -> list[Path]:
        return self.cache.strays()

    # -- the cache's bound ---------------------------------------------------------------
    def _touch(self, digest: str) -> None:
        self._used[digest] = time.time()

    def cached_size(self, digest: str) -> int:
        """The local cache's copy only (the bucket's would be a download)."""
        return self.cache.cached_size(digest)

    def cached(self) -> dict[str, int]:
        """digest -> bytes of every copy in the local cache."""
        out = {}
        for info in self.cache.entries():
            out[info.digest] = info.allocated_bytes
        return out

    def _evict(self, keep: set[str] | None = None) -> int:
        """Remove least recently used cache copies until the cache fits ``cache_bytes``
        (never one in use, or used in the last ``recent_s`` seconds, or in ``keep``)."""
        cached = self.cached()
        total = sum(cached.values())
        if total <= self.cache_bytes:
            return 0
        try:
            spared = set(keep or ()) | set(self.in_use())
        except RuntimeError:  # the host's tables changed while read: evict nothing this time
            return 0
        now = time.time()
        freed = 0
        for digest in sorted(cached, key=lambda d: self._used.get(d, 0.0)):
            if total <= self.cache_bytes:
                break
            if digest in spared or now - self._used.get(digest, 0.0) < self.recent_s:
                continue
            with self._lock(digest):
                got = self.cache.delete(digest)
            self._used.pop(digest, None)
            total -= cached[digest]
            freed += got
            log.info("artifact %s: evicted from the local cache (%d bytes)", digest[:12],
                     cached[digest])
        return freed


def _recent_s() -> float:
    raw = os.environ.get("TENKI_ARTIFACT_RECENT_S", "").strip()
    if not raw:
        return RECENT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"TENKI_ARTIFACT_RECENT_S must be a number of seconds, got "
                              f"{raw!r}", field="TENKI_ARTIFACT_RECENT_S") from None
    if value < 0:
        raise ValidationError(f"TENKI_ARTIFACT_RECENT_S must not be negative, got {raw!r}",
                              field="TENKI_ARTIFACT_RECENT_S")
    return value


def _safe(exc: Exception) -> str:
    """botocore's message, without anything that could carry a credential (a presigned query)."""
    text = str(exc)
    return text.split("?", 1)[0] if "X-Amz-" in text else text

"""API keys: who is calling.

A key is ``tk_`` and 43 characters of base64url (256 random bits). Only its SHA-256 is stored;
a call is matched by that hash (an indexed lookup, then a constant-time comparison), so neither
the database nor the time a refusal takes gives the secret away. A key belongs to one
workspace; an admin key may also manage workspaces, keys and the server.

On its first start the local server mints an admin key of the ``default`` workspace and writes
it to ``$TENKI_HOME/admin.key`` (mode 0600), which the CLI and the SDK on that machine read: no
set-up step, and another local user, who cannot read the file, has no way in.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from ..errors import AuthenticationError, ValidationError
from ..fsync import fsync_path
from ..ids import new_id
from ..models import ApiKey, ApiKeyCreate, ApiKeyCreated
from ..store.tables import ApiKeyRow, WorkspaceRow
from .records import Records

log = logging.getLogger(__name__)

KEY_PREFIX = "tk_"
#: characters of the key shown in lists and the audit trail (``tk_`` and 8 more)
SHOWN_CHARS = 11
#: ``last_used_at`` is written at most this often per key (not once per call)
LAST_USED_EVERY_S = 60.0

EXPECTED = "expected the header Authorization: Bearer tk_<key>"


@dataclass(frozen=True)
class Principal:
    """The caller, as its key says: what it may see (``workspace_id``) and whether it may
    administer (``admin``)."""

    workspace_id: str
    admin: bool
    key_id: str
    key_prefix: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, workspace_id=row.workspace_id, prefix=row.prefix, name=row.name,
                  admin=bool(row.admin), created_at=row.created_at,
                  last_used_at=row.last_used_at, expires_at=row.expires_at,
                  revoked_at=row.revoked_at)


class KeyControl:
    def __init__(self, records: Records) -> None:
        self.records = records
        self._last_written: dict[str, float] = {}

    # -- calls -------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header, or ``AuthenticationError`` saying what
        is wrong (in one line, naming the header expected)."""
        if not authorization:
            raise AuthenticationError(f"no API key: {EXPECTED}")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(f"not a bearer token: {EXPECTED}")
        if not token.startswith(KEY_PREFIX) or len(token) > 256:
            raise AuthenticationError(f"not a tenki API key: {EXPECTED}")
        digest = hash_key(token)
        rows = self.records.all(ApiKeyRow, ApiKeyRow.key_hash == digest)
        row = rows[0] if rows else None
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise AuthenticationError(f"unknown API key {token[:SHOWN_CHARS]}…: {EXPECTED}")
        if row.revoked_at is not None:
            raise AuthenticationError(f"API key {row.prefix}… ({row.id}) was revoked: {EXPECTED}")
        t = now()
        if row.expires_at is not None and row.expires_at <= t:
            raise AuthenticationError(
                f"API key {row.prefix}… ({row.id}) expired at {row.expires_at.isoformat()}: "
                f"{EXPECTED}")
        await self._touch(row.id, t)
        return Principal(workspace_id=row.workspace_id, admin=bool(row.admin), key_id=row.id,
                         key_prefix=row.prefix)

    async def _touch(self, key_id: str, t: datetime) -> None:
        stamp = t.timestamp()
        if stamp - self._last_written.get(key_id, 0.0) < LAST_USED_EVERY_S:
            return
        self._last_written[key_id] = stamp
        await self.records.update(ApiKeyRow, key_id, notify=False, last_used_at=t)

    # -- records -----------------------------------------------------------------------------
    async def create(self, req: ApiKeyCreate) -> ApiKeyCreated:
        self.records.get(WorkspaceRow, req.workspace_id)
        expires = req.expires_at
        if expires is not None:
            expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
            if expires <= now():
                raise ValidationError(f"must be in the future, got {expires.isoformat()}",
                                      field="expires_at")
        secret = new_secret()
        row = ApiKeyRow(id=new_id("api_key"), workspace_id=req.workspace_id,
                        key_hash=hash_key(secret), prefix=secret[:SHOWN_CHARS], name=req.name,
                        admin=req.admin, created_at=now(), expires_at=expires)
        await self.records.insert(row, notify=False)
        log.info("%s: API key %s… created for %s%s", row.id, row.prefix, row.workspace_id,
                 " (admin)" if row.admin else "")
        return ApiKeyCreated(**to_model(row).model_dump(), key=secret)

    def query(self, workspace_id: str | None = None) -> list[ApiKey]:
        rows = (self.records.all(ApiKeyRow, ApiKeyRow.workspace_id == workspace_id)
                if workspace_id else self.records.all(ApiKeyRow))
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        row = self.records.get(ApiKeyRow, key_id)
        # one-way: only the first of two concurrent revokes writes its time
        if await self.records.update(ApiKeyRow, key_id, when={"revoked_at": None},
                                     revoked_at=now()):
            log.info("%s: API key %s… revoked", key_id, row.prefix)
        return to_model(self.records.get(ApiKeyRow, key_id))

    def workspaces_with_keys(self) -> list[str]:
        """Workspaces that have at least one usable key (for the server's start-up line)."""
        t = now()
        return sorted({r.workspace_id for r in self.records.all(ApiKeyRow)
                       if r.revoked_at is None and (r.expires_at is None or r.expires_at > t)})

    # -- the local admin key ---------------------------------------------------------------
    async def ensure_local_admin(self, path: Path, workspace_id: str) -> None:
        """Make ``path`` hold a usable admin key: keep the one there if it is registered and
        usable, register it if it is well formed but unknown (a key put there on purpose, as
        tests and provisioning do), otherwise mint a new one and write it (0600, atomically)."""
        secret = _read_key(path)
        if secret is not None:
            rows = self.records.all(ApiKeyRow, ApiKeyRow.key_hash == hash_key(secret))
            if not rows:
                try:
                    await self.records.insert(ApiKeyRow(
                        id=new_id("api_key"), workspace_id=workspace_id,
                        key_hash=hash_key(secret), prefix=secret[:SHOWN_CHARS],
                        name="local admin (admin.key)", admin=True, created_at=now()),
                        notify=False)
                    return
                except IntegrityError:  # registered meanwhile (another control plane)
                    rows = self.records.all(ApiKeyRow, ApiKeyRow.key_hash == hash_key(secret))
                    if not rows:
                        raise
            row = rows[0]
            usable = row.revoked_at is None and row.admin and (
                row.expires_at is None or row.expires_at > now())
            if usable and self.records.find(WorkspaceRow, row.workspace_id) is not None:
                return
        created = await self.create(ApiKeyCreate(workspace_id=workspace_id,
                                                 name="local admin (admin.key)", admin=True))
        _write_key(path, created.key)
        log.info("wrote the local admin key %s… to %s", created.prefix, path)


def _read_key(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    ok = text.startswith(KEY_PREFIX) and 16 <= len(text) <= 256 and text.isprintable()
    return text if ok and " " not in text else None


def _write_key(path: Path, secret: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (secret + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

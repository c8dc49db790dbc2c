"""Data-plane credentials: short-lived, per session, signed by this server.

The official SDKs send a session's exec and file calls with ``x-tenki-session-cert:
<credential>`` and no API key. A credential names one session and its workspace and expires
after ``LIFETIME_S``; the SDKs renew it (CreateSessionCredential) at half its life. It is an
HMAC over those fields with a secret kept in ``$TENKI_HOME/dataplane.key`` (0600), so a
restarted server still accepts the credentials it gave out, and nothing needs storing per
credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthenticationError

LIFETIME_S = 15 * 60
HEADER = "x-tenki-session-cert"
_PREFIX = "tkdp1."


@dataclass(frozen=True)
class Grant:
    session_id: str
    workspace_id: str
    expires_at: float


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Credentials:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_file(cls, path: Path) -> Credentials:
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            secret = secrets.token_bytes(32)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # two servers starting at once: the first file wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            return cls(path.read_bytes())

    def issue(self, session_id: str, workspace_id: str, now: float | None = None) -> Grant:
        return Grant(session_id, workspace_id, (now or time.time()) + LIFETIME_S)

    def encode(self, grant: Grant) -> str:
        body = _b64(json.dumps([grant.session_id, grant.workspace_id, int(grant.expires_at)],
                               separators=(",", ":")).encode())
        return f"{_PREFIX}{body}.{self._sign(body)}"

    def verify(self, credential: str | None, now: float | None = None) -> Grant:
        """The grant ``credential`` carries, or ``AuthenticationError`` saying what is wrong."""
        if not credential:
            raise AuthenticationError(f"no session credential: send {HEADER} (from "
                                      "CreateSession, WaitSession or CreateSessionCredential)")
        if not credential.startswith(_PREFIX) or len(credential) > 1024:
            raise AuthenticationError("not a tenki session credential")
        body, _, sig = credential[len(_PREFIX):].partition(".")
        if not hmac.compare_digest(sig, self._sign(body)):
            raise AuthenticationError("session credential not issued by this server")
        try:
            session_id, workspace_id, expires = json.loads(_unb64(body))
        except (ValueError, TypeError) as exc:
            raise AuthenticationError("malformed session credential") from exc
        if float(expires) <= (now or time.time()):
            raise AuthenticationError("session credential expired: renew it with "
                                      "CreateSessionCredential")
        return Grant(str(session_id), str(workspace_id), float(expires))

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest()[:24])

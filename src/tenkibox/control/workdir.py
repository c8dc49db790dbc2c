"""The guest's user and working directory, and how a file path names a file in the guest.

Every guest has the user ``tenki`` (uid 1000, HOME ``/home/tenki``, passwordless sudo), as the
product's guests do. One rule for both surfaces: a relative path is relative to ``/home/tenki``.
The official SDKs' data plane (gRPC) is confined to that directory, as the product is: an
absolute path outside it is refused ("path outside workdir"). Our REST API and CLI, which
already run commands as root, also accept absolute paths anywhere (``confined=False``).
"""

from __future__ import annotations

import posixpath
from typing import Final

from ..errors import ValidationError

USER: Final = "tenki"
UID = GID = 1000
WORKDIR = "/home/tenki"
USER_ENV = {"HOME": WORKDIR, "USER": USER, "LOGNAME": USER}


def resolve(path: str, *, confined: bool, field: str = "path") -> str:
    """The absolute, normalised guest path of ``path``."""
    if not path:
        raise ValidationError("must not be empty", field=field)
    if "\x00" in path:
        raise ValidationError("must not contain NUL", field=field)
    full = posixpath.normpath(posixpath.join(WORKDIR, path))
    if full.startswith("//"):
        full = "/" + full.lstrip("/")
    if confined and full != WORKDIR and not full.startswith(WORKDIR + "/"):
        raise ValidationError(f"path outside workdir {WORKDIR}: {path[:200]!r}", field=field)
    return full

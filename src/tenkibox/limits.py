"""Input limits of the API, in one place (documented in ``docs/limits.md``).

The request models (``tenkibox.models``) enforce the field limits, so the SDK checks them
locally and the server answers 422 ``ValidationError`` naming the field; the server's body
limit middleware (``tenkibox.api.errors.BodyLimitMiddleware``) enforces the body sizes with 413
``PayloadTooLarge``. Sizes in bytes are measured on the UTF-8 encoding; lengths in characters
are Unicode code points.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20

# -- names, ids -------------------------------------------------------------------------------

#: Names of sessions, snapshots and volumes: 1..64 characters, no control characters other
#: than tab and newline.
NAME_MIN_CHARS = 1
NAME_MAX_CHARS = 64

#: ``session_id``, ``snapshot_id``, ``volume_id``, ``base_image_id``, ``workspace_id``.
ID_MAX_CHARS = 64
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ID_RE = re.compile(ID_PATTERN)

# -- maps (metadata, env) ---------------------------------------------------------------------

MAP_MAX_ENTRIES = 64
KEY_MAX_CHARS = 128
VALUE_MAX_BYTES = 8 * KiB

#: Environment variable names (also checked by the CLI).
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_KEY_RE = re.compile(ENV_KEY_PATTERN)

# -- exec -------------------------------------------------------------------------------------

ARGV_MAX_ITEMS = 1024
ARG_MAX_BYTES = 128 * KiB  # one argument (Linux MAX_ARG_STRLEN)
ARGV_MAX_TOTAL_BYTES = 1 * MiB
COMMAND_MAX_BYTES = 128 * KiB
#: ``stdin_data`` is base64; this bounds the decoded bytes.
STDIN_DATA_MAX_BYTES = 8 * MiB
STDIN_DATA_MAX_CHARS = 4 * ((STDIN_DATA_MAX_BYTES + 2) // 3)

# -- paths, durations, lists ------------------------------------------------------------------

#: ``cwd``, volume mount paths, the ``path`` of the files API (Linux PATH_MAX).
PATH_MAX_BYTES = 4096
#: ``timeout_s``, ``max_duration_s``: finite, positive, at most ten years.
DURATION_MAX_S = 10 * 365 * 86400.0
#: Volumes attached at create time.
VOLUME_MOUNTS_MAX = 16

# -- network policy (``tenkibox.control.egress``) ---------------------------------------------

#: ``egress.allow_domains``: names or ``*.`` wildcards, each at most 253 characters (DNS).
EGRESS_DOMAINS_MAX = 256
EGRESS_DOMAIN_MAX_CHARS = 253
#: ``egress.allow_cidrs``: IPv4 networks (``a.b.c.d/n``, at most 18 characters).
EGRESS_CIDRS_MAX = 64
EGRESS_CIDR_MAX_CHARS = 18

# -- HTTP -------------------------------------------------------------------------------------

#: Any JSON request body (and any request body but the file upload's, unless listed below).
JSON_BODY_MAX_BYTES = 1 * MiB
#: ``POST /v1/sessions/{id}/processes``: argv, command, env and base64 ``stdin_data`` together.
EXEC_BODY_MAX_BYTES = 16 * MiB
#: ``POST /v1/sessions/{id}/processes/{pid}/stdin``: one raw write (the CLI sends 64 KiB).
STDIN_WRITE_MAX_BYTES = 8 * MiB
#: ``PUT /v1/sessions/{id}/files``: streamed, not limited by default (None).
UPLOAD_MAX_BYTES: int | None = None
#: Each query or path parameter (after percent-decoding).
PARAM_MAX_CHARS = 4096

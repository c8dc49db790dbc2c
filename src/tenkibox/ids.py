"""Typed, prefixed identifiers: ``ses_``, ``snp_``, ``vol_``, ``img_``, ``prc_``, ``ws_``,
``key_``, ``tpl_``, ``bld_``, ``prt_`` (an exposed port)."""

from __future__ import annotations

import secrets

PREFIXES = {"session": "ses", "snapshot": "snp", "volume": "vol", "image": "img", "process": "prc",
            "workspace": "ws", "api_key": "key", "template": "tpl", "build": "bld",
            "port": "prt"}
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_id(kind: str) -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    return f"{PREFIXES[kind]}_{body}"


def hostname_for(session_id: str) -> str:
    """The guest hostname of a session (a booted or restored one gets its own)."""
    return f"tenki-{session_id.split('_', 1)[-1][:8]}"

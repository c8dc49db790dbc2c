"""Addresses a client on this machine uses to reach a listener."""

from __future__ import annotations

import ipaddress


def local_url(host: str, port: int, scheme: str) -> str:
    """The URL a client on this machine uses (a wildcard address is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

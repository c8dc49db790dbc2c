"""``tenki sandbox port ...``: ports of a running session's guest exposed through the server's
preview proxy (a URL with a token)."""

from __future__ import annotations

import click

from .. import limits, models
from . import _common as c
from .sandbox import options_named


@click.group("port")
def port() -> None:
    """Expose ports of a running session at preview URLs (sessions created with inbound
    access only)."""


def _port(text: str) -> int:
    n = c.parse_int_range(text, "--port", models.PORT_MIN, models.PORT_MAX)
    assert n is not None
    return n


@port.command("expose")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--port", "port_text", required=True, metavar="N",
              help="The guest's TCP port (1..65535).")
@click.option("--ttl", metavar="DURATION",
              help="Close it after this long (e.g. 1h; default: when the session stops "
              "running or it is unexposed).")
@c.json_option
@click.pass_context
def expose(ctx: click.Context, session_id: str, port_text: str, ttl: str | None,
           as_json: bool) -> None:
    """Make a port of the session reachable; prints its URL (the token in it lets requests
    in, as does an API key of the workspace). Exposing an exposed port prints its URL again
    (with --ttl: its expiry moves)."""
    n = _port(port_text)
    ttl_s = c.parse_duration(ttl, "--ttl")
    if ttl_s is not None and ttl_s > limits.DURATION_MAX_S:
        raise c.ValidationError(f"must be at most ten years, got {ttl!r}", field="--ttl")
    with options_named({"port": "--port", "ttl": "--ttl", "ttl_s": "--ttl"}):
        exposed = c.client(ctx).expose_port(session_id, n, ttl_s)
    if as_json:
        c.print_json(exposed)
    else:
        click.echo(exposed.url)


@port.command("list")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, session_id: str, as_json: bool) -> None:
    """List the session's exposed ports."""
    ports = c.client(ctx).list_ports(session_id)
    if as_json:
        c.print_json(ports)
        return
    rows = [[str(p.port), p.url, c.fmt_time(p.expires_at), c.fmt_time(p.created_at)]
            for p in ports]
    c.print_table(["PORT", "URL", "EXPIRES", "CREATED"], rows, "no exposed ports")


@port.command("unexpose")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--port", "port_text", required=True, metavar="N", help="The exposed port.")
@c.json_option
@click.pass_context
def unexpose(ctx: click.Context, session_id: str, port_text: str, as_json: bool) -> None:
    """Close an exposed port: its URL stops working and live connections are cut."""
    n = _port(port_text)
    with options_named({"port": "--port"}):
        c.client(ctx).unexpose_port(session_id, n)
    if as_json:
        c.print_json({"session_id": session_id, "port": n, "exposed": False})
    else:
        click.echo(f"port {n} of {session_id} unexposed")

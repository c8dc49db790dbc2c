"""``tenki audit list``: the server's audit log."""

from __future__ import annotations

import click

from ..client import _core as core
from . import _common as c


@click.group("audit")
def audit() -> None:
    """The audit log: who called what, and how it ended."""


@audit.command("list")
@click.option("--workspace", "workspace_id", metavar="ID", help="Only this workspace's entries.")
@click.option("--limit", default=str(core.AUDIT_LIMIT_DEFAULT), show_default=True, metavar="N",
              help=f"At most N entries ({core.AUDIT_LIMIT_MIN}-{core.AUDIT_LIMIT_MAX}).")
@click.option("--before-id", metavar="ID",
              help="Only entries older than this one (to page: the last ID shown).")
@c.json_option
@click.pass_context
def list_(
    ctx: click.Context,
    workspace_id: str | None,
    limit: str,
    before_id: str | None,
    as_json: bool,
) -> None:
    """List audit entries, newest first (a workspace key sees its workspace's)."""
    n = c.parse_int_range(limit, "--limit", core.AUDIT_LIMIT_MIN, core.AUDIT_LIMIT_MAX)
    before = c.parse_int_range(before_id, "--before-id", 1, (1 << 63) - 1)
    assert n is not None
    entries = c.client(ctx).list_audit(workspace_id, limit=n, before_id=before)
    if as_json:
        c.print_json(entries)
        return
    rows = [
        [
            str(e.id),
            c.fmt_time(e.at),
            e.workspace_id or "-",
            e.key_prefix or "-",
            e.action,
            e.object_id or "-",
            f"{e.status} {e.outcome}",
        ]
        for e in entries
    ]
    c.print_table(["ID", "AT", "WORKSPACE", "KEY", "ACTION", "OBJECT", "STATUS"], rows,
                  "no audit entries")

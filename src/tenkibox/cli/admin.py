"""``tenki admin ...``: operating the server's store."""

from __future__ import annotations

import click

from . import _common as c


@click.group("admin")
def admin() -> None:
    """Administration: check the store."""


@admin.command("verify")
@click.option("--repair", is_flag=True,
              help="Mark snapshots with damaged artifacts FAILED; remove files no record owns.")
@c.json_option
@click.pass_context
def verify(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Re-read every stored artifact against its digest; name what is damaged or unowned.
    Exits 1 when something is wrong (after --repair: when something was)."""
    with c.spinner("Verifying the store (every artifact is read in full)"):
        report = c.client(ctx).verify_store(repair)
    if as_json:
        c.print_json(report)
    else:
        click.echo(f"checked {report.checked} artifacts: "
                   + ("all intact" if report.ok else "problems found"))
        for d in report.damaged:
            for problem in d.problems:
                click.echo(c.escape_text(f"snapshot {d.snapshot_id}: {problem}"
                                         + (" (marked FAILED)" if repair else "")))
        for item in report.unowned:
            click.echo(c.escape_text(f"unowned {item.kind}: {item.name}"
                                     + (" (removed)" if repair else "")))
    if not report.ok:
        ctx.exit(1)

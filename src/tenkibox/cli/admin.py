"""``tenki admin ...``: operating the server's store."""

from __future__ import annotations

import click

from . import _common as c


@click.group("admin")
def admin() -> None:
    """Administration: check the store."""


@admin.command("verify")
@click.option("--repair", is_flag=True,
              help="Mark snapshots with damaged artifacts FAILED, rebuild damaged RAM caches, "
              "remove files no record owns.")
@c.json_option
@click.pass_context
def verify(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Re-read every stored artifact in use (snapshots, images, running VMs) and the RAM caches
    against their digests; name what is damaged or unowned. Exits 1 when something is wrong
    (after --repair: when something was)."""
    with c.spinner("Verifying the store (every artifact is read in full)"):
        report = c.client(ctx).verify_store(repair)
    if as_json:
        c.print_json(report)
    else:
        click.echo(f"checked {report.checked} artifacts: "
                   + ("all intact" if report.ok else "problems found"))
        lines = [f"snapshot {d.snapshot_id}: {problem}" + (" (marked FAILED)" if repair else "")
                 for d in report.damaged for problem in d.problems]
        lines += [f"image {d.image_id}: {problem} (rebuild it: tenki image build --force)"
                  for d in report.damaged_images for problem in d.problems]
        lines += [f"session {d.session_id}: {problem}"
                  for d in report.damaged_sessions for problem in d.problems]
        lines += list(report.damaged_caches.values())
        lines += [f"RAM cache {digest[:12]}: damaged (rebuilt)" for digest in report.rebuilt]
        removed = {(item.kind, item.name) for item in report.removed}
        lines += [f"unowned {item.kind}: {item.name}"
                  + (" (removed)" if (item.kind, item.name) in removed else "")
                  for item in report.unowned]
        for line in lines:
            click.echo(c.escape_text(line))
    if not report.ok:
        ctx.exit(1)

"""``tenki host status``: the host's capacity as the admission of sessions counts it."""

from __future__ import annotations

import click

from .. import units
from . import _common as c


@click.group("host")
def host() -> None:
    """This machine's capacity for sessions (admin key)."""


def fmt_mib(mib: int) -> str:
    """``4096`` -> ``"4096 MiB (4.0 GiB)"``."""
    if abs(mib) < 1024:
        return f"{mib} MiB"
    return f"{mib} MiB ({units.format_size(mib << 20)})"


@host.command("status")
@c.json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Memory: total, reserved, capacity (after overcommit), promised to guests and used; the
    tmpfs of the VMs' run directories (guest RAM of booted VMs, capture staging)."""
    h = c.client(ctx).host_status()
    if as_json:
        c.print_json(h)
        return
    c.print_fields(
        [
            ("host_id", h.host_id),
            ("accelerator", h.accelerator),
            ("network", "enforced (namespaces, nftables)" if h.network_enforced
             else "not enforced (default policy only)"),
            ("cpus", str(h.cpus)),
            ("sessions", str(h.sessions)),
            ("memory_total", fmt_mib(h.memory_total_mib)),
            ("memory_reserve", fmt_mib(h.memory_reserve_mib)),
            ("overcommit", f"{h.overcommit:g}"),
            ("memory_capacity", fmt_mib(h.memory_capacity_mib)),
            ("memory_promised", fmt_mib(h.memory_promised_mib)),
            ("memory_used", fmt_mib(h.memory_used_mib)),
            ("tmpfs", f"{units.format_size(h.tmpfs_used_bytes)} used of "
                      f"{units.format_size(h.tmpfs_total_bytes)}"),
        ]
    )
host.add_command(__import__(f"{__package__}.host_run", fromlist=["run"]).run)  # tenki host run

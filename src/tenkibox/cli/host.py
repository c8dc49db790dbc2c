"""``tenki host status``: the capacity as the admission of sessions counts it (all hosts
together); ``tenki host list|get|drain|undrain|remove``: the hosts of the control plane."""

from __future__ import annotations

import click

from .. import models, units
from . import _common as c


@click.group("host")
def host() -> None:
    """The hosts that run sessions, and their capacity (admin key)."""


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
            ("spares", ", ".join(f"{s.session_id} (of {s.snapshot_id})" for s in h.spares)
             or "none"),
        ]
    )


def _memory(h: models.HostInfo) -> str:
    return f"{h.memory_promised_mib}/{h.memory_capacity_mib} MiB"


@host.command("list")
@c.json_option
@click.pass_context
def list_hosts(ctx: click.Context, as_json: bool) -> None:
    """Every host: the embedded one (local) first, then the registered workers."""
    hosts = c.client(ctx).hosts.list()
    if as_json:
        c.print_json(hosts)
        return
    c.print_table(
        ["HOST", "STATE", "ADDRESS", "SESSIONS", "MEMORY (PROMISED/CAPACITY)", "ACCEL",
         "LAST HEARTBEAT"],
        [[h.host_id, c.fmt_state(h.state), h.address or "-", str(h.sessions), _memory(h),
          h.accelerator, c.fmt_time(h.last_heartbeat_at)] for h in hosts],
        empty="no hosts",
    )


def _print_host(h: models.HostInfo) -> None:
    c.print_fields(
        [
            ("host_id", h.host_id),
            ("state", c.fmt_state(h.state, h.state_reason)),
            ("address", h.address or "- (embedded)"),
            ("accelerator", h.accelerator),
            ("qemu_version", h.qemu_version or "-"),
            ("cpu_model", h.cpu_model or "-"),
            ("network", "enforced" if h.network_enforced else "not enforced"),
            ("cpus", str(h.cpus)),
            ("sessions", str(h.sessions)),
            ("memory_total", fmt_mib(h.memory_total_mib)),
            ("memory_reserve", fmt_mib(h.memory_reserve_mib)),
            ("overcommit", f"{h.overcommit:g}"),
            ("memory_capacity", fmt_mib(h.memory_capacity_mib)),
            ("memory_promised", fmt_mib(h.memory_promised_mib)),
            ("memory_used", fmt_mib(h.memory_used_mib)),
            ("disk", f"{units.format_size(h.disk_free_bytes)} free of "
                     f"{units.format_size(h.disk_total_bytes)}"),
            ("registered_at", c.fmt_time(h.registered_at)),
            ("last_heartbeat_at", c.fmt_time(h.last_heartbeat_at)),
        ]
    )


@host.command("get")
@click.argument("host_id")
@c.json_option
@click.pass_context
def get_host(ctx: click.Context, host_id: str, as_json: bool) -> None:
    """One host."""
    h = c.client(ctx).hosts.get(host_id)
    if as_json:
        c.print_json(h)
    else:
        _print_host(h)


@host.command("drain")
@click.argument("host_id")
@c.json_option
@click.pass_context
def drain(ctx: click.Context, host_id: str, as_json: bool) -> None:
    """No new sessions on HOST_ID; those it runs go on."""
    h = c.client(ctx).hosts.drain(host_id)
    if as_json:
        c.print_json(h)
    else:
        click.echo(f"{h.host_id}: {h.state.value} ({h.sessions} sessions run on)")


@host.command("undrain")
@click.argument("host_id")
@c.json_option
@click.pass_context
def undrain(ctx: click.Context, host_id: str, as_json: bool) -> None:
    """HOST_ID takes new sessions again."""
    h = c.client(ctx).hosts.undrain(host_id)
    if as_json:
        c.print_json(h)
    else:
        click.echo(f"{h.host_id}: {h.state.value}")


@host.command("remove")
@click.argument("host_id")
@click.option("--force", is_flag=True,
              help="Also with sessions placed on it (they are terminated first).")
@c.json_option
@click.pass_context
def remove(ctx: click.Context, host_id: str, force: bool, as_json: bool) -> None:
    """Forget HOST_ID (refused while sessions are placed on it, unless --force)."""
    c.client(ctx).hosts.remove(host_id, force=force)
    if as_json:
        c.print_json({"host_id": host_id, "removed": True})
    else:
        click.echo(f"{host_id}: removed")


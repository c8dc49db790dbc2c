"""``tenki sandbox snapshot ...``: capture, list, inspect, update, delete and restore snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from .. import limits, models, units
from . import _common as c
from .sandbox import check_name, create_options, options_named, run_create


@click.group("snapshot")
def snapshot() -> None:
    """Point-in-time VM snapshots (memory + disk) of sessions."""


def print_snapshot(s: models.Snapshot) -> None:
    c.print_fields(
        [
            ("id", s.id),
            ("name", s.name or "-"),
            ("session_id", s.session_id),
            ("workspace_id", s.workspace_id or "-"),
            ("state", c.fmt_state(s.state, s.state_reason)),
            ("size", units.format_size(s.size_bytes)),
            ("compressed", units.format_size(s.compressed_bytes)),
            ("unique", units.format_size(s.unique_bytes)),
            ("memory", units.format_size(s.memory_bytes)),
            ("base_image_id", s.base_image_id),
            ("cpu", str(s.cpu)),
            ("memory_mb", str(s.memory_mb)),
            ("created_at", c.fmt_time(s.created_at)),
            ("ready_at", c.fmt_time(s.ready_at)),
            ("expires_at", c.fmt_time(s.expires_at)),
        ]
    )


@snapshot.command("create")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--name", required=True, help="A name for the snapshot.")
@click.option(
    "--expires-at", metavar="RFC3339", help="Delete it after this time (UTC if no offset)."
)
@click.option(
    "--wait-timeout",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="How long to wait for READY.",
)
@click.option("--no-wait", is_flag=True, help="Return at once (state CREATING).")
@c.json_option
@click.pass_context
def create(
    ctx: click.Context,
    session_id: str,
    name: str,
    expires_at: str | None,
    wait_timeout: str,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Snapshot a session and wait until the snapshot is READY; prints its id."""
    when = c.parse_expires_at(expires_at)
    timeout = c.parse_duration(wait_timeout, "--wait-timeout")
    if len(name) > limits.NAME_MAX_CHARS:
        raise c.ValidationError(f"must be at most {limits.NAME_MAX_CHARS} characters, got "
                                f"{len(name)}", field="--name")
    cl = c.client(ctx)
    snap = cl.create_snapshot(session_id, name, when)
    if not no_wait:
        with c.spinner(f"Snapshot {snap.id} of {session_id}: {snap.state.value}"):
            snap = cl.wait_snapshot_ready(snap.id, timeout)
    if as_json:
        c.print_json(snap)
    else:
        click.echo(snap.id)


@snapshot.command("list")
@click.option("--session", "session_id", metavar="ID", help="Only snapshots of this session.")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, session_id: str | None, as_json: bool) -> None:
    """List snapshots (deleted ones are not listed)."""
    snaps = c.client(ctx).list_snapshots(session_id)
    if as_json:
        c.print_json(snaps)
        return
    rows = [
        [
            s.id,
            s.name or "-",
            s.session_id,
            s.state.value,
            units.format_size(s.size_bytes),
            units.format_size(s.compressed_bytes),
            units.format_size(s.unique_bytes),
            c.fmt_time(s.created_at),
            c.fmt_time(s.expires_at),
        ]
        for s in snaps
    ]
    # STORED: what its capture newly stored; UNIQUE: what deleting it would free now
    cols = ["ID", "NAME", "SESSION", "STATE", "SIZE", "STORED", "UNIQUE", "CREATED", "EXPIRES"]
    c.print_table(cols, rows, "no snapshots")


@snapshot.command("get")
@click.argument("snapshot_id", metavar="ID")
@c.json_option
@click.pass_context
def get(ctx: click.Context, snapshot_id: str, as_json: bool) -> None:
    """Show one snapshot."""
    snap = c.client(ctx).get_snapshot(snapshot_id)
    if as_json:
        c.print_json(snap)
    else:
        print_snapshot(snap)


@snapshot.command("update")
@click.argument("snapshot_id", metavar="ID")
@click.option("--name", help=f"A new name (up to {limits.NAME_MAX_CHARS} characters).")
@click.option(
    "--expires-at",
    metavar="WHEN",
    help="Delete it after this time: RFC 3339 (UTC if no offset) or a duration from now "
    "(e.g. 30d, 12h).",
)
@click.option("--no-expiry", is_flag=True, help="Remove its expiry: it is kept until deleted.")
@c.json_option
@click.pass_context
def update(
    ctx: click.Context,
    snapshot_id: str,
    name: str | None,
    expires_at: str | None,
    no_expiry: bool,
    as_json: bool,
) -> None:
    """Rename a snapshot and/or change its expiry; what is not given stays."""
    if expires_at is not None and no_expiry:
        raise c.ValidationError("give --expires-at or --no-expiry, not both", field="--no-expiry")
    check_name(name)
    when = c.parse_expiry(expires_at, "--expires-at")
    if name is None and when is None and not no_expiry:
        raise click.UsageError("nothing to change: give --name, --expires-at or --no-expiry")
    with options_named({"name": "--name", "expires_at": "--expires-at",
                        "clear_expiry": "--no-expiry"}):
        snap = c.client(ctx).update_snapshot(snapshot_id, name=name, expires_at=when,
                                             clear_expiry=no_expiry)
    if as_json:
        c.print_json(snap)
    else:
        print_snapshot(snap)


@snapshot.command("delete")
@click.argument("snapshot_id", metavar="ID")
@c.json_option
@click.pass_context
def delete(ctx: click.Context, snapshot_id: str, as_json: bool) -> None:
    """Delete a snapshot (sessions restored from it are unaffected)."""
    snap = c.client(ctx).delete_snapshot(snapshot_id)
    if as_json:
        c.print_json(snap)
    else:
        click.echo(f"{snap.id} {snap.state.value}")


@snapshot.command("restore")
@click.argument("snapshot_id", metavar="ID")
@create_options(with_snapshot=False)
@click.pass_context
def restore(ctx: click.Context, snapshot_id: str, volumes: Sequence[str], **opts: Any) -> None:
    """Restore a snapshot as a new session (= sandbox create --snapshot ID); prints its id.

    Volumes are not re-attached: pass --volume VOL:/path to attach them again.
    """
    run_create(ctx, snapshot_id=snapshot_id, volumes=volumes, **opts)

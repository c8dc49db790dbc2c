"""``tenki sandbox volume ...``: durable block volumes."""

from __future__ import annotations

import click

from .. import limits, models, units
from . import _common as c


@click.group("volume")
def volume() -> None:
    """Durable volumes: created, attached and detached explicitly; never in snapshots."""


def print_volume(v: models.Volume) -> None:
    c.print_fields(
        [
            ("id", v.id),
            ("name", v.name),
            ("size", units.format_size(v.size_bytes)),
            ("state", v.state.value),
            ("session_id", v.session_id or "-"),
            ("path", (v.path or "-") + (" (read-only)" if v.path and v.read_only else "")),
            ("created_at", c.fmt_time(v.created_at)),
        ]
    )


@volume.command("create")
@click.option("--name", required=True, help="A name for the volume.")
@click.option("--size", required=True, metavar="SIZE", help="Size, e.g. 1GiB (1 MiB..100 GiB).")
@c.json_option
@click.pass_context
def create(ctx: click.Context, name: str, size: str, as_json: bool) -> None:
    """Create a volume; prints its id."""
    size_b = c.parse_size(size, "--size")
    if len(name) > limits.NAME_MAX_CHARS:
        raise c.ValidationError(f"must be at most {limits.NAME_MAX_CHARS} characters, got "
                                f"{len(name)}", field="--name")
    vol = c.client(ctx).create_volume(name, size_b)
    if as_json:
        c.print_json(vol)
    else:
        click.echo(vol.id)


@volume.command("list")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List volumes."""
    vols = c.client(ctx).list_volumes()
    if as_json:
        c.print_json(vols)
        return
    rows = [
        [
            v.id,
            v.name,
            units.format_size(v.size_bytes),
            v.state.value,
            v.session_id or "-",
            (v.path or "-") + (":ro" if v.path and v.read_only else ""),
            c.fmt_time(v.created_at),
        ]
        for v in vols
    ]
    c.print_table(["ID", "NAME", "SIZE", "STATE", "SESSION", "PATH", "CREATED"], rows, "no volumes")


@volume.command("get")
@click.argument("volume_id", metavar="ID")
@c.json_option
@click.pass_context
def get(ctx: click.Context, volume_id: str, as_json: bool) -> None:
    """Show one volume."""
    vol = c.client(ctx).get_volume(volume_id)
    if as_json:
        c.print_json(vol)
    else:
        print_volume(vol)


@volume.command("delete")
@click.argument("volume_id", metavar="ID")
@c.json_option
@click.pass_context
def delete(ctx: click.Context, volume_id: str, as_json: bool) -> None:
    """Delete a volume and its data (it must be detached)."""
    vol = c.client(ctx).delete_volume(volume_id)
    if as_json:
        c.print_json(vol)
    else:
        click.echo(f"{vol.id} {vol.state.value}")


@volume.command("attach")
@click.argument("volume_id", metavar="VOL")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--path", required=True, metavar="/PATH", help="Mount point in the session.")
@click.option("--ro", "read_only", is_flag=True, help="Mount read-only.")
@c.json_option
@click.pass_context
def attach(
    ctx: click.Context, volume_id: str, session_id: str, path: str, read_only: bool, as_json: bool
) -> None:
    """Attach volume VOL to a running session at --path."""
    if not path.startswith("/"):
        raise c.ValidationError(f"must be an absolute path, got {path!r}", field="--path")
    with c.spinner(f"Attaching {volume_id} to {session_id}"):
        session = c.client(ctx).attach_volume(session_id, volume_id, path, read_only)
    if as_json:
        c.print_json(session.record)
    else:
        text = f"{volume_id} attached to {session_id} at {path}"
        click.echo(c.escape_text(text) + (" (read-only)" if read_only else ""))


@volume.command("detach")
@click.argument("volume_id", metavar="VOL")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@c.json_option
@click.pass_context
def detach(ctx: click.Context, volume_id: str, session_id: str, as_json: bool) -> None:
    """Detach volume VOL from a session (its data stays in the volume)."""
    with c.spinner(f"Detaching {volume_id} from {session_id}"):
        session = c.client(ctx).detach_volume(session_id, volume_id)
    if as_json:
        c.print_json(session.record)
    else:
        click.echo(f"{volume_id} detached from {session_id}")

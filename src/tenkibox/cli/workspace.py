"""``tenki workspace ...``: workspaces, their quotas and their usage."""

from __future__ import annotations

from collections.abc import Sequence

import click

from .. import limits, models, units
from ..client import _core as core
from ..errors import ValidationError
from . import _common as c

#: ``--quota NAME=none`` (or ``unlimited``) removes that limit.
_NO_LIMIT = ("none", "unlimited")
#: Quotas whose value is a size (``10G``, ``512MiB``, or bytes); the others are integers.
_SIZE_QUOTAS = frozenset({"max_stored_bytes"})
#: ``Usage`` field of each quota.
_USAGE_FIELD = {name: name.removeprefix("max_") for name in models.QUOTA_NAMES}


@click.group("workspace")
def workspace() -> None:
    """Workspaces: who owns sessions, snapshots and volumes, with their quotas (admin key)."""


def parse_quotas(items: Sequence[str], option: str = "--quota") -> dict[str, int | None]:
    """``("max_volumes=10", "max_stored_bytes=10G", "max_snapshots=none")`` -> limits by name
    (None: no limit). Sizes take units for ``max_stored_bytes``; the others are integers."""
    out: dict[str, int | None] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise ValidationError(f"expected NAME=VALUE, got {item!r}", field=option)
        if name not in models.QUOTA_NAMES:
            raise ValidationError(
                f"unknown quota {name!r} (valid: {', '.join(models.QUOTA_NAMES)})", field=option
            )
        if name in out:
            raise ValidationError(f"{name} given twice", field=option)
        where = f"{option} {name}"
        if raw.lower() in _NO_LIMIT:
            out[name] = None
        elif name in _SIZE_QUOTAS:
            if raw.startswith("-"):
                raise ValidationError(f"must not be negative, got {raw!r}", field=where)
            out[name] = units.parse_size(raw, field=where)
        else:
            try:
                out[name] = int(raw, 10)
            except ValueError:
                raise ValidationError(
                    f"must be an integer, or none for no limit, got {raw!r}", field=where
                ) from None
        try:  # the model's bounds (>= 0, at most ...), reported with the option's name
            core.quotas({name: out[name]}, field=where)
        except ValidationError as exc:
            raise ValidationError(exc.message.removeprefix(f"{where}.{name}: "),
                                  field=where) from None
    return out


def _check_name(name: str | None) -> None:
    if name is not None and len(name) > limits.NAME_MAX_CHARS:
        raise ValidationError(
            f"must be at most {limits.NAME_MAX_CHARS} characters, got {len(name)}", field="--name"
        )


def fmt_limit(name: str, value: int | None) -> str:
    if value is None:
        return "unlimited"
    if name in _SIZE_QUOTAS:
        return units.format_size(value)
    if name == "max_memory_mib":
        return f"{value} MiB"
    return str(value)


def fmt_quotas(q: models.Quotas) -> str:
    """The limits set, ``name=value`` separated by blanks; ``-`` for none."""
    parts = [
        f"{name}={fmt_limit(name, getattr(q, name)).replace(' ', '')}"
        for name in models.QUOTA_NAMES
        if getattr(q, name) is not None
    ]
    return " ".join(parts) or "-"


def print_workspace(w: models.Workspace) -> None:
    c.print_fields(
        [
            ("id", w.id),
            ("name", w.name),
            *[(name, fmt_limit(name, getattr(w.quotas, name))) for name in models.QUOTA_NAMES],
            ("created_at", c.fmt_time(w.created_at)),
            ("updated_at", c.fmt_time(w.updated_at)),
        ]
    )


_QUOTA_HELP = (
    f"A limit, NAME=VALUE, repeatable; NAME one of {', '.join(models.QUOTA_NAMES)}; VALUE an "
    "integer (max_stored_bytes: a size such as 10G), or none for no limit."
)


@workspace.command("create")
@click.option("--name", required=True, help="A name for the workspace.")
@click.option("--quota", "quota", multiple=True, metavar="NAME=VALUE", help=_QUOTA_HELP)
@c.json_option
@click.pass_context
def create(ctx: click.Context, name: str, quota: tuple[str, ...], as_json: bool) -> None:
    """Create a workspace; prints its id."""
    _check_name(name)
    quotas = parse_quotas(quota)
    ws = c.client(ctx).create_workspace(name, quotas or None)
    if as_json:
        c.print_json(ws)
    else:
        click.echo(c.escape_text(ws.id))


@workspace.command("list")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List the workspaces (a workspace key sees its own)."""
    items = c.client(ctx).list_workspaces()
    if as_json:
        c.print_json(items)
        return
    rows = [[w.id, w.name, fmt_quotas(w.quotas), c.fmt_time(w.created_at)] for w in items]
    c.print_table(["ID", "NAME", "QUOTAS", "CREATED"], rows, "no workspaces")


@workspace.command("get")
@click.argument("workspace_id", metavar="ID")
@c.json_option
@click.pass_context
def get(ctx: click.Context, workspace_id: str, as_json: bool) -> None:
    """Show one workspace and its quotas."""
    ws = c.client(ctx).get_workspace(workspace_id)
    if as_json:
        c.print_json(ws)
    else:
        print_workspace(ws)


@workspace.command("update")
@click.argument("workspace_id", metavar="ID")
@click.option("--name", help="A new name.")
@click.option("--quota", "quota", multiple=True, metavar="NAME=VALUE",
              help=_QUOTA_HELP + " Quotas not given are left as they are.")
@c.json_option
@click.pass_context
def update(
    ctx: click.Context, workspace_id: str, name: str | None, quota: tuple[str, ...], as_json: bool
) -> None:
    """Rename a workspace or change some of its quotas."""
    _check_name(name)
    quotas = parse_quotas(quota)
    if name is None and not quotas:
        raise click.UsageError("nothing to change: give --name or --quota")
    ws = c.client(ctx).update_workspace(workspace_id, name=name, quotas=quotas or None)
    if as_json:
        c.print_json(ws)
    else:
        print_workspace(ws)


@workspace.command("delete")
@click.argument("workspace_id", metavar="ID")
@c.json_option
@click.pass_context
def delete(ctx: click.Context, workspace_id: str, as_json: bool) -> None:
    """Delete a workspace (it must hold no sessions, snapshots or volumes)."""
    ws = c.client(ctx).delete_workspace(workspace_id)
    if as_json:
        c.print_json(ws)
    else:
        click.echo(c.escape_text(f"{ws.id} deleted"))


@workspace.command("usage")
@click.argument("workspace_id", metavar="ID")
@c.json_option
@click.pass_context
def usage(ctx: click.Context, workspace_id: str, as_json: bool) -> None:
    """What a workspace holds now, against its quotas."""
    u = c.client(ctx).workspace_usage(workspace_id)
    if as_json:
        c.print_json(u)
        return
    rows = [
        [
            name,
            fmt_limit(name, getattr(u, _USAGE_FIELD[name])),
            fmt_limit(name, getattr(u.quotas, name)),
        ]
        for name in models.QUOTA_NAMES
    ]
    c.print_table(["QUOTA", "IN USE", "LIMIT"], rows, "no quotas")

"""``tenki apikey ...``: API keys of workspaces (admin key)."""

from __future__ import annotations

import click

from .. import limits, models
from ..errors import ValidationError
from . import _common as c


@click.group("apikey")
def apikey() -> None:
    """API keys: create (the secret is shown once), list and revoke (admin key)."""


def _name(k: models.ApiKey) -> str:
    return (k.name or "-") + (" (admin)" if k.admin else "")


@apikey.command("create")
@click.option("--workspace", "workspace_id", required=True, metavar="ID",
              help="The workspace the key acts in.")
@click.option("--name", help="A name for the key.")
@click.option("--expires-at", metavar="WHEN",
              help="Refuse the key after this: an RFC 3339 time (UTC if no offset) or a "
                   "duration from now such as 30d or 12h.")
@click.option("--admin", is_flag=True,
              help="The key may manage workspaces, keys and the server.")
@c.json_option
@click.pass_context
def create(
    ctx: click.Context,
    workspace_id: str,
    name: str | None,
    expires_at: str | None,
    admin: bool,
    as_json: bool,
) -> None:
    """Create an API key; prints the key (shown only this once)."""
    when = c.parse_expiry(expires_at, "--expires-at")
    if name is not None and len(name) > limits.NAME_MAX_CHARS:
        raise ValidationError(
            f"must be at most {limits.NAME_MAX_CHARS} characters, got {len(name)}", field="--name"
        )
    created = c.client(ctx).create_api_key(workspace_id, name=name, expires_at=when, admin=admin)
    if as_json:
        c.print_json(created)
        return
    click.echo(c.escape_text(created.key))
    click.echo(
        c.escape_text(
            f"API key {created.id} of workspace {created.workspace_id}"
            + (" (admin)" if created.admin else "")
            + ": the key above is shown only once; store it now"
        ),
        err=True,
    )


@apikey.command("list")
@click.option("--workspace", "workspace_id", metavar="ID", help="Only the keys of this workspace.")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, workspace_id: str | None, as_json: bool) -> None:
    """List API keys (never their secrets)."""
    keys = c.client(ctx).list_api_keys(workspace_id)
    if as_json:
        c.print_json(keys)
        return
    rows = [
        [
            k.id,
            k.prefix,
            _name(k),
            k.workspace_id,
            c.fmt_time(k.created_at),
            c.fmt_time(k.last_used_at),
            c.fmt_time(k.expires_at),
            c.fmt_time(k.revoked_at),
        ]
        for k in keys
    ]
    c.print_table(
        ["ID", "PREFIX", "NAME", "WORKSPACE", "CREATED", "LAST USED", "EXPIRES", "REVOKED"],
        rows,
        "no API keys",
    )


@apikey.command("revoke")
@click.argument("key_id", metavar="ID")
@c.json_option
@click.pass_context
def revoke(ctx: click.Context, key_id: str, as_json: bool) -> None:
    """Revoke an API key: refused from now on (revoking twice is harmless)."""
    k = c.client(ctx).revoke_api_key(key_id)
    if as_json:
        c.print_json(k)
    else:
        click.echo(c.escape_text(f"{k.id} revoked at {c.fmt_time(k.revoked_at)}"))

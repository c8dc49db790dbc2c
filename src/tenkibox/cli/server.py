"""``tenki serve``, ``tenki server status|stop`` and ``tenki image build|list``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .. import config, units
from ..client import local_server
from ..client._local import refused_error
from ..errors import ConnectionError
from . import _common as c


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, type=int, help="Port (0: any free port).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Serve HTTPS with this certificate (PEM; with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="The certificate's private key (PEM).")
@click.option("--grpc-port", default=0, show_default=True, type=click.IntRange(-1, 65535),
              help="Port of Tenki's gRPC wire for the official SDKs (0: any free port; "
              "-1: none). tenki server status shows it as grpc_endpoint.")
@click.option("--grpc-advertise", metavar="URL",
              help="The data plane URL told to SDK clients (default: this machine's address).")
@click.option("--preview-host", metavar="HOST",
              help="The host written into the preview URLs of exposed ports (default: the "
              "address clients on this machine reach --preview-bind at).")
@click.option("--preview-bind", metavar="ADDRESS",
              help="The address the listeners of exposed ports bind (default: --host).")
@click.option("--database", "database_url", envvar="TENKI_DATABASE_URL", metavar="URL",
              help="The records' database: postgresql://USER:PASSWORD@HOST:PORT/DB for a "
              "control plane on PostgreSQL (several processes may share it); default "
              "$TENKI_DATABASE_URL, else SQLite in $TENKI_HOME (tenki.db).")
@click.option("--artifacts", metavar="s3://BUCKET[/PREFIX]", envvar="TENKI_ARTIFACTS",
              help="Keep snapshot and image artifacts in an S3 bucket ($TENKI_ARTIFACTS; "
              "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE). "
              "Default: in the data directory.")
@click.option("--s3-endpoint", metavar="URL", envvar="TENKI_S3_ENDPOINT",
              help="The S3 server's URL ($TENKI_S3_ENDPOINT; default: AWS).")
@click.option("--artifact-cache", metavar="SIZE", envvar="TENKI_ARTIFACT_CACHE",
              help="With --artifacts: at most this much of them cached locally "
              "($TENKI_ARTIFACT_CACHE; default 20GiB).")
@click.option("--no-local-host", is_flag=True,
              help="A pure control plane: no embedded host; sessions run on the host workers "
              "that register (tenki host run --control URL).")
def serve(host: str, port: int, tls_cert: Path | None, tls_key: Path | None, grpc_port: int,
          grpc_advertise: str | None, preview_host: str | None,
          preview_bind: str | None, database_url: str | None, artifacts: str | None,
          s3_endpoint: str | None, artifact_cache: str | None, no_local_host: bool) -> None:
    """Run the tenki API server for $TENKI_HOME (foreground).

    Every call needs an API key (Authorization: Bearer tk_...). On first start the server
    creates the workspace "default" and an admin key in $TENKI_HOME/admin.key (mode 0600),
    which the CLI and the SDK on this machine use by themselves."""
    try:
        from ..server.daemon import serve as run_server
    except ImportError as exc:
        raise click.ClickException(
            f"the server is not installed ({exc.name} is missing): "
            "pip install 'tenkibox[server]'") from exc

    run_server(host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
               grpc_port=None if grpc_port < 0 else grpc_port, grpc_advertise=grpc_advertise,
               preview_host=preview_host, preview_bind=preview_bind,
               database_url=database_url or None, artifacts=artifacts,
               s3_endpoint=s3_endpoint,
               artifact_cache_bytes=units.parse_size(artifact_cache, field="artifact_cache")
               if artifact_cache else None, local_host=not no_local_host)


@click.group("server")
def server() -> None:
    """The API server: status and stop."""


def _status(ctx: click.Context) -> dict[str, Any]:
    st = c.state(ctx)
    configured = st.endpoint or os.environ.get(config.ENV_ENDPOINT)
    if st.client_factory is not None or configured:
        cl = c.client(ctx, autostart=False)
        try:
            info = cl.health()
        except ConnectionError:
            return {"running": False, "url": cl.endpoint}
        return {"running": True, "url": cl.endpoint, **info.model_dump(mode="json")}
    found = local_server(None, st.api_key)
    if found is not None and found.refused:
        # it runs, but the key is refused: say where the key comes from (exit 1)
        raise refused_error(found, None, st.api_key)
    if found is None or not found.running or found.info is None:
        return {"running": False, "url": found.url if found else None}
    return {
        "running": True,
        "url": found.url,
        "started_at": found.started_at,
        **found.info.model_dump(mode="json"),
        # the local server's data directory is the one whose server.json named it (the API
        # tells it to admin keys only)
        "home": str(config.layout().home),
    }


@server.command("status")
@c.json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the server (url, pid, version); exit 1 when none is running."""
    info = _status(ctx)
    if as_json:
        c.print_json(info)
    elif info["running"]:
        c.print_fields(
            [
                (k, str(info[k]))
                for k in ("url", "grpc_endpoint", "pid", "version", "home", "accelerator",
                          "started_at")
                if info.get(k) is not None
            ]
        )
    else:
        click.echo("not running")
    if not info["running"]:
        ctx.exit(1)


@server.command("stop")
@click.option("--timeout", default="30s", show_default=True, metavar="DURATION")
@c.json_option
@click.pass_context
def stop(ctx: click.Context, timeout: str, as_json: bool) -> None:
    """Stop the server and wait until its process is gone (VMs keep running)."""
    timeout_s = c.parse_duration(timeout, "--timeout")
    info = _status(ctx)
    if not info["running"]:
        if as_json:
            c.print_json({"stopped": False, "running": False})
        else:
            click.echo("not running", err=True)
        return
    cl = c.client(ctx, autostart=False)
    with c.spinner(f"Stopping the server (pid {info.get('pid')})"):
        cl.shutdown_server(wait=True, timeout=timeout_s)
    if as_json:
        c.print_json({"stopped": True, "pid": info.get("pid"), "url": info.get("url")})
    else:
        click.echo(f"stopped (pid {info.get('pid')})")


@click.group("image")
def image() -> None:
    """Guest images (built locally, in this process)."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the image exists.")
@click.option("--id", "image_id", default="sandbox", show_default=True, hidden=True)
@c.json_option
def build(force: bool, image_id: str, as_json: bool) -> None:
    """Build the guest image (needs mmdebstrap and qemu-img)."""
    from ..images.builder import build_image

    layout = config.layout()
    if c.stderr_is_tty():
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
    else:
        progress = None

    def report(message: str, fraction: float | None) -> None:
        if progress is None:
            click.echo(message, err=True)
        elif fraction is None:
            progress.update(task, description=message)
        else:
            progress.update(task, description=message, total=1.0, completed=fraction)

    if progress is None:
        img = build_image(layout, image_id, force=force, progress=report)
    else:
        with progress:
            task = progress.add_task(f"Building image {image_id}", total=None)
            img = build_image(layout, image_id, force=force, progress=report)
    if as_json:
        c.print_json(img)
    else:
        click.echo(f"{img.id} {units.format_size(img.size_bytes)} {c.fmt_time(img.created_at)}")


@image.command("list")
@c.json_option
def list_images(as_json: bool) -> None:
    """List the built images."""
    from ..images.builder import list_images as list_built

    images = list_built(config.layout())
    if as_json:
        c.print_json(images)
        return
    rows = [[i.id, units.format_size(i.size_bytes), c.fmt_time(i.created_at)] for i in images]
    c.print_table(["ID", "SIZE", "CREATED"], rows, "no images (build one: tenki image build)")

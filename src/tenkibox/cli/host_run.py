"""``tenki host run``: this machine as a host of a control plane (foreground)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config, units
from ..artifacts.s3 import S3Location
from .server import serve


@click.command("run")
@click.option("--control", required=True, envvar="TENKI_CONTROL_URL", metavar="URL",
              help="The control plane's URL ($TENKI_CONTROL_URL).")
@click.option("--token", envvar="TENKI_API_KEY", metavar="KEY",
              help="An admin API key of the control plane (default $TENKI_API_KEY).")
@click.option("--listen", default="0.0.0.0:7070", show_default=True, metavar="ADDR:PORT",
              help="Where the host API listens (the control plane calls it).")
@click.option("--advertise", metavar="URL",
              help="The URL the control plane calls (default: http://<this machine's first "
              "address that is not loopback>:<port>).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="The host's data directory (default $TENKI_HOME).")
@click.option("--host-id", metavar="ID",
              help="Register under this id (default: the one kept in the data directory, "
              "else the control plane assigns one).")
def run(control: str, token: str | None, listen: str, advertise: str | None,
        data_dir: Path | None, host_id: str | None, artifacts: str | None,
        s3_endpoint: str | None, artifact_cache: str | None) -> None:
    """Serve this machine's VMs to a control plane: register, heartbeat, and answer its calls
    (boot, restore, capture, exec, files). VMs keep running when it stops."""
    if not token:
        raise click.UsageError("give --token KEY (or set TENKI_API_KEY): an admin key of the "
                               "control plane")
    from ..host.runner import run as run_worker

    location = S3Location.from_options(artifacts, s3_endpoint)
    run_worker(config.layout(data_dir), control=control, token=token, listen=listen,
               advertise=advertise, artifacts=location,
               artifact_cache_bytes=units.parse_size(artifact_cache, field="artifact_cache")
               if artifact_cache else None, host_id=host_id)


# the artifact store's options are exactly ``tenki serve``'s (names, help, environment)
run.params.extend(p for p in serve.params
                  if p.name in ("artifacts", "s3_endpoint", "artifact_cache"))

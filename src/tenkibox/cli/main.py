"""``tenki``: the command line of tenki (entry point ``tenkibox.cli.main:main``).

Errors print one line, ``error: <message>``, on stderr and exit non-zero: 2 for bad input
(usage errors and ValidationError), 130 when interrupted, 1 otherwise. Set ``TENKI_DEBUG=1``
to see the traceback of an unexpected error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from .._version import __version__
from ..errors import TenkiError, ValidationError
from . import _common as c
from .admin import admin
from .apikey import apikey
from .audit import audit
from .host import host
from .host_run import run as host_run
from .port import port
from .sandbox import sandbox
from .server import image, serve, server
from .snapshot import snapshot
from .template import template
from .volume import volume
from .workspace import workspace

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> NoReturn:
    line = c.escape_text(" ".join(str(message).split())) or "failed"
    try:
        click.echo(f"error: {line}", err=True)
    except OSError:
        pass
    sys.exit(code)


class TenkiGroup(click.Group):
    """The root group: runs the command and turns every failure into one ``error:`` line."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "tenki",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except ValidationError as exc:
            _fail(exc.message, EXIT_BAD_INPUT)
        except TenkiError as exc:
            _fail(exc.message, 1)
        except BrokenPipeError:
            # the reader went away (e.g. `| head`): stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            sys.exit(1)
        except Exception as exc:
            if os.environ.get("TENKI_DEBUG"):
                traceback.print_exc()
            _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=TenkiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoint",
    envvar="TENKI_API_ENDPOINT",
    metavar="URL",
    help="Server URL (default: $TENKI_API_ENDPOINT, else the local server).",
)
@click.option(
    "--api-key",
    envvar="TENKI_API_KEY",
    metavar="KEY",
    help="API key (default: $TENKI_API_KEY, else for the local server $TENKI_HOME/admin.key).",
)
@click.version_option(version=__version__, prog_name="tenki")
@click.pass_context
def cli(ctx: click.Context, endpoint: str | None, api_key: str | None) -> None:
    """tenki: sandbox VMs with memory snapshots."""
    st = ctx.ensure_object(c.CliState)
    if endpoint:
        st.endpoint = endpoint
    if api_key:
        st.api_key = api_key


cli.add_command(serve)
cli.add_command(server)
cli.add_command(image)
cli.add_command(sandbox)
cli.add_command(admin)
cli.add_command(workspace)
cli.add_command(apikey)
cli.add_command(audit)
cli.add_command(host)
host.add_command(host_run)  # tenki host run
sandbox.add_command(snapshot)
sandbox.add_command(volume)
sandbox.add_command(template)
sandbox.add_command(port)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``tenki`` with ``argv`` (default ``sys.argv[1:]``); exits."""
    cli.main(args=list(argv) if argv is not None else None)

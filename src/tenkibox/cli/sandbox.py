"""``tenki sandbox ...``: sessions, exec and files."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import click

from .. import limits, models, units
from ..client import Process, Session
from ..control import egress
from ..errors import TenkiError, ValidationError
from . import _common as c

# -- create (shared with `snapshot restore`) ------------------------------------------------


def create_options(with_snapshot: bool) -> Callable[[c.F], c.F]:
    """The options of ``sandbox create``; ``snapshot restore`` takes all but ``--snapshot``."""

    def decorate(f: c.F) -> c.F:
        opts: list[Callable[[Any], Any]] = [
            click.option("--name", help=f"A name for the session (up to "
                                        f"{limits.NAME_MAX_CHARS} characters)."),
            click.option("--cpu", metavar="N", help="vCPUs, 1..16 (default 2)."),
            click.option(
                "--memory-mb", metavar="MIB", help="Memory in MiB, 512..65536 (default 4096)."
            ),
            click.option(
                "--env", multiple=True, metavar="K=V", help="Environment variable (repeatable)."
            ),
            click.option(
                "--metadata", multiple=True, metavar="K=V", help="Metadata entry (repeatable)."
            ),
            click.option(
                "--max-duration", metavar="DURATION", help="Terminate after this long (e.g. 30m)."
            ),
            click.option(
                "--volume",
                "volumes",
                multiple=True,
                metavar="VOL:/path[:ro]",
                help="Attach a volume at create time (repeatable).",
            ),
            click.option(
                "--no-outbound",
                is_flag=True,
                help="No outbound connections at all (needs a server that enforces network "
                "policies).",
            ),
            click.option(
                "--allow-domain",
                "allow_domains",
                multiple=True,
                metavar="PATTERN",
                help="Outbound only to this name, or to the names below a '*.' wildcard such "
                "as *.example.org (repeatable; DNS of other names fails).",
            ),
            click.option(
                "--allow-cidr",
                "allow_cidrs",
                multiple=True,
                metavar="CIDR",
                help="Outbound only to this IPv4 network, e.g. 10.0.0.0/8 (repeatable; with "
                "--allow-domain, to either).",
            ),
            click.option(
                "--allow-inbound",
                is_flag=True,
                help="Ports of the session may be exposed.",
            ),
            click.option(
                "--host",
                "host_id",
                metavar="ID",
                help="Run it on this host (admin key; `tenki host list`), not where the "
                "control plane places it.",
            ),
            click.option("--no-wait", is_flag=True, help="Return at once (state CREATING)."),
            click.option(
                "--wait-timeout",
                default="3m",
                show_default=True,
                metavar="DURATION",
                help="How long to wait for the session to run.",
            ),
            c.json_option,
        ]
        if with_snapshot:
            opts.insert(
                6,
                click.option(
                    "--snapshot", "snapshot_id", metavar="SNP", help="Restore this snapshot."
                ),
            )
            opts.insert(
                7,
                click.option(
                    "--template",
                    "template_id",
                    metavar="TPL",
                    help="Start from this template's latest READY build.",
                ),
            )
            opts.insert(
                8,
                click.option(
                    "--cold-boot",
                    is_flag=True,
                    help="Boot the image instead of restoring its golden snapshot.",
                ),
            )
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def run_create(
    ctx: click.Context,
    *,
    name: str | None,
    cpu: str | None,
    memory_mb: str | None,
    env: Sequence[str],
    metadata: Sequence[str],
    max_duration: str | None,
    snapshot_id: str | None,
    volumes: Sequence[str],
    no_wait: bool,
    wait_timeout: str,
    as_json: bool,
    template_id: str | None = None,
    cold_boot: bool = False,
    no_outbound: bool = False,
    allow_domains: Sequence[str] = (),
    allow_cidrs: Sequence[str] = (),
    allow_inbound: bool = False,
    host_id: str | None = None,
) -> None:
    """The one code path of ``sandbox create`` and ``snapshot restore``."""
    if snapshot_id is not None and template_id is not None:
        raise c.ValidationError("give --snapshot or --template, not both", field="--template")
    domains = egress.domains(allow_domains, "--allow-domain", index=False)
    cidrs = egress.cidrs(allow_cidrs, "--allow-cidr", index=False)
    if egress.contradiction(not no_outbound, domains, cidrs):
        raise c.ValidationError("an allow-list (--allow-domain, --allow-cidr) needs outbound "
                                "access: give one or the other", field="--no-outbound")
    cpu_n = c.parse_int_range(cpu, "--cpu", models.CPU_MIN, models.CPU_MAX)
    mem_n = c.parse_int_range(memory_mb, "--memory-mb", models.MEMORY_MB_MIN, models.MEMORY_MB_MAX)
    env_d = c.parse_pairs(env, "--env", env_names=True)
    meta_d = c.parse_pairs(metadata, "--metadata")
    max_s = c.parse_duration(max_duration, "--max-duration")
    mounts = c.parse_volumes(volumes)
    timeout = c.parse_duration(wait_timeout, "--wait-timeout")
    if name is not None and len(name) > limits.NAME_MAX_CHARS:
        raise c.ValidationError(f"must be at most {limits.NAME_MAX_CHARS} characters, got "
                                f"{len(name)}", field="--name")

    cl = c.client(ctx)
    session = cl.create(
        name=name,
        snapshot_id=snapshot_id,
        cpu=cpu_n,
        memory_mb=mem_n,
        env=env_d or None,
        metadata=meta_d or None,
        volumes=mounts or None,
        max_duration=max_s,
        template_id=template_id,
        cold_boot=cold_boot,
        allow_outbound=not no_outbound,
        allow_inbound=allow_inbound,
        allow_domains=domains,
        allow_cidrs=cidrs,
        host_id=host_id,
    )
    if not no_wait:
        if snapshot_id:
            what = f"Restoring {snapshot_id} as {session.id}"
        elif template_id:
            what = f"Creating {session.id} from template {template_id}"
        else:
            what = f"Creating {session.id}"
            if session.record.state_reason:  # the first create of a size boots: it says so
                what += f" ({c.escape_text(session.record.state_reason)})"
        with c.spinner(f"{what} (CREATING)"):
            session.wait_ready(timeout)
    if as_json:
        c.print_json(session.record)
    else:
        click.echo(session.id)


# -- commands -------------------------------------------------------------------------------


@click.group("sandbox")
def sandbox() -> None:
    """Sandbox sessions: create, exec, files, snapshots, volumes."""


@sandbox.command("create")
@create_options(with_snapshot=True)
@click.pass_context
def create(ctx: click.Context, **opts: Any) -> None:
    """Create a session (a VM) and wait until it runs; prints its id."""
    run_create(ctx, **opts)


def fmt_egress(e: models.SessionEgress) -> str:
    """A session's egress policy in words."""
    if not e.outbound:
        return "none (no outbound connections)"
    if e.allow_domains or e.allow_cidrs:
        return "only " + ", ".join([*e.allow_domains, *e.allow_cidrs])
    return "public addresses"


def fmt_network(r: models.Session) -> str:
    """The network column of ``sandbox list``: ``open``, ``none`` or ``allow:N`` (N names and
    networks), then ``+in`` with inbound."""
    e = r.egress
    out = "none" if not e.outbound else (
        f"allow:{len(e.allow_domains) + len(e.allow_cidrs)}"
        if e.allow_domains or e.allow_cidrs else "open")
    return out + ("+in" if r.allow_inbound else "")


def session_rows(sessions: Sequence[Session]) -> list[list[str]]:
    rows = []
    for s in sessions:
        r = s.record
        rows.append(
            [
                r.id,
                r.name or "-",
                r.state.value,
                str(r.cpu),
                units.format_size(r.memory_mb << 20),
                r.template_id or r.snapshot_id or r.base_image_id,
                fmt_network(r),
                c.fmt_time(r.created_at),
            ]
        )
    return rows


@sandbox.command("list")
@click.option("--state", help="Only sessions in this state (e.g. RUNNING).")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, state: str | None, as_json: bool) -> None:
    """List sessions."""
    sessions = c.client(ctx).list(state.upper() if state else None)
    if as_json:
        c.print_json([s.record for s in sessions])
        return
    cols = ["ID", "NAME", "STATE", "CPU", "MEMORY", "FROM", "NETWORK", "CREATED"]
    c.print_table(cols, session_rows(sessions), "no sessions")


def print_session(r: models.Session) -> None:
    vols = ", ".join(f"{v.volume_id}:{v.path}{':ro' if v.read_only else ''}" for v in r.volumes)
    c.print_fields(
        [
            ("id", r.id),
            ("name", r.name or "-"),
            ("state", c.fmt_state(r.state, r.state_reason)),
            ("cpu", str(r.cpu)),
            ("memory", units.format_size(r.memory_mb << 20)),
            ("image", r.base_image_id),
            ("template", r.template_id or "-"),
            ("snapshot", r.snapshot_id or "-"),
            ("env", ", ".join(r.env_keys) or "-"),
            ("metadata", ", ".join(f"{k}={v}" for k, v in r.metadata.items()) or "-"),
            ("volumes", vols or "-"),
            ("egress", fmt_egress(r.egress)),
            ("inbound", "allowed" if r.allow_inbound else "off"),
            ("created_at", c.fmt_time(r.created_at)),
            ("ready_at", c.fmt_time(r.ready_at)),
            ("expires_at", c.fmt_time(r.expires_at)),
            ("terminated_at", c.fmt_time(r.terminated_at)),
        ]
    )


@sandbox.command("get")
@click.argument("session_arg", metavar="[ID]", required=False)
@click.option("--session", "session_opt", metavar="ID", help="The session (instead of ID).")
@c.json_option
@click.pass_context
def get(
    ctx: click.Context, session_arg: str | None, session_opt: str | None, as_json: bool
) -> None:
    """Show one session."""
    sid = c.one_id(session_arg, session_opt, "session id", "--session")
    record = c.client(ctx).get(sid).record
    if as_json:
        c.print_json(record)
    else:
        print_session(record)


@sandbox.command("terminate")
@click.argument("session_arg", metavar="[ID]", required=False)
@click.option("--session", "session_opt", metavar="ID", help="The session (instead of ID).")
@c.json_option
@click.pass_context
def terminate(
    ctx: click.Context, session_arg: str | None, session_opt: str | None, as_json: bool
) -> None:
    """Terminate a session (its VM stops; its snapshots stay)."""
    sid = c.one_id(session_arg, session_opt, "session id", "--session")
    with c.spinner(f"Terminating {sid}"):
        record = c.client(ctx).terminate(sid).record
    if as_json:
        c.print_json(record)
    else:
        click.echo(f"{record.id} {record.state.value}")


def _pause_or_resume(
    ctx: click.Context,
    pause: bool,
    session_arg: str | None,
    session_opt: str | None,
    no_wait: bool,
    wait_timeout: str,
    as_json: bool,
) -> None:
    sid = c.one_id(session_arg, session_opt, "session id", "--session")
    timeout = c.parse_duration(wait_timeout, "--wait-timeout")
    cl = c.client(ctx)
    if pause:
        with c.spinner(f"Pausing {sid} (PAUSING)", enabled=not no_wait):
            record = cl.pause(sid, wait=not no_wait, timeout=timeout).record
    else:
        with c.spinner(f"Resuming {sid} (RESUMING)", enabled=not no_wait):
            record = cl.resume(sid, wait=not no_wait, timeout=timeout).record
    if as_json:
        c.print_json(record)
    else:
        click.echo(f"{record.id} {record.state.value}")


def _pause_options(what: str, default_timeout: str) -> Callable[[c.F], c.F]:
    def decorate(f: c.F) -> c.F:
        opts: list[Callable[[Any], Any]] = [
            click.argument("session_arg", metavar="[ID]", required=False),
            click.option(
                "--session", "session_opt", metavar="ID", help="The session (instead of ID)."
            ),
            click.option("--no-wait", is_flag=True, help=f"Return at once (state {what})."),
            click.option(
                "--wait-timeout",
                default=default_timeout,
                show_default=True,
                metavar="DURATION",
                help="How long to wait.",
            ),
            c.json_option,
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


@sandbox.command("pause")
@_pause_options("PAUSING", "5m")
@click.pass_context
def pause(
    ctx: click.Context,
    session_arg: str | None,
    session_opt: str | None,
    no_wait: bool,
    wait_timeout: str,
    as_json: bool,
) -> None:
    """Pause a session: its memory and disk are kept in a snapshot of type PAUSE and its VM
    stops (a paused session counts against no session or memory quota). Idempotent."""
    _pause_or_resume(ctx, True, session_arg, session_opt, no_wait, wait_timeout, as_json)


@sandbox.command("resume")
@_pause_options("RESUMING", "3m")
@click.pass_context
def resume(
    ctx: click.Context,
    session_arg: str | None,
    session_opt: str | None,
    no_wait: bool,
    wait_timeout: str,
    as_json: bool,
) -> None:
    """Resume a paused session under the same id: its processes go on with their PIDs and its
    clock is set. Quotas are checked again. Idempotent."""
    _pause_or_resume(ctx, False, session_arg, session_opt, no_wait, wait_timeout, as_json)


# -- update and extend ----------------------------------------------------------------------


@contextlib.contextmanager
def options_named(names: Mapping[str, str]) -> Iterator[None]:
    """A ValidationError about an SDK or API field (``name``, ``metadata.k``) names the
    command's option instead (``--name``)."""
    try:
        yield
    except ValidationError as exc:
        field = exc.field or ""
        for name, option in names.items():
            if field == name or field.startswith(name + "."):
                message = exc.message.removeprefix(f"{field}: ")
                raise ValidationError(message, field=option) from None
        raise


def check_name(name: str | None, option: str = "--name") -> None:
    if name is not None and len(name) > limits.NAME_MAX_CHARS:
        raise c.ValidationError(f"must be at most {limits.NAME_MAX_CHARS} characters, got "
                                f"{len(name)}", field=option)


@sandbox.command("update")
@click.argument("session_arg", metavar="[ID]", required=False)
@click.option("--session", "session_opt", metavar="ID", help="The session (instead of ID).")
@click.option("--name", help=f"A new name (up to {limits.NAME_MAX_CHARS} characters).")
@click.option(
    "--metadata",
    multiple=True,
    metavar="K=V",
    help="Metadata entry (repeatable); the entries given replace all the session's metadata.",
)
@c.json_option
@click.pass_context
def update(
    ctx: click.Context,
    session_arg: str | None,
    session_opt: str | None,
    name: str | None,
    metadata: Sequence[str],
    as_json: bool,
) -> None:
    """Rename a session and/or replace its metadata; what is not given stays."""
    sid = c.one_id(session_arg, session_opt, "session id", "--session")
    check_name(name)
    meta_d = c.parse_pairs(metadata, "--metadata")
    if name is None and not metadata:
        raise click.UsageError("nothing to change: give --name and/or --metadata")
    with options_named({"name": "--name", "metadata": "--metadata"}):
        record = c.client(ctx).update_session(sid, name=name,
                                              metadata=meta_d if metadata else None).record
    if as_json:
        c.print_json(record)
    else:
        print_session(record)


@sandbox.command("extend")
@click.argument("session_arg", metavar="[ID]", required=False)
@click.option("--session", "session_opt", metavar="ID", help="The session (instead of ID).")
@click.option(
    "--by",
    required=True,
    metavar="DURATION",
    help="How much later it expires (e.g. 30m, 2h); a session without an expiry gets one "
    "this long from now.",
)
@c.json_option
@click.pass_context
def extend(
    ctx: click.Context, session_arg: str | None, session_opt: str | None, by: str, as_json: bool
) -> None:
    """Move a session's expiry later; prints the new expiry."""
    sid = c.one_id(session_arg, session_opt, "session id", "--session")
    secs = c.parse_duration(by, "--by")
    assert secs is not None
    if secs > limits.DURATION_MAX_S:
        raise c.ValidationError(f"must be at most ten years, got {by!r}", field="--by")
    with options_named({"seconds": "--by"}):
        record = c.client(ctx).extend_session(sid, secs).record
    if as_json:
        c.print_json(record)
    else:
        click.echo(f"{record.id} expires_at {c.fmt_time(record.expires_at)}")


# -- exec -----------------------------------------------------------------------------------


def _stdin_reader() -> Callable[[], bytes]:
    stream = c.binary_stream("stdin")
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        read1 = getattr(stream, "read1", None)
        if read1 is not None:
            return lambda: bytes(read1(65536))
        return lambda: bytes(stream.read(65536))
    import os

    # os.read, not the buffered reader: a daemon thread must not hold the buffer's lock at exit
    return lambda: os.read(fd, 65536)


def _pump_stdin(proc: Process, read: Callable[[], bytes]) -> None:
    try:
        while True:
            chunk = read()
            if not chunk:
                break
            proc.write_stdin(chunk)
        proc.close_stdin()
    except (TenkiError, OSError):
        pass  # the process exited (or stdin broke): nothing left to feed


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True


@sandbox.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--cwd", metavar="DIR", help="Working directory in the session.")
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--timeout", metavar="DURATION", help="Kill the command after this long (exit 124).")
@click.option(
    "--stdin/--no-stdin",
    "feed_stdin",
    default=None,
    help="Stream local standard input to the command (default: when it is not a terminal).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(
    ctx: click.Context,
    session_id: str,
    cwd: str | None,
    env: Sequence[str],
    timeout: str | None,
    feed_stdin: bool | None,
    command: Sequence[str],
) -> None:
    """Run CMD [ARGS...] in a session, streaming its output; exits with its exit code.

    Options after CMD belong to CMD: tenki sandbox exec --session ID sh -c 'echo hi; exit 3'
    """
    env_d = c.parse_pairs(env, "--env", env_names=True)
    timeout_s = c.parse_duration(timeout, "--timeout")
    feed = (not _stdin_is_tty()) if feed_stdin is None else feed_stdin
    session = c.client(ctx).get(session_id)
    proc = session.start(
        *command, cwd=cwd, env=env_d or None, timeout=timeout_s, stdin=True if feed else None
    )
    if feed:
        threading.Thread(
            target=_pump_stdin, args=(proc, _stdin_reader()), name="stdin", daemon=True
        ).start()
    sinks: dict[str, BinaryIO] = {
        "stdout": c.binary_stream("stdout"),
        "stderr": c.binary_stream("stderr"),
    }
    try:
        for stream, data in proc:
            sink = sinks[stream]
            sink.write(data)
            sink.flush()
        result = proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(TenkiError):
            proc.kill()
        raise
    code = 124 if result.timed_out else result.exit_code
    ctx.exit(code if 0 <= code <= 255 else 1)


# -- files ----------------------------------------------------------------------------------


@sandbox.group("files")
def files() -> None:
    """Read and write files in a session."""


@files.command("write")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.option("--mode", default="644", show_default=True, help="Permission bits (octal).")
@click.argument("path")
@click.argument("local", metavar="(LOCAL|-)")
@c.json_option
@click.pass_context
def files_write(
    ctx: click.Context, session_id: str, mode: str, path: str, local: str, as_json: bool
) -> None:
    """Write the local file LOCAL (or standard input: -) to PATH in the session."""
    mode_n = c.parse_mode(mode)
    if local == "-":
        data = c.binary_stream("stdin").read()
    else:
        try:
            with open(local, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise c.ValidationError(f"cannot read {local}: {exc.strerror}", field="LOCAL") from None
    session = c.client(ctx).get(session_id)
    written = session.files.write(path, data, mode=mode_n)
    if as_json:
        c.print_json(written)
    else:
        size = units.format_size(written.size_bytes)
        click.echo(f"{c.escape_text(written.path)}: {size} written")


@files.command("read")
@click.option("--session", "session_id", required=True, metavar="ID", help="The session.")
@click.argument("path")
@click.pass_context
def files_read(ctx: click.Context, session_id: str, path: str) -> None:
    """Print the file PATH of the session (raw bytes) on standard output."""
    session = c.client(ctx).get(session_id)
    data = session.files.read(path)
    out = c.binary_stream("stdout")
    out.write(data)
    out.flush()

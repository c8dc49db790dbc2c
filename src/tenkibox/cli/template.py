"""``tenki sandbox template ...``: templates (reusable environments) and their builds."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from .. import limits, models, units
from ..client import _core as core
from ..errors import TenkiError, ValidationError
from . import _common as c

#: a field of the SDK (or of the wire models, as the server names it) -> its option
_OPTION_OF = {
    "name": "--name",
    "base": "--base-image",
    "base.image": "--base-image",
    "base.template_id": "--from-template",
    "base.snapshot_id": "--from-snapshot",
    "base_image": "--base-image",
    "from_template": "--from-template",
    "from_snapshot": "--from-snapshot",
    "setup_script": "--setup-script",
    "start_cmd": "--start-cmd",
    "ready_when": "--ready-port",
    "ready_when.port": "--ready-port",
    "ready_when.http_url": "--ready-http",
    "ready_when.http_status": "--ready-status",
    "ready_when.command": "--ready-cmd",
    "ready_when.timeout_s": "--ready-timeout",
    "env": "--env",
    "build_env": "--build-env",
    "cpu": "--cpu",
    "memory_mb": "--memory-mb",
    "tags": "--tag",
}
_BASE_OPTIONS = (("--base-image", "base_image"), ("--from-template", "from_template"),
                 ("--from-snapshot", "from_snapshot"))
_READY_OPTIONS = ("--ready-port", "--ready-http", "--ready-cmd")
#: ``template update --unset NAME`` -> the SDK fields it removes
_UNSET = {
    "setup-script": ("setup_script",),
    "start-cmd": ("start_cmd",),
    "ready": ("ready_when",),
    "env": ("env",),
    "build-env": ("build_env",),
    "tags": ("tags",),
    "base": ("base_image",),
}
READY_TIMEOUT_MAX_S = 3600.0
TAGS_MAX = 32


@click.group("template")
def template() -> None:
    """Templates: a base, a setup script and a started service, built into a golden snapshot
    that sessions start from (tenki sandbox create --template ID)."""


# -- input ------------------------------------------------------------------------------------


@contextmanager
def options_named() -> Iterator[None]:
    """A ValidationError (local or the server's) names the option, not the field."""
    try:
        yield
    except ValidationError as exc:
        field = exc.field or ""
        parts = field.split(".")
        for n in range(len(parts), 0, -1):
            option = _OPTION_OF.get(".".join(parts[:n]))
            if option is not None:
                message = exc.message.removeprefix(f"{field}: ")
                raise ValidationError(message, field=option, details=exc.details) from None
        raise


def read_script(source: str, option: str = "--setup-script") -> str:
    """The setup script from the file ``source`` (``-``: standard input), UTF-8 text."""
    room = models.SETUP_SCRIPT_MAX_BYTES + 1
    if source == "-":
        data = c.binary_stream("stdin").read(room)
    else:
        try:
            with open(source, "rb") as fh:
                data = fh.read(room)
        except OSError as exc:
            raise ValidationError(f"cannot read {source}: {exc.strerror}", field=option) from None
    if len(data) > models.SETUP_SCRIPT_MAX_BYTES:
        raise ValidationError(
            f"must be at most {units.format_size(models.SETUP_SCRIPT_MAX_BYTES)}", field=option
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"{source} is not UTF-8 text (byte {exc.start})", field=option
        ) from None
    if "\0" in text:
        raise ValidationError(f"{source} contains NUL characters", field=option)
    return text


def _one_of(given: Sequence[tuple[str, Any]], options: Sequence[str]) -> tuple[str, Any] | None:
    """The one option given among ``options`` (an error naming the second one given)."""
    if len(given) > 1:
        raise ValidationError(f"give only one of {', '.join(options)} (also given: "
                              f"{given[0][0]})", field=given[1][0])
    return given[0] if given else None


def parse_ready(
    port: str | None,
    http: str | None,
    status: str | None,
    command: str | None,
    timeout: str | None,
    current: models.ReadyCheck | None = None,
) -> dict[str, Any] | None:
    """The ready check of the options (None: none given). ``current`` (an update): the
    template's check, which ``--ready-timeout`` / ``--ready-status`` alone adjust."""
    kind = _one_of(
        [(o, v) for o, v in zip(_READY_OPTIONS, (port, http, command), strict=True)
         if v is not None],
        _READY_OPTIONS,
    )
    check: dict[str, Any] = {}
    if kind is None:
        if status is None and timeout is None:
            return None
        if current is None:
            option = "--ready-status" if status is not None else "--ready-timeout"
            raise ValidationError("give a check too: --ready-port, --ready-http or --ready-cmd",
                                  field=option)
        check = current.model_dump(exclude_none=True)
    elif kind[0] == "--ready-port":
        check["port"] = c.parse_int_range(port, "--ready-port", 1, 65535)
    elif kind[0] == "--ready-http":
        assert http is not None
        if not re.match(r"^https?://[^\s/]", http):
            raise ValidationError(f"must be an http:// or https:// URL, got {http!r}",
                                  field="--ready-http")
        if len(http) > 2048:
            raise ValidationError(f"must be at most 2048 characters, got {len(http)}",
                                  field="--ready-http")
        check["http_url"] = http
    else:
        if not command:
            raise ValidationError("must not be empty", field="--ready-cmd")
        check["command"] = command
    if status is not None:
        if "http_url" not in check:
            raise ValidationError("only with --ready-http", field="--ready-status")
        check["http_status"] = c.parse_int_range(status, "--ready-status", 100, 599)
    if timeout is not None:
        secs = c.parse_duration(timeout, "--ready-timeout")
        assert secs is not None
        if secs > READY_TIMEOUT_MAX_S:
            raise ValidationError(f"must be at most 1h, got {timeout!r}", field="--ready-timeout")
        check["timeout_s"] = secs
    return check


def parse_tags(tags: Sequence[str], option: str = "--tag") -> list[str]:
    if len(tags) > TAGS_MAX:
        raise ValidationError(f"at most {TAGS_MAX} tags, got {len(tags)}", field=option)
    for tag in tags:
        if not tag or len(tag) > 64:
            raise ValidationError(f"must be 1 to 64 characters, got {tag!r}", field=option)
    return list(tags)


def spec_fields(opts: dict[str, Any], *, current: models.Template | None = None,
                ) -> dict[str, Any]:
    """The SDK fields of the options given (those not given are left out)."""
    fields: dict[str, Any] = {}
    name = opts.get("name")
    if name is not None:
        if len(name) > limits.NAME_MAX_CHARS:
            raise ValidationError(f"must be at most {limits.NAME_MAX_CHARS} characters, got "
                                  f"{len(name)}", field="--name")
        fields["name"] = name
    base = _one_of([(o, opts[k]) for o, k in _BASE_OPTIONS if opts.get(k) is not None],
                   [o for o, _ in _BASE_OPTIONS])
    if base is not None:
        fields[dict(_BASE_OPTIONS)[base[0]]] = base[1]
    if opts.get("setup_script") is not None:
        fields["setup_script"] = read_script(opts["setup_script"])
    if opts.get("start_cmd") is not None:
        if not opts["start_cmd"]:
            raise ValidationError("must not be empty", field="--start-cmd")
        fields["start_cmd"] = opts["start_cmd"]
    ready = parse_ready(opts.get("ready_port"), opts.get("ready_http"),
                        opts.get("ready_status"), opts.get("ready_cmd"),
                        opts.get("ready_timeout"),
                        current.ready_when if current is not None else None)
    if ready is not None:
        fields["ready_when"] = ready
    if opts.get("env"):
        fields["env"] = c.parse_pairs(opts["env"], "--env", env_names=True)
    if opts.get("build_env"):
        fields["build_env"] = c.parse_pairs(opts["build_env"], "--build-env", env_names=True)
    cpu = c.parse_int_range(opts.get("cpu"), "--cpu", models.CPU_MIN, models.CPU_MAX)
    if cpu is not None:
        fields["cpu"] = cpu
    mem = c.parse_int_range(opts.get("memory_mb"), "--memory-mb", models.MEMORY_MB_MIN,
                            models.MEMORY_MB_MAX)
    if mem is not None:
        fields["memory_mb"] = mem
    if opts.get("tags"):
        fields["tags"] = parse_tags(opts["tags"])
    return fields


def spec_options(update: bool) -> Callable[[c.F], c.F]:
    """The options of ``template create`` and ``template update``."""

    def decorate(f: c.F) -> c.F:
        opts: list[Callable[[Any], Any]] = [
            click.option("--name", required=not update,
                         help="A new name." if update else
                         "A name, unique in the workspace (up to 64 characters)."),
            click.option("--base-image", metavar="IMG",
                         help="Start from this image (default: sandbox)."),
            click.option("--from-template", metavar="ID",
                         help="Start from this template's latest READY build."),
            click.option("--from-snapshot", metavar="ID", help="Start from this snapshot."),
            click.option("--setup-script", metavar="FILE|-",
                         help="A script run once by the build (/bin/sh -se, as the user tenki "
                              "with sudo, in /home/tenki); - reads it from standard input."),
            click.option("--start-cmd", metavar="CMD",
                         help="A command started by the build and left running (a service)."),
            click.option("--ready-port", metavar="PORT",
                         help="Ready once this TCP port on the guest accepts."),
            click.option("--ready-http", metavar="URL",
                         help="Ready once this URL (on the guest) answers --ready-status."),
            click.option("--ready-status", metavar="CODE",
                         help="The HTTP status --ready-http waits for (default 200)."),
            click.option("--ready-cmd", metavar="CMD", help="Ready once this command exits 0."),
            click.option("--ready-timeout", metavar="DURATION",
                         help="How long the ready check is tried (default 60s, at most 1h)."),
            click.option("--env", multiple=True, metavar="K=V",
                         help="Environment of the build and of its sessions (repeatable)"
                              + ("; replaces the template's." if update else ".")),
            click.option("--build-env", multiple=True, metavar="K=V",
                         help="Environment of the build only, e.g. secrets (repeatable)"
                              + ("; replaces the template's." if update else ".")),
            click.option("--cpu", metavar="N", help="vCPUs of the build, 1..16 (default 2)."),
            click.option("--memory-mb", metavar="MIB",
                         help="Memory of the build in MiB, 512..65536 (default 4096)."),
            click.option("--tag", "tags", multiple=True, metavar="TAG",
                         help="A tag (repeatable)" + ("; replaces the template's." if update
                                                      else ".")),
        ]
        if update:
            opts.append(click.option(
                "--unset", "unset", multiple=True, type=click.Choice(sorted(_UNSET)),
                help="Remove this setting (repeatable); base: back to the default image."))
        opts.append(c.json_option)
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


# -- output -----------------------------------------------------------------------------------


def _short(text: str | None, n: int = 60) -> str:
    if text is None:
        return "-"
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    if len(text) <= n and lines <= 1:
        return text
    return f"{text[:n].splitlines()[0] if text.strip() else ''}... ({lines} lines, " \
           f"{units.format_size(len(text.encode()))})"


def fmt_base(base: models.TemplateBase) -> str:
    if base.template_id:
        return f"template {base.template_id}"
    if base.snapshot_id:
        return f"snapshot {base.snapshot_id}"
    return f"image {base.image or models.DEFAULT_IMAGE_ID}"


def fmt_ready(check: models.ReadyCheck | None) -> str:
    if check is None:
        return "-"
    if check.port is not None:
        what = f"port {check.port}"
    elif check.http_url is not None:
        what = f"{check.http_url} answers {check.http_status}"
    else:
        what = f"command {check.command!r}"
    return f"{what} (within {core.format_duration(check.timeout_s)})"


def _took(b: models.TemplateBuild) -> str:
    if b.started_at is None or b.completed_at is None:
        return "-"
    secs = (b.completed_at - b.started_at).total_seconds()
    return f"{secs:.1f}s" if secs < 60 else core.format_duration(secs)


def build_summary(b: models.TemplateBuild) -> str:
    """One line: ``bld_x READY (version 2, template tpl_x): snapshot snp_x, 41s``."""
    head = f"{b.id} {b.state.value} (version {b.version}, template {b.template_id})"
    if b.state == models.BuildState.READY:
        return f"{head}: snapshot {b.snapshot_id}, {_took(b)}"
    if b.state == models.BuildState.FAILED:
        return f"{head}: at step {b.failed_step or '-'}, {_took(b)}"
    return head


def print_template(t: models.Template) -> None:
    latest = t.latest_build
    c.print_fields(
        [
            ("id", t.id),
            ("name", t.name),
            ("workspace_id", t.workspace_id),
            ("base", fmt_base(t.base)),
            ("setup_script", _short(t.setup_script)),
            ("start_cmd", t.start_cmd or "-"),
            ("ready_when", fmt_ready(t.ready_when)),
            ("env", ", ".join(t.env) or "-"),
            ("build_env", ", ".join(t.build_env_keys) or "-"),
            ("cpu", str(t.cpu)),
            ("memory", units.format_size(t.memory_mb << 20)),
            ("tags", ", ".join(t.tags) or "-"),
            ("latest_build", build_summary(latest) if latest else "- (not built yet)"),
            ("created_at", c.fmt_time(t.created_at)),
            ("updated_at", c.fmt_time(t.updated_at)),
        ]
    )


def _output(value: Any, as_json: bool, line: str) -> None:
    if as_json:
        c.print_json(value)
    else:
        click.echo(c.escape_text(line))


# -- records ----------------------------------------------------------------------------------


def read_spec(source: str) -> models.TemplateSpec:
    """A spec file (JSON or YAML; ``-``: standard input), checked: an error names the field
    path in the file (``steps[3].apt.packages: must not be empty``)."""
    import yaml  # type: ignore[import-untyped]

    text = read_script(source, "--spec")
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not JSON or YAML"
        raise ValidationError(f"{source}: {problem}{where}", field="--spec") from None
    try:
        return core.template_spec(data)
    except ValidationError as exc:
        raise ValidationError(f"{source}: {exc.message}", field="--spec") from None


@template.command("create")
@spec_options(update=False)
@click.option("--spec", "spec_file", metavar="FILE|-",
              help="A declarative spec (JSON or YAML, spec_version: tenki.template.v1) "
                   "instead of the options above (but --name).")
@click.pass_context
def create(ctx: click.Context, as_json: bool, spec_file: str | None, **opts: Any) -> None:
    """Create a template; prints its id. Build it with: tenki sandbox template build ID"""
    fields = spec_fields(opts)
    name = fields.pop("name")
    if spec_file is not None:
        if fields:
            raise ValidationError(f"give --spec or the options, not both (also given: "
                                  f"{', '.join(sorted(fields))})", field="--spec")
        fields = {"spec": read_spec(spec_file)}
    with options_named():
        t = c.client(ctx).create_template(name, **fields)
    _output(t, as_json, t.id)


@template.command("list")
@c.json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List the templates."""
    items = c.client(ctx).list_templates()
    if as_json:
        c.print_json(items)
        return
    rows = [
        [
            t.id,
            t.name,
            fmt_base(t.base),
            f"v{t.latest_build.version} {t.latest_build.id}" if t.latest_build else "-",
            ",".join(t.tags) or "-",
            c.fmt_time(t.created_at),
        ]
        for t in items
    ]
    c.print_table(["ID", "NAME", "BASE", "READY BUILD", "TAGS", "CREATED"], rows,
                  "no templates")


@template.command("get")
@click.argument("template_id", metavar="ID")
@c.json_option
@click.pass_context
def get(ctx: click.Context, template_id: str, as_json: bool) -> None:
    """Show one template."""
    t = c.client(ctx).get_template(template_id)
    if as_json:
        c.print_json(t)
    else:
        print_template(t)


@template.command("update")
@click.argument("template_id", metavar="ID")
@spec_options(update=True)
@click.pass_context
def update(ctx: click.Context, template_id: str, unset: Sequence[str], as_json: bool,
           **opts: Any) -> None:
    """Change some settings of a template (the next build uses them)."""
    cl = c.client(ctx)
    current = None
    if opts.get("ready_timeout") is not None or opts.get("ready_status") is not None:
        current = cl.get_template(template_id)  # --ready-timeout alone adjusts its check
    fields = spec_fields(opts, current=current)
    for name in unset:
        for field in _UNSET[name]:
            taken = field in fields or (field == "base_image" and any(
                k in fields for _, k in _BASE_OPTIONS))
            if taken:
                raise ValidationError(f"{name} is also given a value", field="--unset")
            fields[field] = None
    if not fields:
        raise click.UsageError("nothing to change: give an option such as --name, "
                               "--setup-script or --unset")
    with options_named():
        t = cl.update_template(template_id, **fields)
    if as_json:
        c.print_json(t)
    else:
        print_template(t)


@template.command("delete")
@click.argument("template_id", metavar="ID")
@click.option("--force", is_flag=True, help="Also while a build runs (it is cancelled).")
@c.json_option
@click.pass_context
def delete(ctx: click.Context, template_id: str, force: bool, as_json: bool) -> None:
    """Delete a template and its golden snapshots (sessions started from it go on)."""
    t = c.client(ctx).delete_template(template_id, force=force)
    _output(t, as_json, f"{t.id} deleted")


# -- builds -----------------------------------------------------------------------------------

_STEP = re.compile(r"^\[[0-9:]+\] step (\w+): started$")
_BUILD = re.compile(r"^\[[0-9:]+\] build (\S+): template ")


class LogView:
    """Shows a build's log as it arrives: on stderr, escaped (newlines and tabs kept); on a
    terminal whole lines above a spinner that names the current step."""

    def __init__(self, spinner: c.Spinner, template_id: str) -> None:
        self.spinner = spinner
        self.template_id = template_id
        self.build_id = ""
        self.step = ""
        self._line = ""  # the last line, not complete yet
        self._cr = ""  # a trailing \r (its \n may come in the next piece)
        self._at_line_start = True  # (no terminal) what was written ends a line

    def feed(self, text: str) -> None:
        text, self._cr = self._cr + text, ""
        if text.endswith("\r"):
            text, self._cr = text[:-1], "\r"
        *lines, self._line = (self._line + text).split("\n")
        for line in lines:
            self._scan(line)
        if self.spinner.live:
            for line in lines:
                self.spinner.print(c.escape_log(line.removesuffix("\r")))
        elif text:
            self._write(text)

    def _write(self, text: str) -> None:
        click.echo(c.escape_log(text), err=True, nl=False)
        self._at_line_start = text.endswith("\n")

    def close(self) -> None:
        """The log ended: what is left of it, and a line end."""
        rest, cr = self._line + self._cr, self._cr
        self._line = self._cr = ""
        if self.spinner.live:
            if rest:
                self.spinner.print(c.escape_log(rest))
            return
        if cr:
            self._write(cr)
        if not self._at_line_start:
            self._write("\n")

    def _scan(self, line: str) -> None:
        if self.build_id == "" and (m := _BUILD.match(line)):
            self.build_id = m.group(1)
        elif m := _STEP.match(line):
            self.step = m.group(1)
        else:
            return
        build = f" ({self.build_id})" if self.build_id else ""
        self.spinner.update(f"Building {self.template_id}{build}: step {self.step}")


def failure(b: models.TemplateBuild) -> str:
    step = b.failed_step or "-"
    reason = (b.error or "no reason given").removeprefix(f"{step}: ")
    return f"build {b.id} FAILED at step {step}: {reason}"


@template.command("build")
@click.argument("template_id", metavar="ID")
@click.option("--no-wait", is_flag=True, help="Return at once (state PENDING).")
@click.option("--wait-timeout", default="15m", show_default=True, metavar="DURATION",
              help="How long to wait for the build.")
@c.json_option
@click.pass_context
def build(ctx: click.Context, template_id: str, no_wait: bool, wait_timeout: str,
          as_json: bool) -> None:
    """Build a template, showing its log (on stderr) as it runs; prints the build. Exits 1
    when the build FAILED."""
    timeout = c.parse_duration(wait_timeout, "--wait-timeout")
    cl = c.client(ctx)
    if no_wait:
        b = cl.build_template(template_id)
        _output(b, as_json, build_summary(b))
        return
    with c.spinner(f"Building {template_id}") as spinner:
        view = LogView(spinner, template_id)
        try:
            b = cl.build_template_and_wait(template_id, timeout, on_log=view.feed)
        finally:
            view.close()
    _output(b, as_json, build_summary(b))
    if b.state == models.BuildState.FAILED:
        raise TenkiError(failure(b))


@template.command("builds")
@click.argument("template_id", metavar="ID")
@c.json_option
@click.pass_context
def builds(ctx: click.Context, template_id: str, as_json: bool) -> None:
    """List the builds of a template."""
    items = c.client(ctx).list_builds(template_id)
    if as_json:
        c.print_json(items)
        return
    rows = [
        [
            b.id,
            str(b.version),
            b.state.value,
            b.snapshot_id or "-",
            b.error or "-",
            c.fmt_time(b.created_at),
            _took(b),
        ]
        for b in items
    ]
    c.print_table(["ID", "VERSION", "STATE", "SNAPSHOT", "ERROR", "CREATED", "TOOK"], rows,
                  "no builds")


@template.command("log")
@click.argument("template_id", metavar="ID")
@click.argument("build_id", metavar="BUILD")
@click.pass_context
def log(ctx: click.Context, template_id: str, build_id: str) -> None:
    """Print a build's log (escaped), following it until the build ends."""
    for text in c.client(ctx).build_log(template_id, build_id):
        click.echo(c.escape_log(text), nl=False)

"""Shared pieces of the CLI: the client factory, input parsing, output, spinners."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

import click
import pydantic
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .. import limits, models, units
from ..client import Client
from ..client import _core as core
from ..errors import ValidationError

F = TypeVar("F", bound=Callable[..., Any])

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class CliState:
    """``ctx.obj``: how commands get their :class:`Client` (tests inject a factory)."""

    endpoint: str | None = None
    api_key: str | None = None
    client_factory: Callable[[], Client] | None = None
    _clients: list[Client] = field(default_factory=list)

    def client(self, autostart: bool = True) -> Client:
        if self.client_factory is not None:
            c = self.client_factory()
        else:
            c = Client(endpoint=self.endpoint, api_key=self.api_key, autostart=autostart)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()


def state(ctx: click.Context) -> CliState:
    obj = ctx.find_object(CliState)
    if obj is None:
        obj = ctx.ensure_object(CliState)
    return obj


def client(ctx: click.Context, autostart: bool = True) -> Client:
    st = state(ctx)
    c = st.client(autostart=autostart)
    ctx.call_on_close(c.close)
    return c


# -- input ----------------------------------------------------------------------------------


def parse_int_range(text: str | None, option: str, lo: int, hi: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ValidationError(
            f"must be an integer between {lo} and {hi}, got {text!r}", field=option
        ) from None
    if not lo <= value <= hi:
        raise ValidationError(f"must be between {lo} and {hi}, got {value}", field=option)
    return value


def parse_pairs(items: Sequence[str], option: str, *, env_names: bool = False) -> dict[str, str]:
    """``("K=V", ...)`` -> dict; the value may contain ``=`` and be empty."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"expected KEY=VALUE, got {item!r}", field=option)
        if env_names and not _ENV_KEY.match(key):
            raise ValidationError(
                f"invalid variable name {key!r} (letters, digits and _, not starting with a digit)",
                field=option,
            )
        out[key] = value
    return out


def parse_duration(text: str | None, option: str) -> float | None:
    return None if text is None else units.parse_duration(text, field=option)


def parse_size(text: str, option: str) -> int:
    size = units.parse_size(text, field=option)
    if not models.VOLUME_MIN_BYTES <= size <= models.VOLUME_MAX_BYTES:
        lo, hi = (
            units.format_size(models.VOLUME_MIN_BYTES),
            units.format_size(models.VOLUME_MAX_BYTES),
        )
        raise ValidationError(f"must be between {lo} and {hi}, got {text!r}", field=option)
    return size


def parse_expires_at(text: str | None, option: str = "--expires-at") -> datetime | None:
    """An RFC 3339 time in the future (naive times are UTC)."""
    if text is None:
        return None
    try:
        when = core.expires_at(text, field=option)
    except ValidationError:
        raise ValidationError(
            f"cannot parse {text!r}: must be in the future, as an RFC 3339 time "
            "(example: 2026-03-20T12:00:00Z)",
            field=option,
        ) from None
    assert when is not None
    if when <= datetime.now(UTC):
        raise ValidationError(f"must be in the future, got {text}", field=option)
    return when


def parse_expiry(text: str | None, option: str = "--expires-at") -> datetime | None:
    """A time in the future: RFC 3339 (naive times are UTC) or a duration from now (``30d``,
    ``12h``, ``1h30m``; at most ten years)."""
    if text is None:
        return None
    try:
        secs = units.parse_duration(text, field=option)
    except ValidationError:
        pass
    else:
        if secs > limits.DURATION_MAX_S:
            raise ValidationError(
                f"must be at most ten years from now, got {text!r}", field=option
            )
        return datetime.now(UTC) + timedelta(seconds=secs)
    try:
        when = core.expires_at(text, field=option)
    except ValidationError:
        raise ValidationError(
            f"cannot parse {text!r}: give a time (RFC 3339, e.g. 2026-03-20T12:00:00Z) or a "
            "duration from now (e.g. 30d, 12h)",
            field=option,
        ) from None
    assert when is not None
    if when <= datetime.now(UTC):
        raise ValidationError(f"must be in the future, got {text}", field=option)
    return when


def parse_volumes(specs: Sequence[str], option: str = "--volume") -> list[models.VolumeMount]:
    return [core.parse_volume_spec(s, field=option) for s in specs]


def parse_mode(text: str, option: str = "--mode") -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValidationError(
            f"must be an octal mode such as 644, got {text!r}", field=option
        ) from None
    if not 0 <= mode <= 0o7777:
        raise ValidationError(f"must be an octal mode such as 644, got {text!r}", field=option)
    return mode


def one_id(positional: str | None, option: str | None, what: str, option_name: str) -> str:
    """An id given as a positional argument or as an option (not both, not neither)."""
    if positional and option and positional != option:
        raise ValidationError(
            f"given twice ({positional!r} and {option!r}); give one", field=option_name
        )
    value = positional or option
    if not value:
        raise click.UsageError(
            f"missing {what}: give {what.upper().replace(' ', '_')} or {option_name}"
        )
    return value


# -- output ---------------------------------------------------------------------------------

# Control characters in user data (names, metadata, state reasons, paths) would drive the
# terminal (ESC sequences can recolour, retitle, hide text or move the cursor): shown escaped.
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})
# line/paragraph separators and bidirectional overrides reorder or break what is shown
_ESCAPES.update(
    {c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
)


def escape_text(text: str) -> str:
    """``text`` safe to print on a terminal: C0 and C1 control characters, DEL (so ESC
    sequences), line separators and bidi overrides become visible escapes such as ``\\x1b``."""
    return text.translate(_ESCAPES)


_LOG_ESCAPES = {k: v for k, v in _ESCAPES.items() if k not in (ord("\n"), ord("\t"))}


def escape_log(text: str) -> str:
    """Output (a log) safe to print on a terminal: as :func:`escape_text`, but newlines and
    tabs stay (and ``\\r\\n`` line ends become ``\\n``)."""
    return text.replace("\r\n", "\n").translate(_LOG_ESCAPES)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2))


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_state(state: Any, reason: str | None = None) -> str:
    text = getattr(state, "value", str(state))
    return f"{text} ({reason})" if reason else text


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    """Aligned columns, never cropped (a narrow terminal wraps lines instead); bold headers
    on a terminal, plain text without trailing blanks otherwise."""
    if not rows:
        click.echo(empty, err=True)
        return
    tty = stdout_is_tty()
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold" if tty else "")
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        # Text, not str: a cell is shown as is, never read as rich markup ("[red]")
        table.add_row(*(Text(escape_text(str(cell))) for cell in row))
    buf = io.StringIO()
    Console(
        file=buf,
        width=10_000,
        force_terminal=tty,
        color_system="standard" if tty else None,
        highlight=False,
    ).print(table)
    for line in buf.getvalue().splitlines():
        click.echo(line.rstrip())


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    """``key: value`` lines, values escaped (:func:`escape_text`)."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key + ':':<{width + 1}} {escape_text(str(value))}")


class Spinner:
    """A transient spinner with elapsed time on stderr (silent when stderr is not a terminal)."""

    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress = progress
        self._task = task

    @property
    def live(self) -> bool:
        """The spinner is shown (stderr is a terminal)."""
        return self._progress is not None

    def update(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def print(self, line: str) -> None:
        """A line on stderr, above the spinner (the caller escapes it)."""
        if self._progress is not None:
            self._progress.console.print(Text(line), soft_wrap=True, highlight=False)
        else:
            click.echo(line, err=True)


@contextmanager
def spinner(text: str, enabled: bool = True) -> Iterator[Spinner]:
    if not enabled or not stderr_is_tty():
        yield Spinner(None, None)
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(text, total=None)
        yield Spinner(progress, task)


def binary_stream(name: str) -> BinaryIO:
    """The binary side of ``sys.stdin``/``stdout``/``stderr`` (as replaced by tests too)."""
    stream = getattr(sys, name)
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else stream  # type: ignore[no-any-return]


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)

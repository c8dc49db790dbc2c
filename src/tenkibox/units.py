"""Parsing of the human units the CLI accepts: durations (``30m``) and sizes (``1GiB``)."""

from __future__ import annotations

import re

from .errors import ValidationError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str, *, field: str = "duration") -> float:
    """``"90"``, ``"30s"``, ``"10m"``, ``"1h30m"`` -> seconds (> 0)."""
    raw = text.strip().lower()
    if raw.startswith("-"):
        raise ValidationError(f"must be positive, got {text!r}", field=field)
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        seconds = float(raw)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(raw):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_SCALE[m.group(2)]
            pos = m.end()
        if pos != len(raw) or not raw:
            raise ValidationError(
                f"cannot parse {text!r} as a duration (examples: 30s, 10m, 1h30m)", field=field
            )
    if seconds <= 0:
        raise ValidationError(f"must be positive, got {text!r}", field=field)
    return seconds


def parse_size(text: str, *, field: str = "size") -> int:
    """``"1GiB"``, ``"512M"``, ``"1048576"`` -> bytes (binary units; GB is read as GiB)."""
    m = _SIZE.match(text)
    if not m:
        raise ValidationError(f"cannot parse {text!r} as a size (examples: 64MiB, 1GiB)",
                              field=field)
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _SIZE_SCALE[unit])


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

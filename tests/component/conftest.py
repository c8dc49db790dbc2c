"""Fixtures of the component tests: the in-process server (``tests/conftest.py``) over the fake
host, and our SDK's client of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.server import InProcessServer

from tenkibox import Client


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url) as c:
        yield c

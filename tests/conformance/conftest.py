"""Conformance fixtures: the official SDKs (unmodified, as published) against a live ``tenki serve``
with real VMs. The server, the guest image and the run's leak check are the integration suite's
(``tests/integration/conftest.py``): imported here, not copied, so both suites start, clean and
check their servers the same way (no QEMU process, run file or temp directory may be left).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration.conftest import (  # the fixtures are registered for this directory too
    TenkiServer,
    image_layout,
    leak_check,
    new_home,
)

__all__ = ["image_layout", "leak_check", "official_server"]


@pytest.fixture(scope="module")
def official_server(image_layout, request) -> Iterator[TenkiServer]:  # type: ignore[no-untyped-def]
    """One server for the module's programs: each one makes, and removes, what it uses."""
    server = TenkiServer(new_home(image_layout, "conformance"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()

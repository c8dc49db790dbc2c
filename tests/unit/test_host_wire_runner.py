"""``tenki host run``'s address options: --listen parsing and the advertised URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenkibox.errors import ValidationError
from tenkibox.host import runner


@pytest.mark.parametrize(("listen", "want"), [
    ("0.0.0.0:7070", ("0.0.0.0", 7070)),
    ("10.77.0.2:8000", ("10.77.0.2", 8000)),
    (":9000", ("0.0.0.0", 9000)),
    ("10.77.0.2", ("10.77.0.2", 7070)),
    ("[::]:7070", ("::", 7070)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
])
def test_listen(listen: str, want: tuple[str, int]) -> None:
    assert runner.parse_listen(listen) == want


@pytest.mark.parametrize("listen", ["host:port", "1.2.3.4:70000"])
def test_a_bad_listen_names_the_option(listen: str) -> None:
    with pytest.raises(ValidationError) as err:
        runner.parse_listen(listen)
    assert err.value.field == "listen"


def test_advertise_is_the_listen_address_or_the_first_global_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert runner.default_advertise("10.77.0.2", 7070) == "http://10.77.0.2:7070"
    assert runner.default_advertise("fd00::2", 7070) == "http://[fd00::2]:7070"
    monkeypatch.setattr(runner, "_global_addresses", lambda: ["10.77.0.3", "192.168.1.5"])
    assert runner.default_advertise("0.0.0.0", 7071) == "http://10.77.0.3:7071"
    monkeypatch.setattr(runner, "_global_addresses", lambda: [])
    assert runner.default_advertise("0.0.0.0", 7071) == "http://127.0.0.1:7071"


def test_global_addresses_skip_loopback() -> None:
    assert all(not a.startswith("127.") for a in runner._global_addresses())


def test_the_machine_fits_the_registration_limits(tmp_path: Path) -> None:
    from tenkibox.host import worker

    tcg = worker.Machine.probe("tcg", tmp_path)
    assert tcg.cpu_model == "qemu64" and len(tcg.qemu_version) <= worker.QEMU_VERSION_MAX
    kvm = worker.Machine.probe("kvm", tmp_path)
    assert kvm.cpu_model.startswith("host: ") and len(kvm.cpu_model) <= worker.CPU_MODEL_MAX
    assert not tcg.qemu_version.startswith("QEMU emulator")
    total, free = tcg.disk()
    assert total >= free > 0

"""The kernel stub a restored VM is launched with (``engine/kernelstub.py``)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tenkibox.engine import kernelstub
from tenkibox.engine.machine import QEMU, LaunchOptions, MachineConfig, MachineFiles, build_argv

CFG = MachineConfig(cpu=2, memory_mb=1024, accel="tcg", kernel="/k", initrd="/i",
                    cmdline="console=ttyS0")


def _bzimage(path: Path, setup_sects: int = 4, payload: bytes = b"\x90" * 4096) -> bytes:
    """A kernel file with a Linux boot header (protocol 2.15) and ``payload`` after the setup."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x200:0x202] = bytes([0xEB, 0x6A])  # the real entry jumps over the header
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = (0x20F).to_bytes(2, "little")
    setup[0x211] = 0x01  # loaded high
    setup[0x230:0x233] = b"hdr"  # some header field that must come through unchanged
    data = bytes(setup) + payload
    path.write_bytes(data)
    return data


def test_the_stub_is_the_header_with_a_power_off_entry_and_no_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    original = _bzimage(kernel, setup_sects=4)
    stub = kernelstub.stub_bytes(kernel)
    assert stub is not None
    setup_size = 5 * 512
    assert len(stub) == setup_size + kernelstub.TAIL and stub[setup_size:] == bytes(512)
    # the entry jumps to the code (jmp short, relative to the next instruction)
    assert stub[0x200] == 0xEB and 0x202 + stub[0x201] == kernelstub.STUB_CODE_AT
    at = kernelstub.STUB_CODE_AT
    assert stub[at:at + len(kernelstub.STUB_CODE)] == kernelstub.STUB_CODE
    # the header itself (the boot protocol QEMU and the firmware read) is the kernel's
    assert stub[0x202:0x280] == original[0x202:0x280] and stub[0x1F1] == 4


def test_zero_setup_sectors_mean_four(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    _bzimage(kernel, setup_sects=0)
    stub = kernelstub.stub_bytes(kernel)
    assert stub is not None and len(stub) == 5 * 512 + kernelstub.TAIL


def test_a_file_that_is_not_a_bzimage_gets_no_stub(tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + bytes(8192))
    short = tmp_path / "short"
    short.write_bytes(b"HdrS")
    dst = tmp_path / "stub"
    for kernel in (elf, short, tmp_path / "missing"):
        assert kernelstub.write_stub(kernel, dst) is False
        assert not dst.exists() and not dst.with_name("stub.part").exists()
    assert kernelstub.stub_bytes(elf) is None and kernelstub.stub_bytes(short) is None


def test_write_stub_writes_the_whole_file(tmp_path: Path) -> None:
    kernel, dst = tmp_path / "vmlinuz", tmp_path / "stub"
    _bzimage(kernel)
    assert kernelstub.write_stub(kernel, dst) is True
    assert dst.read_bytes() == kernelstub.stub_bytes(kernel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stub", "vmlinuz"]


def test_an_incoming_vm_gets_the_stub_and_no_initrd_with_the_same_devices() -> None:
    files, opts = MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")])
    booted = build_argv(CFG, files, opts)
    stubbed = build_argv(CFG, files, replace(opts, incoming=True), kernel_stub=Path("/r/ks"))
    assert booted[booted.index("-kernel") + 1] == "/k" and booted[booted.index("-initrd") + 1]
    assert stubbed[stubbed.index("-kernel") + 1] == "/r/ks" and "-initrd" not in stubbed
    assert stubbed[stubbed.index("-append") + 1] == booted[booted.index("-append") + 1]

    def devices(argv: list[str]) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a in ("-device", "-machine")]

    assert devices(booted) == devices(stubbed)


def _run_firmware(kernel: Path, timeout: float) -> int | None:
    """Start a VM whose firmware boots ``kernel``; its exit status, or None if it still runs
    after ``timeout`` seconds."""
    try:
        return subprocess.run(
            [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35",
             "-accel", "tcg", "-m", "128", "-kernel", str(kernel)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return None


def test_a_vm_that_resets_into_the_stub_powers_off(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # what a restored guest that reboots runs: SeaBIOS, its Linux loader, then the stub
    kernel, stub = tmp_path / "vmlinuz", tmp_path / "stub"
    _bzimage(kernel)
    assert kernelstub.write_stub(kernel, stub)
    assert _run_firmware(stub, timeout=60) == 0
    # the power-off is the stub's doing: the same stub with only ``cli; hlt`` keeps running
    monkeypatch.setattr(kernelstub, "STUB_CODE", bytes([0xFA, 0xF4, 0xEB, 0xFD]))
    assert kernelstub.write_stub(kernel, stub)
    assert _run_firmware(stub, timeout=3) is None

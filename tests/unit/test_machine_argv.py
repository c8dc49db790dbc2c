"""The device set is a pure function of the machine config (restore depends on it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tenkibox.engine.machine import LaunchOptions, MachineConfig, MachineFiles, build_argv

CFG = MachineConfig(cpu=2, memory_mb=1024, accel="tcg", kernel="/k", initrd="/i",
                    cmdline="console=ttyS0")


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def test_same_config_same_devices_wherever_the_files_are() -> None:
    a = build_argv(CFG, MachineFiles(Path("/run/a")), LaunchOptions([Path("/b"), Path("/t1")]))
    b = build_argv(CFG, MachineFiles(Path("/run/b")),
                   LaunchOptions([Path("/b"), Path("/l1"), Path("/t2")], incoming=True))
    assert _devices(a) == _devices(b)
    assert "-incoming" in b and "-incoming" not in a


def test_chain_is_spelled_out_and_only_the_top_is_writable() -> None:
    argv = build_argv(CFG, MachineFiles(Path("/r")),
                      LaunchOptions([Path("/base"), Path("/mid"), Path("/top")]))
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    fmt = [n for n in nodes if n["driver"] == "qcow2"]
    assert [n["read-only"] for n in fmt] == [True, True, False]
    assert fmt[0]["backing"] is None
    assert fmt[1]["backing"] == fmt[0]["node-name"]
    assert fmt[2]["backing"] == fmt[1]["node-name"]


def test_ram_of_a_booted_vm_is_anonymous_memory() -> None:
    """A capture reads all of RAM: anonymous memory maps the zero page for what was never
    written, where a tmpfs file would allocate it."""
    argv = build_argv(CFG, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    backend = argv[argv.index("-object") + 1]
    assert backend.startswith("memory-backend-ram,") and "mem-path" not in backend


def test_a_conversion_scratch_has_a_shared_ram_file_and_a_restore_a_private_one() -> None:
    files, opts = MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")])
    scratch = build_argv(replace(CFG, ram_file="/store/x.tmp"), files, opts)
    backend = scratch[scratch.index("-object") + 1]
    assert "mem-path=/store/x.tmp" in backend and "share=on" in backend
    restored = build_argv(replace(CFG, ram_base="/cache/d.ram"), files, opts)
    backend = restored[restored.index("-object") + 1]
    assert "mem-path=/cache/d.ram" in backend and "share=off" in backend



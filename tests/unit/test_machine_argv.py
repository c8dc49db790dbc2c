"""The device set is a pure function of the machine config (restore depends on it)."""

from __future__ import annotations

import json
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


def test_ram_is_a_shared_file_so_snapshots_can_skip_it() -> None:
    argv = build_argv(CFG, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    backend = argv[argv.index("-object") + 1]
    assert "memory-backend-file" in backend and "share=on" in backend
    assert "mem-path=/r/ram" in backend

"""The device set is a pure function of the machine config (restore depends on it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tenkibox.engine.machine import (
    TCG_RAM_PAD,
    LaunchOptions,
    MachineConfig,
    MachineFiles,
    build_argv,
    default_cpu_model,
    live_save_safe,
    ram_pad,
    tcg_threads,
)
from tenkibox.errors import ValidationError
from tenkibox.host.api import MachineShape

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


def test_ram_shared_is_a_memfd_never_saved_live() -> None:
    """A booted VM captured by the pages it touched (``host/written.py``); a live save would
    read, and so allocate, every page of the memfd."""
    cfg = replace(CFG, ram_shared=True, ram_pad=TCG_RAM_PAD)
    argv = build_argv(cfg, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    backend = argv[argv.index("-object") + 1]
    assert backend.startswith("memory-backend-memfd,") and "share=on" in backend
    assert not live_save_safe(cfg) and live_save_safe(replace(cfg, ram_shared=False))
    assert MachineConfig.from_json({k: v for k, v in cfg.to_json().items()
                                    if k != "ram_shared"}).ram_shared is False  # older notes


def test_a_conversion_scratch_has_a_shared_ram_file_and_a_restore_a_private_one() -> None:
    files, opts = MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")])
    scratch = build_argv(replace(CFG, ram_file="/store/x.tmp"), files, opts)
    backend = scratch[scratch.index("-object") + 1]
    assert "mem-path=/store/x.tmp" in backend and "share=on" in backend
    restored = build_argv(replace(CFG, ram_base="/cache/d.ram"), files, opts)
    backend = restored[restored.index("-object") + 1]
    assert "mem-path=/cache/d.ram" in backend and "share=off" in backend




def _cpu(argv: list[str]) -> str:
    return argv[argv.index("-cpu") + 1]


def test_the_guest_cpu_is_the_shapes_model_else_the_accelerators_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore starts QEMU with the model its snapshot was captured with (the shape records
    it), whatever this host would give a new VM; an old shape (no model) gets the default."""
    files, opts = MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")])
    monkeypatch.delenv("TENKI_CPU_MODEL", raising=False)
    assert _cpu(build_argv(CFG, files, opts)) == "qemu64"
    assert _cpu(build_argv(replace(CFG, accel="kvm"), files, opts)) == "host"
    assert _cpu(build_argv(replace(CFG, accel="kvm", cpu_model="Haswell-v4"), files,
                           opts)) == "Haswell-v4"
    assert default_cpu_model("tcg") == "qemu64" and default_cpu_model("kvm") == "host"
    monkeypatch.setenv("TENKI_CPU_MODEL", "EPYC-v4,-svm")
    assert default_cpu_model("kvm") == "EPYC-v4,-svm"
    assert _cpu(build_argv(replace(CFG, cpu_model="qemu64"), files, opts)) == "qemu64"
    for bad in ("host -S", "qemu64;rm", ",x"):
        monkeypatch.setenv("TENKI_CPU_MODEL", bad)
        with pytest.raises(ValidationError, match="TENKI_CPU_MODEL") as err:
            default_cpu_model("kvm")
        assert err.value.field == "TENKI_CPU_MODEL"


def test_a_shape_keeps_its_cpu_model_and_an_old_one_has_none() -> None:
    shape = MachineShape(cpu=2, memory_mb=512, cmdline="c", kernel="k", initrd="i",
                         cpu_model="Haswell-v4")
    assert MachineShape.from_json(json.loads(json.dumps(shape.to_json()))) == shape
    old = {k: v for k, v in shape.to_json().items() if k != "cpu_model"}
    assert MachineShape.from_json(old).cpu_model == ""


def _sizes(argv: list[str]) -> tuple[str, str]:
    backend = argv[argv.index("-object") + 1]
    size = next(p.removeprefix("size=") for p in backend.split(",") if p.startswith("size="))
    return argv[argv.index("-m") + 1], size


def test_under_tcg_a_new_vm_has_a_ram_block_qemu_tracks_page_by_page() -> None:
    """QEMU 7.2 loses TCG writes in a live save of a RAM block that is a multiple of 64 pages
    long (engine.machine.TCG_RAM_PAD): a new VM's block is 8 KiB longer, machine and backend
    alike (QEMU refuses them unequal), and only such a VM is saved live."""
    padded = replace(CFG, ram_pad=ram_pad("tcg"))
    argv = build_argv(padded, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    assert _sizes(argv) == ("1048584K", "1048584K")
    assert (1024 * 2**20 + TCG_RAM_PAD) % (64 * 4096) != 0
    assert live_save_safe(padded)
    # a VM from before the pad (booted then, or restored from a snapshot of then) keeps its
    # exact size, and is saved stopped
    old = build_argv(CFG, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    assert _sizes(old) == ("1024M", "1024M")
    assert not live_save_safe(CFG)


def test_under_kvm_ram_is_the_configured_size_and_saved_live() -> None:
    kvm = replace(CFG, accel="kvm", ram_pad=ram_pad("kvm"))
    assert kvm.ram_pad == 0
    argv = build_argv(kvm, MachineFiles(Path("/r")), LaunchOptions([Path("/b"), Path("/t")]))
    assert _sizes(argv) == ("1024M", "1024M")
    assert live_save_safe(kvm)


def test_a_shape_records_its_ram_pad_and_an_older_one_has_none() -> None:
    shape = MachineShape(cpu=1, memory_mb=512, cmdline="c", kernel="k", initrd="i",
                         ram_pad=TCG_RAM_PAD)
    assert MachineShape.from_json(shape.to_json()) == shape
    old = {k: v for k, v in shape.to_json().items() if k != "ram_pad"}
    assert MachineShape.from_json(old).ram_pad == 0


def _accel(argv: list[str]) -> str:
    return argv[argv.index("-accel") + 1]


def test_tcg_threads_go_on_the_accelerator_and_kvm_takes_none() -> None:
    files, disks = MachineFiles(Path("/r")), [Path("/b"), Path("/t")]
    assert _accel(build_argv(CFG, files, LaunchOptions(disks))) == "tcg"
    assert _accel(build_argv(CFG, files, LaunchOptions(disks, tcg_threads="single"))) \
        == "tcg,thread=single"
    assert _accel(build_argv(CFG, files, LaunchOptions(disks, tcg_threads="multi"))) \
        == "tcg,thread=multi"
    kvm = build_argv(replace(CFG, accel="kvm"), files, LaunchOptions(disks, tcg_threads="single"))
    assert _accel(kvm) == "kvm"
    # the device set does not depend on it: a snapshot restores under either
    assert _devices(build_argv(CFG, files, LaunchOptions(disks, tcg_threads="single"))) == \
        _devices(build_argv(CFG, files, LaunchOptions(disks)))


def test_a_thread_per_vcpu_only_while_every_vcpu_has_a_core(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENKI_TCG_THREADS", raising=False)
    assert tcg_threads(2, 0, cores=2) == "multi"
    assert tcg_threads(2, 2, cores=4) == "multi"
    assert tcg_threads(2, 1, cores=2) == "single"
    assert tcg_threads(2, 4, cores=4) == "single"
    assert tcg_threads(1, 8, cores=2) == "multi"  # one vCPU is one thread either way
    monkeypatch.setenv("TENKI_TCG_THREADS", "multi")
    assert tcg_threads(2, 8, cores=2) == "multi"
    monkeypatch.setenv("TENKI_TCG_THREADS", "Single")
    assert tcg_threads(2, 0, cores=8) == "single"
    monkeypatch.setenv("TENKI_TCG_THREADS", "many")
    with pytest.raises(ValidationError) as err:
        tcg_threads(2, 0, cores=8)
    assert err.value.field == "TENKI_TCG_THREADS"

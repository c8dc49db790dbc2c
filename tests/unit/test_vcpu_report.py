"""Where a guest's vCPUs are, for a guest whose agent never answered (``Machine.vcpu_report``):
its console is ``quiet`` and may say nothing."""

from __future__ import annotations

from pathlib import Path

from tenkibox.engine.machine import Machine, MachineConfig, MachineFiles, describe_vcpus

#: QEMU 7.2's HMP ``info registers -a`` of a 2-vCPU q35 machine before it ran (trimmed): real
#: mode, ``EIP`` at the reset vector; the second vCPU waits for its start-up interrupt
AT_RESET = """
CPU#0
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 00000000 0000ffff 00009300
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000

CPU#1
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 00000000 0000ffff 00009300
"""

#: the same in long mode: one vCPU idle in the kernel, one running a program
RUNNING = """
CPU#0
RAX=0000000000000000 RBX=ffffffffa8a10940 RCX=0000000000000000 RDX=0000000000000000
RIP=ffffffffa775a193 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=00007f3c2c9f1000 CR3=000000001e24a000 CR4=00350ef0

CPU#1
RAX=0000000000000001 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=00005625504c9430 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
CR0=80050033 CR2=00005625504e1000 CR3=000000001f3b6000 CR4=00350ef0
"""


def test_each_vcpu_is_named_with_where_it_is() -> None:
    assert describe_vcpus("prelaunch", AT_RESET) == (
        "QEMU prelaunch; vCPU 0 in firmware or early boot at 0000fff0; "
        "vCPU 1 in firmware or early boot at 0000fff0, halted")
    assert describe_vcpus("running", RUNNING) == (
        "QEMU running; vCPU 0 in the guest kernel at ffffffffa775a193, halted; "
        "vCPU 1 in user space at 00005625504c9430")


def test_a_block_without_registers_is_left_out_and_nothing_is_read_across_blocks() -> None:
    # the first vCPU's block lacks its registers: the second's must not be taken for them
    text = "CPU#0\n(unavailable)\n" + RUNNING.split("CPU#0")[1].replace("CPU#1", "CPU#7")
    got = describe_vcpus("running", text.replace("RIP=ffffffffa775a193", "XIP=0", 1))
    assert got == "QEMU running; vCPU 7 in user space at 00005625504c9430"
    assert describe_vcpus("paused", "") == "QEMU paused"


async def test_a_machine_without_qemu_reports_nothing(tmp_path: Path) -> None:
    cfg = MachineConfig(cpu=1, memory_mb=256, accel="tcg", kernel="/k", initrd="/i",
                        cmdline="console=ttyS0")
    assert await Machine("m", MachineFiles(tmp_path), cfg).vcpu_report() == ""

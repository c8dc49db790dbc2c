"""The kernel a restored VM is launched with: the real kernel's boot header and nothing else.

A restore never boots: the guest's kernel is already in the RAM it maps. Yet QEMU reads the file
given with ``-kernel`` whole at launch and keeps it in its own memory for the firmware (fw_cfg):
14 MiB of the image's kernel was ~20 ms of each launch and ~14 MiB of anonymous memory in each
restored QEMU (a bare launch: 0.06 s and 30 MiB anonymous with it, 0.04 s and 16 MiB with
this stub). ``-kernel`` cannot just be left out: it adds the firmware's Linux loader ROM, and a
device state loads only into a VM with the same ROMs. So a restore's QEMU gets this stub: the
real header (the same boot protocol, hence the same ROMs and the same firmware tables) and no
kernel. No initrd either (it adds no ROM).

The stub only runs if the guest resets (a reboot): the firmware then starts it like a kernel.
Its entry powers the VM off (ACPI S5 on the q35 chipset's power-management port, as SeaBIOS
sets it), so a restored guest that reboots stops, like a Firecracker microVM, and the host
reports the session's VM as stopped; if the port does not answer, the vCPU halts with
interrupts off.

Layout (Linux's ``Documentation/arch/x86/boot.rst``): ``setup_sects`` at 0x1f1, the magic
``HdrS`` at 0x202, the real-mode entry at 0x200 (a short jump over the header, which ends
before 0x280).
"""

from __future__ import annotations

import os
from pathlib import Path

SETUP_SECTS = 0x1F1
ENTRY = 0x200
MAGIC_AT = 0x202
MAGIC = b"HdrS"
#: where the power-off code goes: past every header field of the boot protocols so far
STUB_CODE_AT = 0x280
#: 16-bit real mode: cli; mov dx, 0x604 (PM1a_CNT: SeaBIOS's PM base 0x600 + 4);
#: mov ax, 0x2000 (SLP_EN, SLP_TYP 0 = S5 on q35); out dx, ax; hlt; jmp back to the hlt
STUB_CODE = bytes([0xFA, 0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF, 0xF4, 0xEB, 0xFD])
#: QEMU refuses a kernel no longer than its setup: one sector of zeros after it
TAIL = 512


def stub_bytes(kernel: Path) -> bytes | None:
    """The stub for ``kernel``, or None when it is not a Linux bzImage with a boot header
    (the caller then launches the real kernel)."""
    with open(kernel, "rb") as f:
        head = f.read(MAGIC_AT + len(MAGIC))
        if len(head) < MAGIC_AT + len(MAGIC) or head[MAGIC_AT:] != MAGIC:
            return None
        # 0 means 4, from the oldest protocol; the setup is followed by the protected-mode part
        setup_size = ((head[SETUP_SECTS] or 4) + 1) * 512
        if setup_size < STUB_CODE_AT + len(STUB_CODE):
            return None
        f.seek(0)
        setup = bytearray(f.read(setup_size))
    if len(setup) < setup_size:
        return None
    setup[ENTRY:ENTRY + 2] = bytes([0xEB, STUB_CODE_AT - (ENTRY + 2)])  # jmp short
    setup[STUB_CODE_AT:STUB_CODE_AT + len(STUB_CODE)] = STUB_CODE
    return bytes(setup) + bytes(TAIL)


def write_stub(kernel: Path, dst: Path) -> bool:
    """Write ``kernel``'s stub to ``dst`` (whole or not at all); False when it has none or it
    cannot be written: the VM is then launched with the real kernel, whose errors QEMU
    reports with its command line."""
    part = dst.with_name(dst.name + ".part")
    try:
        data = stub_bytes(kernel)
        if data is None:
            return False
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, dst)
    except OSError:
        part.unlink(missing_ok=True)
        return False
    return True

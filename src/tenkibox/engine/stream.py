"""Split a full QEMU migration stream into a RAM image and a device state, without a QEMU.

A live save writes a *full* stream (guest RAM included, some pages more than once). A restore
wants the guest RAM as a sparse file it maps, and the device state as the stream QEMU writes
with ``x-ignore-shared`` (restore loads it with that capability on). Loading the full stream
into a scratch QEMU and saving it again does that too, but it reads every page the stream marks
as zero (allocating it) and costs a launch; this reads the stream once and writes only the
pages that hold data.

What it relies on, QEMU 7.2's stream format (``migration/savevm.c``, ``migration/ram.c``):

- header: ``QEVM`` magic, version 3, then a configuration section (machine type, optional
  subsections). With ``x-ignore-shared`` the source adds the ``configuration/capabilities``
  subsection naming it, and a destination with the capability on refuses a stream without it.
- the ``ram`` section: a START with the list of RAM blocks (name, size; with
  ``x-ignore-shared`` each also carries its guest address), then PART and END sections of page
  records ``be64 offset|flags`` (the block's name follows unless ``CONTINUE``), each a zero
  page (one fill byte) or a whole page, each section ending with ``EOS``; a footer closes
  every section.
- then the devices' FULL sections, the end marker and a description: copied as they are.

A page of the guest RAM block goes to the RAM image (a later copy wins, a zero page leaves a
hole, or zeroes a page sent with data before); pages of every other block (firmware, ROMs,
ACPI tables) stay in the device state, as QEMU would have written them. The block addresses
the source did not write are written as 0: QEMU checks them only for blocks it skips as
shared, and a restored VM maps its RAM privately. Anything else in the stream (another
iterable section, an unknown page flag) is refused: better a failed capture than a snapshot
that does not restore.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
PAGE = 4096
ZERO_PAGE = bytes(PAGE)

# section types
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
CONFIGURATION = 0x07
SECTION_FOOTER = 0x7E
VM_EOF = 0x00
VMDESCRIPTION = 0x06
COMMAND = 0x08  # QEMU_VM_COMMAND: be16 command, be16 length, data
CMD_SWITCHOVER_START = 11  # QEMU 10 (migration/savevm.c, enum qemu_vm_cmd)

# page record flags (low bits of the offset)
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAGS_MASK = PAGE - 1
KNOWN_FLAGS = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE

# A first pass over a mostly idle guest is mostly zero-page records of consecutive pages, 9 bytes
# each (a million per 4 GiB): they are matched a window at a time against the bytes such a run
# has, instead of one Python step per record. Within an aligned window of 4096 pages the
# record's first five bytes are the window's number and the next two the page's place in it.
RUN_WINDOW = 4096
_ZERO_CONT = bytes([FLAG_ZERO | FLAG_CONTINUE])
_RUN_B5 = bytes((j >> 4) & 0xFF for j in range(RUN_WINDOW))
_RUN_B6 = bytes((j << 4) & 0xFF for j in range(RUN_WINDOW))

CAPABILITIES = b"configuration/capabilities"
IGNORE_SHARED = b"x-ignore-shared"


class StreamError(Exception):
    """The stream is not one this module can split (truncated, or a feature it does not know)."""


@dataclass
class Split:
    ram_block: str
    ram_bytes: int  # size of the RAM image (the block's size)
    data_pages: int  # pages written to it
    blocks: dict[str, int] = field(default_factory=dict)  # every RAM block and its size


class _Reader:
    """Reads a stream mapped in memory: no read call per record (there is one per page)."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0
        self.size = len(buf)

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.size:
            raise StreamError("the stream ends early")
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def u8(self) -> int:
        if self.pos >= self.size:
            raise StreamError("the stream ends early")
        self.pos += 1
        return self.buf[self.pos - 1]

    def be32(self) -> int:
        if self.pos + 4 > self.size:
            raise StreamError("the stream ends early")
        self.pos += 4
        return int(_BE32.unpack_from(self.buf, self.pos - 4)[0])

    def be64(self) -> int:
        if self.pos + 8 > self.size:
            raise StreamError("the stream ends early")
        self.pos += 8
        return int(_BE64.unpack_from(self.buf, self.pos - 8)[0])

    def name(self) -> bytes:
        return self.take(self.u8())

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.pos < self.size else None

    def rest(self) -> memoryview:
        out = self.view[self.pos:]
        self.pos = self.size
        return out


_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def split(stream: Path, ram_out: Path, state_out: Path, ram_block: str = "mem0") -> Split:
    """Write the RAM image of ``ram_block`` to ``ram_out`` (sparse) and the device state to
    ``state_out``; raises StreamError for a stream it cannot split."""
    with open(stream, "rb") as fin, open(state_out, "wb") as fstate, \
            open(ram_out, "wb") as fram:
        if os.fstat(fin.fileno()).st_size == 0:
            raise StreamError("the stream is empty")
        with mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf)
            try:
                out = _Splitter(reader, fstate, fram, ram_block.encode())
                out.run()
            finally:
                reader.view.release()
        return Split(ram_block, out.ram_size, out.data_pages,
                     {k.decode(): v for k, v in out.blocks.items()})


def with_devices(state: Path, devices: Path, out: Path, ram_block: str = "mem0") -> None:
    """A device state a restore loads, for a guest whose RAM is kept elsewhere: the
    configuration and RAM sections of ``state`` (a device state ``split`` wrote: the firmware's
    and ROMs' pages, none of ``ram_block``), then the device sections of ``devices`` (what
    ``migration.save_devices`` wrote, of the same machine). The ROMs do not change under a
    running guest (a reset rebuilds the ACPI tables from the machine's devices, as at boot).
    Raises StreamError for files it does not know."""
    dev = devices.read_bytes()  # ~1 MiB: the devices' registers, queues, tables
    head = struct.pack(">II", MAGIC, VERSION)
    if len(dev) < 10 or not dev.startswith(head) or dev[8] != SECTION_FULL or dev[-1] != VM_EOF:
        raise StreamError(f"{devices.name} is not a device state of QEMU's")
    with open(state, "rb") as fin, open(out, "wb") as fout:
        if os.fstat(fin.fileno()).st_size == 0:
            raise StreamError("the device state is empty")
        with mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf)
            try:
                _Splitter(reader, fout, None, ram_block.encode()).run()
            finally:
                reader.view.release()
        fout.write(dev[8:])
        # QEMU reads a description after the end marker (for tools that dump streams; it
        # complains if there is none and does not look inside)
        desc = b'{"page_size": 4096, "devices": []}'
        fout.write(bytes([VMDESCRIPTION]) + struct.pack(">I", len(desc)) + desc)


def device_sections(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """``(idstr, instance, body)`` of each section of a device state that
    ``migration.save_devices`` wrote, in order. A section's body has no length of its own: it
    ends at the footer naming its id that a well-formed next section (or the end marker)
    follows."""
    if not data.startswith(struct.pack(">II", MAGIC, VERSION)):
        raise StreamError("not a device state of QEMU's")
    out: list[tuple[bytes, int, bytes]] = []
    pos = 8
    while True:
        if pos >= len(data):
            raise StreamError("the device state ends early")
        if data[pos] == VM_EOF:
            return out
        head = _section_head(data, pos)
        if head is None:
            raise StreamError(f"no device section at {pos}")
        section_id, idstr, instance, body = head
        footer = bytes([SECTION_FOOTER]) + struct.pack(">I", section_id)
        end = data.find(footer, body)
        while end >= 0:
            after = end + len(footer)
            if after < len(data) and (data[after] == VM_EOF
                                      or _section_head(data, after) is not None):
                break
            end = data.find(footer, end + 1)
        if end < 0:
            raise StreamError(f"device section {idstr!r} has no end")
        out.append((idstr, instance, data[body:end]))
        pos = end + len(footer)


def _section_head(data: bytes, pos: int) -> tuple[int, bytes, int, int] | None:
    """(id, idstr, instance, where the body begins) of a FULL section header at ``pos``."""
    if pos + 6 > len(data) or data[pos] != SECTION_FULL:
        return None
    section_id = int.from_bytes(data[pos + 1:pos + 5], "big")
    n = data[pos + 5]
    idstr = data[pos + 6:pos + 6 + n]
    if n == 0 or len(idstr) != n or not all(32 < c < 127 for c in idstr) \
            or pos + 14 + n > len(data):
        return None
    instance = int.from_bytes(data[pos + 6 + n:pos + 10 + n], "big")
    return section_id, idstr, instance, pos + 14 + n


class _Splitter:
    """One pass over a stream: with ``ram`` a full stream, split; without, a device state
    ``split`` wrote, its configuration and RAM sections copied up to its devices."""

    def __init__(self, r: _Reader, state: BinaryIO, ram: BinaryIO | None,
                 ram_block: bytes) -> None:
        self.r, self.state, self.ram, self.ram_block = r, state, ram, ram_block
        self.ram_fd = ram.fileno() if ram is not None else -1
        self.ignore_shared = False  # the stream was saved with it (its blocks carry addresses)
        self.ram_section: int | None = None
        self.blocks: dict[bytes, int] = {}
        self.ram_size = 0
        self.data_pages = 0
        self.written = bytearray()  # 1 per page of the RAM image that holds data
        self.block: bytes | None = None  # the block of the last record (CONTINUE)

    def put(self, data: bytes | memoryview) -> None:
        self.state.write(data)

    def run(self) -> None:
        r = self.r
        head = r.take(8)
        magic, version = struct.unpack(">II", head)
        if magic != MAGIC or version != VERSION:
            raise StreamError(f"not a QEMU migration stream (magic {magic:#x}, "
                              f"version {version})")
        self.put(head)
        if r.u8() != CONFIGURATION:
            raise StreamError("the stream has no configuration section")
        self._configuration()
        while True:
            kind = r.u8()
            if kind in (SECTION_START, SECTION_PART, SECTION_END):
                self._iterable(kind)
            elif kind == SECTION_FULL:
                if self.ram_section is None:
                    raise StreamError("device state before the RAM")
                if self.ram is None:
                    break  # the devices come from elsewhere
                # the devices, the end marker and the description: as they are
                self.put(bytes([kind]))
                rest = r.rest()
                try:
                    self.put(rest)
                finally:
                    rest.release()
                break
            elif kind == COMMAND:
                self._command()
            else:
                raise StreamError(f"unexpected section type {kind:#x}")
        if self.ram_block not in self.blocks:
            raise StreamError(f"the stream has no RAM block {self.ram_block.decode()}")
        if self.ram is not None:
            self.ram.truncate(self.ram_size)

    def _command(self) -> None:
        """QEMU 10's ``MIG_CMD_SWITCHOVER_START`` (no data), sent before the last pass by a
        machine type 10.0 or later (``send-switchover-start``): copied as it is, any other
        command refused."""
        r = self.r
        cmd, n = struct.unpack(">HH", r.take(4))
        if cmd != CMD_SWITCHOVER_START or n != 0:
            raise StreamError(f"unexpected command {cmd} ({n} bytes)")
        self.put(bytes([COMMAND]) + struct.pack(">HH", cmd, n))

    def _configuration(self) -> None:
        """Copy the machine type and any subsection but the capabilities one; then write the
        capabilities subsection a stream saved with ``x-ignore-shared`` has."""
        r = self.r
        n = r.be32()
        machine = r.take(n)
        self.put(bytes([CONFIGURATION]) + struct.pack(">I", n) + machine)
        while r.peek() == SUBSECTION:
            r.u8()
            name = r.name()
            version = r.be32()
            if name == CAPABILITIES:
                count = r.be32()
                caps = [r.name() for _ in range(count)]
                if self.ram is None and caps == [IGNORE_SHARED]:  # a device state's
                    self.ignore_shared = True
                elif caps:
                    raise StreamError(f"the stream was saved with capabilities {caps!r}")
                continue
            if name != b"configuration/target-page-bits":
                raise StreamError(f"unknown configuration subsection {name!r}")
            bits = r.be32()
            self.put(bytes([SUBSECTION, len(name)]) + name + struct.pack(">II", version, bits))
        self.put(bytes([SUBSECTION, len(CAPABILITIES)]) + CAPABILITIES
                 + struct.pack(">II", 1, 1) + bytes([len(IGNORE_SHARED)]) + IGNORE_SHARED)

    def _iterable(self, kind: int) -> None:
        r = self.r
        section_id = r.be32()
        if kind == SECTION_START:
            idstr = r.name()
            instance, version = r.be32(), r.be32()
            if idstr != b"ram":
                raise StreamError(f"iterable section {idstr!r} is not supported")
            self.ram_section = section_id
            self.put(bytes([kind]) + struct.pack(">I", section_id) + bytes([len(idstr)])
                     + idstr + struct.pack(">II", instance, version))
            self._setup()
        else:
            if section_id != self.ram_section:
                raise StreamError(f"section {section_id} is not the RAM section")
            self.put(bytes([kind]) + struct.pack(">I", section_id))
            self._pages()
        if r.u8() != SECTION_FOOTER or r.be32() != section_id:
            raise StreamError(f"section {section_id} has no footer")
        self.put(bytes([SECTION_FOOTER]) + struct.pack(">I", section_id))

    def _setup(self) -> None:
        r = self.r
        head = r.be64()
        if not head & FLAG_MEM_SIZE:
            raise StreamError("the RAM section does not start with its size")
        total = head & ~FLAGS_MASK
        self.put(struct.pack(">Q", head))
        seen = 0
        while seen < total:
            name = r.name()
            size = r.be64()
            if self.ignore_shared:
                r.be64()  # its address (written again as 0 below)
            self.blocks[name] = size
            seen += size
            # the address a stream saved with x-ignore-shared carries (see the module's note)
            self.put(bytes([len(name)]) + name + struct.pack(">QQ", size, 0))
        if seen != total or self.ram_block not in self.blocks:
            raise StreamError("the RAM blocks do not add up to the RAM size")
        self.ram_size = self.blocks[self.ram_block]
        self.written = bytearray(self.ram_size // PAGE)
        if r.be64() != FLAG_EOS:
            raise StreamError("the RAM section's block list does not end")
        self.put(struct.pack(">Q", FLAG_EOS))

    def _pages(self) -> None:
        r, put = self.r, self.put
        buf, size, be64 = r.buf, r.size, _BE64.unpack_from
        ours = self.ram_block
        ours_size = self.blocks[ours] if ours in self.blocks else 0
        written = self.written
        while True:
            # the common record first, read in place: a zero page continuing the guest's RAM
            pos = r.pos
            if pos + 9 > size:
                raise StreamError("the stream ends early")
            raw = be64(buf, pos)[0]
            flags = raw & FLAGS_MASK
            if flags == FLAG_ZERO | FLAG_CONTINUE and self.block == ours and not buf[pos + 8]:
                offset = raw & ~FLAGS_MASK
                page = offset // PAGE
                run = self._zero_run(pos, page, ours_size // PAGE)
                if run:
                    r.pos = pos + 9 * run
                    if written.find(1, page, page + run) >= 0:  # data before, zero now
                        for p in range(page, page + run):
                            if written[p]:
                                self._ram_page(p * PAGE, b"\0")
                    continue
                if offset + PAGE > ours_size:
                    raise StreamError(f"a page beyond the end of block {ours!r}")
                r.pos = pos + 9
                if written[page]:
                    self._ram_page(offset, b"\0")
                continue
            r.pos = pos + 8
            offset = raw & ~FLAGS_MASK
            if flags & ~KNOWN_FLAGS:
                raise StreamError(f"page flags {flags:#x} are not supported")
            if flags & FLAG_EOS:
                put(_BE64.pack(FLAG_EOS))
                return
            if flags & FLAG_CONTINUE:
                if self.block is None:
                    raise StreamError("a page continues a block never named")
                block = self.block
            else:
                block = r.name()
                if block not in self.blocks:
                    raise StreamError(f"a page of the unknown RAM block {block!r}")
            if flags & FLAG_ZERO:
                payload = r.take(1)
            elif flags & FLAG_PAGE:
                payload = r.take(PAGE)
            else:
                raise StreamError(f"page flags {flags:#x} are not supported")
            if offset + PAGE > self.blocks[block]:
                raise StreamError(f"a page beyond the end of block {block!r}")
            if block == ours:
                self._ram_page(offset, payload)
                # the next record kept in the device state must name its block
                self.block = ours
                continue
            if self.block == block:
                put(_BE64.pack(offset | flags | FLAG_CONTINUE) + payload)
            else:
                put(_BE64.pack(offset | (flags & ~FLAG_CONTINUE)) + bytes([len(block)])
                    + block + payload)
            self.block = block

    def _zero_run(self, pos: int, page: int, pages: int) -> int:
        """How many zero-page records of consecutive guest RAM pages, from ``page`` on, start
        at ``pos`` (within ``page``'s window and the block's ``pages``); 0 if fewer than two:
        the caller then takes the record on its own."""
        buf, size = self.r.buf, self.r.size
        first = page % RUN_WINDOW
        n = min(RUN_WINDOW - first, (size - pos) // 9, pages - page)
        if n < 2:
            return 0
        chunk = buf[pos:pos + 9 * n]
        # the leading records with a zero page's flags and fill byte, then their offsets
        n -= max(len(chunk[7::9].lstrip(_ZERO_CONT)), len(chunk[8::9].lstrip(b"\0")))
        if n < 2:
            return 0
        want = bytearray(9 * n)
        window = (page // RUN_WINDOW).to_bytes(5, "big")
        for i in range(5):
            want[i::9] = window[i:i + 1] * n
        want[5::9] = _RUN_B5[first:first + n]
        want[6::9] = _RUN_B6[first:first + n]
        want[7::9] = _ZERO_CONT * n
        return n if chunk[:9 * n] == want else 0

    def _ram_page(self, offset: int, payload: bytes) -> None:
        if self.ram is None:
            raise StreamError("a device state that holds guest RAM")
        page = offset // PAGE
        if len(payload) == PAGE:
            if payload == ZERO_PAGE:
                payload = b"\0"
            else:
                os.pwrite(self.ram_fd, payload, offset)
                if not self.written[page]:
                    self.written[page] = 1
                    self.data_pages += 1
                return
        fill = payload[0]
        if fill:
            os.pwrite(self.ram_fd, bytes([fill]) * PAGE, offset)
            if not self.written[page]:
                self.written[page] = 1
                self.data_pages += 1
        elif self.written[page]:  # sent with data before, zero now (rare: no hole punched)
            os.pwrite(self.ram_fd, ZERO_PAGE, offset)

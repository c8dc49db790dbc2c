"""The guest networks of this host: one namespace, tap device and rule set per VM.

``HostNetwork`` owns them from ``setup`` or ``prepare`` (before QEMU starts) to ``teardown``
(after it is gone); ``prepare`` builds what QEMU's launch needs and the rest in the background,
which ``wired`` waits for. What a VM may reach is its ``NetworkSpec``, enforced by nftables
outside the guest (``rules``); names resolve through the VM's own DNS forwarder (``dns``). A
VM's slot and spec are kept in its ``vm.json`` (``VMRecord.net``), so a restarted server finds
its network again; namespaces and tables that no live VM owns are removed at recovery.
``broken`` tells the host's watcher when a part of a running VM's network is gone (its
namespace, the host end of its veth pair, its table on the host, its DNS forwarder): nothing is
rebuilt under a running guest.

Where the host cannot do this (not root, no nftables), ``enforced`` is False: VMs get the
user-mode helper (``engine.net``), which keeps the host's loopback out of reach but enforces no
policy; the control plane refuses policies on such a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..api import NetworkSpec
from . import links
from .addressing import VMNet, max_slots
from .dns import DnsProxy
from .rules import allow_elements

log = logging.getLogger(__name__)


#: attempts at a free slot when another server on the machine takes the same one meanwhile
SLOT_TRIES = 8
#: how old a listing of the host's tables may be for ``broken`` (one ``nft`` run answers the
#: watchers of every VM within that time)
TABLES_MAX_AGE_S = 0.4
T = TypeVar("T")


async def _in_thread(call: Callable[..., T], *args: Any,
                     undo: Callable[[T], object] | None = None) -> T:
    """``call(*args)`` in a thread, waited for even when the caller is cancelled meanwhile:
    the thread cannot be stopped, and what it makes must exist before the teardown that follows
    a cancelled set-up looks for it. What it returned then goes to ``undo`` (a descriptor to
    close), and the cancellation goes on."""
    work = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            made = await work
            if undo is not None:
                undo(made)
        raise


@dataclass
class Tap:
    """The tap device of a VM's network, open: ``fd`` is for QEMU's launch (``-netdev
    tap,fd=``), which takes its own copy; ``close`` the server's then (idempotent)."""

    net: VMNet
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostNetwork:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        forced = os.environ.get("TENKI_NET", "").strip().lower()
        why = links.why_unavailable() if forced in ("", "tap") else f"TENKI_NET={forced}"
        self.enforced = why is None
        if forced == "tap" and why is not None:
            raise links.NetworkError(f"TENKI_NET=tap, but this host cannot: {why}")
        if why is not None:
            log.warning("guest networks: the user-mode helper, no egress policy or exposed "
                        "ports on this host (%s)", why)
        self._nets: dict[str, VMNet] = {}
        #: session -> the background part of its set-up (``prepare``), until ``wired``
        self._wiring: dict[str, asyncio.Task[None]] = {}
        self._specs: dict[str, NetworkSpec] = {}
        self._dns = DnsProxy(self._allow)
        self._lock = asyncio.Lock()
        self._prepared = False
        #: session -> when its host table was known to exist (created or adopted): a listing
        #: older than that cannot tell whether the table is gone
        self._since: dict[str, float] = {}
        self._tables: tuple[float, set[str]] | None = None  # (when listed, session ids)
        self._tables_lock = asyncio.Lock()

    async def _prepare(self) -> None:
        if not self._prepared:
            await asyncio.to_thread(links.prepare_host)
            self._prepared = True

    def _free_slot(self, skip: set[int]) -> int:
        used = {n.slot for n in self._nets.values()} | skip
        for slot in range(max_slots()):
            if slot not in used and not links.slot_taken(slot):
                return slot
        raise links.NetworkError("no free network slot on this host")

    async def setup(self, session_id: str, spec: NetworkSpec) -> Tap | None:
        """The VM's network, whole (None where the host builds none): ``prepare``, then
        ``wired``. For a boot, whose guest runs from its launch on."""
        tap = await self.prepare(session_id, spec)
        if tap is not None:
            try:
                await self.wired(session_id)
            except BaseException:
                tap.close()
                raise
        return tap

    async def prepare(self, session_id: str, spec: NetworkSpec) -> Tap | None:
        """What QEMU's launch needs (None where the host builds none): the namespace, the veth
        pair and the tap; the rest (addresses, rules, the DNS forwarder) is then built in the
        background, for ``wired`` to wait for before the guest may run. A restore launches QEMU
        meanwhile: the set-up took 18 ms before its launch, ~4 ms now."""
        if not self.enforced:
            return None
        self._specs[session_id] = spec
        tried: set[int] = set()
        try:
            while True:
                async with self._lock:  # this server hands out slots one at a time
                    await self._prepare()
                    net = VMNet(self.owner, session_id, self._free_slot(tried))
                    self._nets[session_id] = net
                try:
                    await _in_thread(links.create_pair, net)
                    break
                except links.NetworkError as exc:
                    # another server on the machine took the slot between look and create
                    tried.add(net.slot)
                    if "File exists" not in exc.message or len(tried) >= SLOT_TRIES:
                        raise
            tap = Tap(net, await _in_thread(links.open_tap, net, undo=os.close))
        except BaseException:
            await self.teardown(session_id)
            raise
        self._wiring[session_id] = asyncio.create_task(self._wire(net, spec),
                                                        name=f"wire {session_id}")
        return tap

    async def _wire(self, net: VMNet, spec: NetworkSpec) -> None:
        await asyncio.to_thread(links.wire, net, spec)
        self._since[net.session_id] = time.monotonic()
        await self._dns.start(net, spec.egress)

    async def wired(self, session_id: str) -> None:
        """Once the network ``prepare`` began is whole; raises what stopped it (the owner's
        ``teardown`` removes what was made)."""
        wiring = self._wiring.get(session_id)
        if wiring is not None:
            await asyncio.shield(wiring)  # a cancelled wait leaves it to the teardown
            self._wiring.pop(session_id, None)

    async def teardown(self, session_id: str) -> None:
        """Remove the VM's network (idempotent; after its QEMU is gone). A set-up still
        running in the background ends first, so that nothing it makes outlives this."""
        wiring = self._wiring.pop(session_id, None)
        if wiring is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(wiring)
        await self._dns.stop(session_id)
        net = self._nets.pop(session_id, None)
        self._specs.pop(session_id, None)
        self._since.pop(session_id, None)
        if self.enforced:
            await asyncio.to_thread(links.remove, net or VMNet(self.owner, session_id, 0))

    async def adopt(self, net: VMNet, spec: NetworkSpec) -> None:
        """A VM found again after a server restart: its namespace and tables are still there
        (the kernel kept them); its DNS forwarder runs again."""
        async with self._lock:
            await self._prepare()
            self._nets[net.session_id] = net
        self._specs[net.session_id] = spec
        self._since[net.session_id] = time.monotonic()
        await self._dns.start(net, spec.egress)

    async def remove_strays(self) -> int:
        """Namespaces and tables of ours that no VM of this host owns."""
        if not self.enforced:
            return 0
        spaces, tables = await asyncio.to_thread(links.ours, self.owner)
        strays = sorted({*spaces, *tables} - set(self._nets))
        for session_id in strays:
            log.warning("removing the network of %s: no VM owns it", session_id)
            await asyncio.to_thread(links.remove, VMNet(self.owner, session_id, 0))
        return len(strays)

    async def broken(self, session_id: str) -> str | None:
        """What is gone of the running VM's network, or None while it is whole (or the host
        built none). Without its namespace or veth pair the guest has no network; without its
        host table nothing enforces its policy; without its forwarder no name resolves."""
        net = self._nets.get(session_id)
        if net is None:
            return None
        if not (links.NETNS_DIR / net.netns).exists():
            return "the network namespace of the VM was removed"
        if not links.slot_taken(net.slot):
            return f"the host end ({net.host_if}) of the VM's network link was removed"
        if not self._dns.serving(session_id):
            return "the DNS forwarder of the VM's network stopped"
        tables = await self._host_tables(self._since.get(session_id, 0.0))
        if tables is not None and session_id not in tables:
            return f"the host's nftables table of the VM's network ({net.table}) was removed"
        return None

    async def _host_tables(self, newer_than: float) -> set[str] | None:
        """Session ids with a host table, from a listing at most ``TABLES_MAX_AGE_S`` old and
        made after ``newer_than``; None when ``nft`` cannot tell (no verdict then)."""
        async with self._tables_lock:
            now = time.monotonic()
            if self._tables is None or self._tables[0] < newer_than \
                    or now - self._tables[0] > TABLES_MAX_AGE_S:
                try:
                    listed = await asyncio.to_thread(links.host_tables, self.owner)
                except links.NetworkError as exc:
                    log.warning("health check: %s", exc.message)
                    return None
                self._tables = (now, set(listed))
            return self._tables[1]

    def port_address(self, session_id: str, port: int) -> tuple[str, int] | None:
        """Where the host reaches ``port`` of the guest; None when inbound is off."""
        net, spec = self._nets.get(session_id), self._specs.get(session_id)
        if net is None or spec is None or not spec.inbound:
            return None
        return (net.ns_ip, port)

    async def _allow(self, net: VMNet, addresses: list[str]) -> None:
        await asyncio.to_thread(links.apply, allow_elements(net, addresses))

    async def close(self) -> None:
        """Server stop: the VMs and their networks stay; the DNS forwarders stop (a restarted
        server starts them again)."""
        await self._dns.close()


__all__ = ["HostNetwork", "Tap", "VMNet"]

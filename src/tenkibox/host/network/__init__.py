"""The guest networks of this host: one namespace, tap device and rule set per VM.

``HostNetwork`` owns them from ``setup`` (before QEMU starts) to ``teardown`` (after it is
gone). What a VM may reach is its ``NetworkSpec``, enforced by nftables outside the guest
(``rules``); names resolve through the VM's own DNS forwarder (``dns``). A VM's slot and spec
are kept in its ``vm.json`` (``VMRecord.net``), so a restarted server finds its network again;
namespaces and tables that no live VM owns are removed at recovery. ``broken`` tells the host's
watcher when a part of a running VM's network is gone (its namespace, the host end of its veth
pair, its table on the host, its DNS forwarder): nothing is rebuilt under a running guest.

Where the host cannot do this (not root, no nftables), ``enforced`` is False: VMs get the
user-mode helper (``engine.net``), which keeps the host's loopback out of reach but enforces no
policy; the control plane refuses policies on such a host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

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

    async def setup(self, session_id: str, spec: NetworkSpec) -> VMNet | None:
        """The VM's network, ready for QEMU (None where the host builds none)."""
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
                    await asyncio.to_thread(links.create, net, spec)
                    self._since[session_id] = time.monotonic()
                    break
                except links.NetworkError as exc:
                    # another server on the machine took the slot between look and create
                    tried.add(net.slot)
                    if "File exists" not in exc.message or len(tried) >= SLOT_TRIES:
                        raise
            await self._dns.start(net, spec.egress)
        except BaseException:
            await self.teardown(session_id)
            raise
        return net

    async def teardown(self, session_id: str) -> None:
        """Remove the VM's network (idempotent; after its QEMU is gone)."""
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


__all__ = ["HostNetwork", "VMNet"]

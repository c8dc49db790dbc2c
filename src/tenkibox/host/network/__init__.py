"""The guest networks of this host: one namespace, tap device and rule set per VM.

``HostNetwork`` owns them from ``setup`` (before QEMU starts) to ``teardown`` (after it is
gone). What a VM may reach is its ``NetworkSpec``, enforced by nftables outside the guest
(``rules``); names resolve through the VM's own DNS forwarder (``dns``). A VM's slot and spec
are kept in its ``vm.json`` (``VMRecord.net``), so a restarted server finds its network again;
namespaces and tables that no live VM owns are removed at recovery.

Where the host cannot do this (not root, no nftables), ``enforced`` is False: VMs get the
user-mode helper (``engine.net``), which keeps the host's loopback out of reach but enforces no
policy; the control plane refuses policies on such a host.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..api import NetworkSpec
from . import links
from .addressing import VMNet, max_slots
from .dns import DnsProxy
from .rules import allow_elements

log = logging.getLogger(__name__)


#: attempts at a free slot when another server on the machine takes the same one meanwhile
SLOT_TRIES = 8


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
        if self.enforced:
            await asyncio.to_thread(links.remove, net or VMNet(self.owner, session_id, 0))

    async def adopt(self, net: VMNet, spec: NetworkSpec) -> None:
        """A VM found again after a server restart: its namespace and tables are still there
        (the kernel kept them); its DNS forwarder runs again."""
        async with self._lock:
            await self._prepare()
            self._nets[net.session_id] = net
        self._specs[net.session_id] = spec
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

    def intact(self, session_id: str) -> bool:
        """False when the VM's namespace is gone under it (its guest has no network left)."""
        net = self._nets.get(session_id)
        return net is None or (links.NETNS_DIR / net.netns).exists()

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

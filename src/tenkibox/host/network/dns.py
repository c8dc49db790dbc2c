"""Each guest's resolver: a small DNS forwarder on the host end of its veth pair.

The namespace sends the guest's queries to 10.0.2.3 here (one UDP socket and one TCP listener
per VM, on its own host-side address, so the address tells which VM asks). With outbound off
nothing resolves (REFUSED); with an allow-list, a name outside ``allow_domains`` does not exist
(NXDOMAIN) and the addresses of an allowed one are added to the VM's ``dns4`` set *before* the
answer goes back, so the guest's connection right after it passes; otherwise every query is
forwarded. Upstream: ``TENKI_DNS_UPSTREAM`` (``host[:port]``) or the host's first nameserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from ..api import EgressPolicy
from .addressing import VMNet

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT_S = 2.0
UPSTREAM_TRIES = 2
MAX_INFLIGHT = 64  # per VM: more queries at once are dropped (the guest retries)
MAX_TCP_CONNECTIONS = 16
TCP_IDLE_S = 10.0


def upstream() -> tuple[str, int]:
    forced = os.environ.get("TENKI_DNS_UPSTREAM", "").strip()
    if forced:
        host, _, port = forced.rpartition(":") if forced.count(":") == 1 else (forced, "", "")
        return (host or forced, int(port) if port else 53)
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return (parts[1], 53)
    return ("127.0.0.1", 53)


def name_allowed(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` (no final dot, any case) against exact names and ``*.suffix`` wildcards (a
    wildcard matches names below its suffix, not the suffix itself)."""
    name = name.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def addresses_in(answer: dns.message.Message) -> list[str]:
    return sorted({rd.address for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A
                   for rd in rrset})


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    out = dns.message.make_response(query)
    out.set_rcode(rcode)
    out.flags |= dns.flags.RA
    return out.to_wire()


Allow = Callable[[VMNet, list[str]], Awaitable[None]]


@dataclass
class _Resolver:
    net: VMNet
    policy: EgressPolicy
    allow: Allow
    upstream: tuple[str, int]
    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.Server | None = None
    inflight: int = 0
    connections: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if not self.policy.outbound or len(query.question) != 1:
            return _reply(query, dns.rcode.REFUSED)
        name = query.question[0].name.to_text(omit_final_dot=True)
        if self.policy.allow_listed and not name_allowed(name, self.policy.allow_domains):
            return _reply(query, dns.rcode.NXDOMAIN)
        raw = await (self._ask_tcp(wire) if tcp else self._ask_udp(wire))
        if raw is None:
            return _reply(query, dns.rcode.SERVFAIL)
        if self.policy.allow_domains:
            try:
                found = addresses_in(dns.message.from_wire(raw))
            except (dns.exception.DNSException, ValueError):
                return _reply(query, dns.rcode.SERVFAIL)
            if found:
                try:
                    await self.allow(self.net, found)
                except Exception as exc:
                    log.warning("%s: cannot allow %s: %s", self.net.session_id, found, exc)
                    return _reply(query, dns.rcode.SERVFAIL)
        return raw

    async def _ask_udp(self, wire: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        for _ in range(UPSTREAM_TRIES):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.upstream)
                await loop.sock_sendall(sock, wire)
                return await asyncio.wait_for(loop.sock_recv(sock, 65535), UPSTREAM_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue
            finally:
                sock.close()
        return None

    async def _ask_tcp(self, wire: bytes) -> bytes | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), UPSTREAM_TIMEOUT_S)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2),
                                                              UPSTREAM_TIMEOUT_S))[0]
            return await asyncio.wait_for(reader.readexactly(size), UPSTREAM_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return None
        finally:
            writer.close()

    # -- serving -------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.inflight >= MAX_INFLIGHT:
            return
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(self._udp(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _udp(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out = await self.answer(data, tcp=False)
            if out is not None and self.udp is not None:
                self.udp.sendto(out, addr)
        finally:
            self.inflight -= 1

    async def on_connection(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections > MAX_TCP_CONNECTIONS:
                return
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                wire = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]),
                                              TCP_IDLE_S)
                out = await self.answer(wire, tcp=True)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            self.connections -= 1
            writer.close()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        for task in self.tasks:
            task.cancel()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: _Resolver) -> None:
        self.resolver = resolver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.resolver.on_datagram(data, addr)


class DnsProxy:
    """The resolvers of this host's VMs (started with a VM's network, stopped with it)."""

    def __init__(self, allow: Allow) -> None:
        self._allow = allow
        self._resolvers: dict[str, _Resolver] = {}

    async def start(self, net: VMNet, policy: EgressPolicy) -> None:
        await self.stop(net.session_id)
        resolver = _Resolver(net, policy, self._allow, upstream())
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(resolver), local_addr=(net.host_ip, 53))
        resolver.udp = transport
        try:
            resolver.tcp = await asyncio.start_server(resolver.on_connection, net.host_ip, 53)
        except OSError:
            transport.close()
            raise
        self._resolvers[net.session_id] = resolver

    def serving(self, session_id: str) -> bool:
        """The VM's forwarder runs and its UDP socket and TCP listener are open."""
        r = self._resolvers.get(session_id)
        return (r is not None and r.udp is not None and not r.udp.is_closing()
                and r.tcp is not None and r.tcp.is_serving())

    async def stop(self, session_id: str) -> None:
        resolver = self._resolvers.pop(session_id, None)
        if resolver is not None:
            resolver.close()

    async def close(self) -> None:
        for session_id in list(self._resolvers):
            await self.stop(session_id)

"""The services of the network lab (``support.netlab``), run inside the lab's namespace.

- HTTP on port 8000 of every address given: answers ``svc <address>``.
- A line service on port 8100 of the first public address: answers ``ack <line>`` and appends
  ``<connection number> <line>`` to the log file (which connection carried what).
- A download service on port 8200 of the first public address: reads a byte count N (a line)
  and sends N bytes (for throughput measurements).
- DNS on port 53 of the private address: the names of ``ZONE``; anything else NXDOMAIN.

Usage: python netlab_services.py LOG PRIVATE PUBLIC_A PUBLIC_B
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import dns.message
import dns.rcode
import dns.rrset


def zone(private: str, a: str, b: str) -> dict[str, str]:
    return {"allowed.test.": a, "api.svc.test.": a, "deep.api.svc.test.": a,
            "svc.test.": b, "other.test.": b, "private.test.": private}


async def main(log: str, private: str, public_a: str, public_b: str) -> None:
    names = zone(private, public_a, public_b)
    counter = itertools.count(1)

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            local = writer.get_extra_info("sockname")[0]
            body = f"svc {local}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = next(counter)
        try:
            while line := await reader.readline():
                text = line.decode(errors="replace").strip()
                with open(log, "a") as f:
                    f.write(f"{number} {text}\n")
                writer.write(f"ack {text}\n".encode())
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = bytes(1 << 20)
        try:
            left = int((await reader.readline()).strip() or 0)
            while left > 0:
                writer.write(block[:min(left, len(block))])
                left -= len(block)
                await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        out = dns.message.make_response(query)
        name = query.question[0].name.to_text().lower()
        if name in names and query.question[0].rdtype == 1:
            out.answer.append(dns.rrset.from_text(name, 30, "IN", "A", names[name]))
        elif name not in names:
            out.set_rcode(dns.rcode.NXDOMAIN)
        return out.to_wire()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def datagram_received(self, data: bytes, addr):  # type: ignore[no-untyped-def]
            self.transport.sendto(answer(data), addr)

    async def dns_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            out = answer(await reader.readexactly(size))
            writer.write(len(out).to_bytes(2, "big") + out)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(http, addr, 8000)
               for addr in (private, public_a, public_b)]
    servers.append(await asyncio.start_server(lines, public_a, 8100))
    servers.append(await asyncio.start_server(download, public_a, 8200))
    servers.append(await asyncio.start_server(dns_tcp, private, 53))
    await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=(private, 53))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

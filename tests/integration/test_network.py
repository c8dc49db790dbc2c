"""Guest networks with real VMs (issue 14): what a guest can reach, under which policy, DNS
allow-lists, and clones that carry no connection of their source.

The reachable world is a lab the test builds (``support.netlab``): services in a network
namespace on a private address (10.77.0.2) and on public-looking documentation addresses
(203.0.113.2 and .3), and the lab's DNS server, which the server under test uses upstream.
Plus a listener on every address of the host itself. Each probe runs inside the guest and says
``open``, ``refused`` (a reset or ICMP error: fast) or ``timeout``; a refusal must never be a
timeout. Four sessions (restored from the golden snapshot) are shared by the whole module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.netlab import HOST_SIDE, PRIVATE, PUBLIC_A, PUBLIC_B, NetLab, host_address

from tenkibox import Client, errors
from tenkibox.config import home_tag
from tenkibox.host.api import EgressPolicy, NetworkSpec
from tenkibox.host.network import VMNet, links
from tenkibox.host.network.addressing import max_slots

#: the server under test resolves through the lab's DNS server
SERVER_ENV = {"TENKI_DNS_UPSTREAM": f"{PRIVATE}:53"}

PROBE = r'''
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    kind, _, rest = target.partition(":")
    try:
        if kind == "dns":
            out[target] = sorted({a[4][0] for a in socket.getaddrinfo(rest, 80, socket.AF_INET)})
            continue
        host, port = rest.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=8)
        if kind == "http":
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            out[target] = s.recv(4096).decode(errors="replace").split("\r\n\r\n", 1)[-1].strip()
        else:
            out[target] = "open"
        s.close()
    except socket.gaierror as exc:
        out[target] = "no-such-name" if exc.errno in (socket.EAI_NONAME, -5) else f"dns-error {exc}"
    except TimeoutError:
        out[target] = "timeout"
    except (ConnectionRefusedError, ConnectionResetError):
        out[target] = "refused"
    except OSError as exc:
        out[target] = f"refused ({exc.strerror})" if exc.errno in (101, 113) else f"error {exc}"
print(json.dumps(out))
'''


class HostListener:
    """A TCP listener on every address of the host (as a careless host service would be)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", autouse=True)
def lab() -> Iterator[NetLab]:
    lab = NetLab().open()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def host_listener() -> Iterator[HostListener]:
    listener = HostListener()
    try:
        yield listener
    finally:
        listener.close()


def _session(client: Client, **kw):  # type: ignore[no-untyped-def]
    s = client.create_and_wait(memory_mb=1024, timeout=300, **kw)
    s.files.write("/tmp/probe.py", PROBE.encode())
    return s


@pytest.fixture(scope="module")
def open_session(client: Client):  # type: ignore[no-untyped-def]
    s = _session(client, name="net-open", allow_inbound=True)
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def closed_session(client: Client):  # type: ignore[no-untyped-def]
    s = _session(client, name="net-closed", allow_outbound=False)
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def listed_session(client: Client):  # type: ignore[no-untyped-def]
    s = _session(client, name="net-listed", allow_domains=["allowed.test", "*.svc.test"],
                 allow_cidrs=[f"{PRIVATE}/32"])
    yield s
    s.terminate()


def probe(session, *targets: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    result = session.exec("python3", "/tmp/probe.py", *targets, timeout=120).check()
    return json.loads(result.stdout)


# -- nothing of the host, no other guest, no private range -------------------------------------
def test_open_session_reaches_public_services_only(open_session, host_listener) -> None:  # type: ignore[no-untyped-def]
    host = host_address()
    port = host_listener.port
    got = probe(open_session,
                f"http:{PUBLIC_A}:8000", f"http:{PUBLIC_B}:8000",  # public: open
                f"tcp:{PRIVATE}:8000",  # a private range
                f"tcp:{host}:{port}", f"tcp:{HOST_SIDE}:{port}",  # the host, two interfaces
                "tcp:10.201.0.1:" + str(port),  # the host end of (some) guest's own link
                "tcp:10.201.0.2:22", "tcp:10.201.0.6:22",  # guests' namespace addresses
                "tcp:10.0.2.2:22",  # its own gateway
                "tcp:169.254.169.254:80",  # link-local metadata
                "tcp:100.64.0.1:80", "tcp:192.168.1.1:80", "tcp:172.16.0.1:80")
    assert got.pop(f"http:{PUBLIC_A}:8000") == f"svc {PUBLIC_A}"
    assert got.pop(f"http:{PUBLIC_B}:8000") == f"svc {PUBLIC_B}"
    for target, outcome in got.items():
        assert str(outcome).startswith("refused"), (target, outcome)
    assert host_listener.accepted == 0


def test_open_session_resolves_names(open_session) -> None:  # type: ignore[no-untyped-def]
    got = probe(open_session, "dns:other.test", "dns:nothing.test", f"http:{PUBLIC_B}:8000")
    assert got == {"dns:other.test": [PUBLIC_B], "dns:nothing.test": "no-such-name",
                   f"http:{PUBLIC_B}:8000": f"svc {PUBLIC_B}"}


def test_guests_do_not_reach_each_other(open_session, closed_session, listed_session) -> None:  # type: ignore[no-untyped-def]
    # every guest is 10.0.2.15 on a link of its own; the other guests' namespaces are the
    # pool's /30s: none answers
    targets = [f"tcp:10.201.0.{4 * n + 2}:22" for n in range(4)]
    targets += [f"tcp:10.201.0.{4 * n + 1}:53" for n in range(4)]  # their DNS forwarders
    got = probe(open_session, *targets)
    own_dns = [t for t, o in got.items() if o == "open"]
    # only its own DNS forwarder answers (on the host end of its own link)
    assert len(own_dns) <= 1 and all(t.endswith(":53") for t in own_dns), got
    assert all(str(o).startswith("refused") for t, o in got.items() if t not in own_dns), got


# -- egress policies -------------------------------------------------------------------------------
def test_no_outbound_refuses_everything(closed_session, host_listener) -> None:  # type: ignore[no-untyped-def]
    assert closed_session.record.egress.outbound is False
    got = probe(closed_session, f"tcp:{PUBLIC_A}:8000", f"tcp:{PRIVATE}:8000",
                f"tcp:{host_address()}:{host_listener.port}", "dns:allowed.test")
    assert got.pop("dns:allowed.test") != [PUBLIC_A]
    assert all(str(o).startswith("refused") for o in got.values()), got


def test_allow_list_by_name_and_cidr(listed_session) -> None:  # type: ignore[no-untyped-def]
    egress = listed_session.record.egress
    assert egress.allow_domains == ["allowed.test", "*.svc.test"]
    assert egress.allow_cidrs == [f"{PRIVATE}/32"]
    # an allowed name's address is refused until the name was resolved...
    before = probe(listed_session, f"tcp:{PUBLIC_A}:8000")
    assert str(before[f"tcp:{PUBLIC_A}:8000"]).startswith("refused")
    got = probe(listed_session,
                "dns:allowed.test", "dns:api.svc.test", "dns:deep.api.svc.test",
                "dns:svc.test",  # the wildcard's own suffix is not below it
                "dns:other.test",  # not listed: does not exist for this guest
                f"http:{PUBLIC_A}:8000",  # ...and open after it
                f"http:{PRIVATE}:8000",  # private, but named by the CIDR
                f"tcp:{PUBLIC_B}:8000")  # public, but not listed
    assert got == {
        "dns:allowed.test": [PUBLIC_A], "dns:api.svc.test": [PUBLIC_A],
        "dns:deep.api.svc.test": [PUBLIC_A], "dns:svc.test": "no-such-name",
        "dns:other.test": "no-such-name", f"http:{PUBLIC_A}:8000": f"svc {PUBLIC_A}",
        f"http:{PRIVATE}:8000": f"svc {PRIVATE}", f"tcp:{PUBLIC_B}:8000": "refused",
    }


def test_a_resolver_is_reached_only_where_the_policy_allows(open_session,  # type: ignore[no-untyped-def]
                                                            listed_session) -> None:
    # the lab's DNS server (on a private address) answers every lab name: a guest may ask it
    # directly only when its policy names that address (here the listed session's CIDR); an
    # unlisted address is refused like any other, whatever listens on port 53 there
    assert probe(open_session, f"tcp:{PRIVATE}:53") == {f"tcp:{PRIVATE}:53": "refused"}
    assert probe(listed_session, f"tcp:{PRIVATE}:53", f"tcp:{PUBLIC_B}:53") == {
        f"tcp:{PRIVATE}:53": "open", f"tcp:{PUBLIC_B}:53": "refused"}


def _create(net: VMNet, spec: NetworkSpec) -> int:
    """A VM's whole network, as ``HostNetwork.setup`` builds it; the tap's descriptor (the tap
    lives while one is open)."""
    links.create_pair(net)
    fd = links.open_tap(net)
    links.wire(net, spec)
    return fd


def test_a_guest_namespace_has_its_sysctls_rules_and_links() -> None:
    # what the set-up (``links``: the pair, the tap, the wiring) leaves inside the namespace,
    # read back from the kernel: forwarding on and IPv6 off (set before the tap went up, so it
    # has no IPv6 address), the namespace's table, the tap with the gateway's addresses, the
    # route out through the host's end
    slot = next(n for n in range(max_slots()) if not links.slot_taken(n))
    net = VMNet("nstest000000", "ses_nssetup00000001", slot)
    tap_fd = _create(net, NetworkSpec(egress=EgressPolicy(outbound=False), inbound=True))
    try:
        def inside(*argv: str) -> str:
            return subprocess.run(["ip", "netns", "exec", net.netns, *argv], check=True,
                                  capture_output=True, text=True).stdout

        assert inside("cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                      "/proc/sys/net/ipv6/conf/default/disable_ipv6",
                      "/proc/sys/net/ipv4/ip_forward").split() == ["1", "1", "1"]
        tap = json.loads(inside("ip", "-j", "addr", "show", "dev", "tap0"))[0]
        assert sorted((a["family"], a["local"]) for a in tap["addr_info"]) == [
            ("inet", "10.0.2.2"), ("inet", "10.0.2.3")]
        table = inside("nft", "list", "table", "ip", "tenki")
        assert "masquerade" in table and "dnat to 10.0.2.15" in table  # inbound: to the guest
        assert inside("ip", "route", "show", "default").startswith(f"default via {net.host_ip}")
    finally:
        os.close(tap_fd)
        links.remove(net)
    assert not (links.NETNS_DIR / net.netns).exists()


def test_a_network_left_by_a_gone_server_does_not_bind_a_new_guest(client: Client) -> None:
    # a server killed with its VMs, whose data directory (and so its namespaces) was then
    # removed, leaves its host tables behind; the next VM on this machine given the same
    # interface must be governed by its own policy only
    slot = next(n for n in range(max_slots()) if not links.slot_taken(n))
    gone = VMNet("gonehome0000", "ses_leftbehind00001", slot)
    os.close(_create(gone, NetworkSpec(egress=EgressPolicy(outbound=False))))
    subprocess.run(["ip", "netns", "delete", gone.netns], check=True)
    try:
        s = _session(client, name="net-after-leftover", allow_cidrs=[f"{PRIVATE}/32"])
        try:
            assert probe(s, f"http:{PRIVATE}:8000") == {f"http:{PRIVATE}:8000": f"svc {PRIVATE}"}
        finally:
            s.terminate()
    finally:
        links.remove(gone)


# -- clones ------------------------------------------------------------------------------------
def test_a_clone_carries_no_connection_and_has_its_own_policy(client: Client, open_session,  # type: ignore[no-untyped-def]
                                                              lab) -> None:
    s = open_session
    # a connection held open by a guest process across the snapshot
    s.files.write("/tmp/hold.py", HOLD.encode())
    s.exec("sh", "-c", f"nohup python3 /tmp/hold.py {PUBLIC_A} >/tmp/hold.out 2>&1 &").check()
    s.shell("for i in $(seq 100); do grep -q first /tmp/hold.out && break; sleep 0.1; done",
            timeout=60).check()
    _serve_in_guest(s, 8090, "source")
    exposed = s.expose_port(8090)
    snap = s.snapshot(timeout=600)
    clone = client.create_and_wait(snapshot_id=snap.id, allow_outbound=False, timeout=300)
    try:
        # exposures are the source's alone
        assert clone.list_ports() == []
        assert _get(exposed.url) == (200, "source\n")
        s.unexpose_port(8090)
        assert clone.record.egress.outbound is False
        assert s.record.egress.outbound is True
        # the clone's copy of the connection is dead: its next line is answered by a reset
        clone.shell("touch /tmp/go; for i in $(seq 100); do grep -q done /tmp/hold.out && "
                    "break; sleep 0.1; done", timeout=60).check()
        clone_out = clone.shell("cat /tmp/hold.out", timeout=30).check().stdout
        assert "ack second" not in clone_out and "error" in clone_out, clone_out
        # the source's connection goes on
        s.shell("touch /tmp/go; for i in $(seq 100); do grep -q done /tmp/hold.out && "
                "break; sleep 0.1; done", timeout=60).check()
        assert "ack second" in s.shell("cat /tmp/hold.out", timeout=30).check().stdout
        # the service saw one connection, and the second line only from the source
        assert [text for _, text in lab.lines()] == ["first", "second"]
        assert len({number for number, _ in lab.lines()}) == 1
        # the clone's own policy: nothing goes out
        got = probe(clone, f"tcp:{PUBLIC_A}:8000")
        assert str(got[f"tcp:{PUBLIC_A}:8000"]).startswith("refused")
    finally:
        clone.terminate()
        client.delete_snapshot(snap.id)


HOLD = r'''
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 8100), timeout=10)
s.sendall(b"first\n"); print(s.recv(100).decode().strip(), "first", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
try:
    s.settimeout(10)
    s.sendall(b"second\n")
    data = s.recv(100)
    print(data.decode().strip() or "error: closed", flush=True)
except OSError as exc:
    print("error", type(exc).__name__, flush=True)
print("done", flush=True)
'''


# -- exposed ports ---------------------------------------------------------------------------------
def _get(url: str, **headers: str) -> tuple[int, str]:
    """(status, body) of a GET; (0, reason) when nothing answers."""
    try:
        resp = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    return resp.status_code, resp.text


def _serve_in_guest(session, port: int, text: str) -> None:  # type: ignore[no-untyped-def]
    session.shell(f"mkdir -p /tmp/www{port} && echo {text} > /tmp/www{port}/index.html && "
                  f"cd /tmp/www{port} && (nohup python3 -m http.server {port} "
                  f">/dev/null 2>&1 &) && for i in $(seq 100); do "
                  f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'"
                  " 2>/dev/null && break; sleep 0.1; done", timeout=60).check()


def test_exposed_port_needs_its_token_or_the_key(open_session, closed_session,  # type: ignore[no-untyped-def]
                                                 tenki_server) -> None:
    from support.server import ADMIN_KEY

    _serve_in_guest(open_session, 8080, "hello-from-the-guest")
    exposed = open_session.expose_port(8080)
    assert exposed.port == 8080 and "tenki_token=" in exposed.url
    assert _get(exposed.url) == (200, "hello-from-the-guest\n")
    bare = exposed.url.split("?", 1)[0]
    status, _ = _get(bare)
    assert status == 401
    assert _get(bare.replace("/?", "/"), Authorization=f"Bearer {ADMIN_KEY}")[0] == 200
    assert _get(exposed.url.replace("tenki_token=", "tenki_token=x"))[0] == 401
    assert [p.port for p in open_session.list_ports()] == [8080]
    # a session created without inbound cannot expose anything
    with pytest.raises(errors.ConflictError, match="inbound access is disabled"):
        closed_session.expose_port(8080)
    # unexpose: the URL stops working at once
    open_session.unexpose_port(8080)
    assert _get(exposed.url)[0] in (0, 404)
    assert open_session.list_ports() == []


def test_an_exposed_port_expires(open_session) -> None:  # type: ignore[no-untyped-def]
    _serve_in_guest(open_session, 8081, "short-lived")
    exposed = open_session.expose_port(8081, ttl=3)
    assert _get(exposed.url) == (200, "short-lived\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _get(exposed.url)[0] == 200:
        time.sleep(0.5)
    assert _get(exposed.url)[0] in (0, 404)


def test_networks_survive_a_server_restart_and_strays_are_removed(open_session, listed_session,  # type: ignore[no-untyped-def]
                                                                   tenki_server) -> None:
    _serve_in_guest(open_session, 8083, "across-restart")
    exposed = open_session.expose_port(8083)
    # what a server killed in the middle of building a network would leave behind
    tag = home_tag(tenki_server.home)
    stray = f"{tag}-ses_straynetwork0001"
    stray_table = f"tenki_{tag}_ses_straynetwork0001"
    subprocess.run(["ip", "netns", "add", f"tenki-{stray}"], check=True)
    subprocess.run(["nft", "-f", "-"], input=f"table ip {stray_table} {{}}\n", text=True,
                   check=True)
    tenki_server.kill9()
    tenki_server.start()
    assert not Path(f"/run/netns/tenki-{stray}").exists()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert stray_table not in tables
    # the VMs' networks are still there, their DNS forwarders run again, the URL works
    assert probe(listed_session, "dns:allowed.test", f"tcp:{PUBLIC_B}:8000") == {
        "dns:allowed.test": [PUBLIC_A], f"tcp:{PUBLIC_B}:8000": "refused"}
    assert probe(open_session, f"http:{PUBLIC_B}:8000") == {
        f"http:{PUBLIC_B}:8000": f"svc {PUBLIC_B}"}
    assert _get(exposed.url) == (200, "across-restart\n")
    open_session.unexpose_port(8083)


def test_pause_closes_exposed_ports_and_resume_does_not_reopen_them(open_session) -> None:  # type: ignore[no-untyped-def]
    # the module's last test: the open session is paused and resumed here
    _serve_in_guest(open_session, 8082, "before-pause")
    exposed = open_session.expose_port(8082)
    assert _get(exposed.url) == (200, "before-pause\n")
    open_session.pause(timeout=600)
    assert _get(exposed.url)[0] in (0, 404)
    open_session.resume(timeout=300)
    assert open_session.list_ports() == []
    assert _get(exposed.url)[0] in (0, 404)
    # exposed again, the guest's server (resumed with it) answers
    assert _get(open_session.expose_port(8082).url) == (200, "before-pause\n")

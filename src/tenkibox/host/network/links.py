"""Creating and removing a VM's namespace, veth pair, tap device and tables (iproute2, nft).

In two parts, so that a restore builds most of it while QEMU starts: ``create_pair`` and
``open_tap`` make what QEMU's launch needs (the namespace it runs in, the tap it is handed),
``wire`` the addresses and rules, which must hold before the guest runs. Every step but the tap
is a command of Debian's iproute2 or nftables, run as root; a failing command raises
``NetworkError`` carrying the command and what it printed. ``remove`` is idempotent and never
raises: deleting the namespace takes the veth pair and the namespace's table with it (the tap
goes with its last descriptor: QEMU's); the host's table of the VM goes separately.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import logging
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

from ...errors import InternalError
from ..api import NetworkSpec
from .addressing import DNS, GATEWAY, GATEWAY_MAC, GUEST_PREFIX, TAP, VMNet, pool
from .rules import namespace_table, shared_table, vm_table

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")
TOOLS = ("ip", "nft", "nsenter")
# <linux/sched.h>, <linux/if_tun.h>
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class NetworkError(InternalError):
    """A network command failed (the command and its output are in the message)."""


def _run(argv: list[str], stdin: str | None = None, what: str | None = None) -> str:
    """``argv``'s output; ``what`` names it in errors instead of the whole command line."""
    name = what or " ".join(argv)
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{name}: {exc}") from exc
    if done.returncode != 0:
        raise NetworkError(f"{name} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def why_unavailable() -> str | None:
    """None when this host can build guest networks (root, the tools, /dev/net/tun)."""
    if os.geteuid() != 0:
        return "not running as root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    try:
        _run(["nft", "list", "tables"])
    except NetworkError as exc:
        return exc.message
    return None


def prepare_host() -> None:
    """Forwarding on, and the shared table (idempotent; at every host start)."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    _run(["nft", "-f", "-"], shared_table(str(pool())))


def create_pair(net: VMNet) -> None:
    """The VM's namespace and its veth pair, down: what QEMU needs to start in the namespace,
    and what claims the slot (``link add`` fails with "File exists" when another server on the
    machine took the same slot meanwhile). Nothing passes yet: ``wire`` does the rest."""
    pair_batch = "\n".join([
        f"netns add {net.netns}",
        f"link add {net.host_if} type veth peer name {net.ns_if} netns {net.netns}",
    ]) + "\n"
    try:
        _run(["ip", "-batch", "-"], pair_batch)
    except NetworkError:
        remove(net)
        raise


def open_tap(net: VMNet) -> int:
    """A tap device ``tap0`` inside the namespace, created by opening it: the descriptor is
    handed to QEMU (``-netdev tap,fd=``), and the device goes when the last descriptor on it
    closes. Made from a thread of its own that enters the namespace and ends: a thread's
    network namespace is its own, and no other thread of the server ever runs in it. This is
    ~0.3 ms, where ``ip tuntap add`` in the namespace is a process (~3 ms) and moving a device
    into a namespace waits for an RCU grace period (~15 ms)."""
    done: list[int | BaseException] = []

    def enter_and_open() -> None:
        try:
            ns = os.open(NETNS_DIR / net.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(ns, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno))
            finally:
                os.close(ns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                # no IFF_VNET_HDR: the guest sees the same device features as with passt
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TAP.encode(), IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            done.append(fd)
        except BaseException as exc:  # handed to the caller's thread
            done.append(exc)

    worker = threading.Thread(target=enter_and_open, name=f"tap {net.session_id}")
    worker.start()
    worker.join()
    got = done[0] if done else RuntimeError("the thread opening the tap ended without a word")
    if isinstance(got, BaseException):
        raise NetworkError(f"cannot create the tap device in namespace {net.netns}: {got}") \
            from got
    return got


def wire(net: VMNet, spec: NetworkSpec) -> None:
    """The rest of the VM's network, around the tap ``open_tap`` made: the host's table, the
    pair's addresses, the namespace's sysctls, table and links. The host's table names the
    host end by its index (so a table some gone server left for the same interface name never
    applies to this one), and only then the link goes up: no packet passes before the VM's
    rules hold. A failure leaves the parts made so far to ``remove``."""
    ns = net.netns
    up_batch = "\n".join([
        f"addr add {net.host_ip}/30 dev {net.host_if}",
        f"link set {net.host_if} up",
    ]) + "\n"
    ns_batch = "\n".join([
        "link set lo up",
        f"addr add {net.ns_ip}/30 dev {net.ns_if}",
        f"link set {net.ns_if} up",
        f"link set {TAP} address {GATEWAY_MAC}",
        f"addr add {GATEWAY}/{GUEST_PREFIX} dev {TAP}",
        f"addr add {DNS}/32 dev {TAP}",
        f"link set {TAP} up",
        f"route add default via {net.host_ip}",
    ]) + "\n"
    # Inside the namespace, one process (a restore waits for each one started; ~4 ms here):
    # the sysctls, before the tap goes up, so that it never gets an IPv6 address (``all``
    # applies to the devices that exist, ``default`` to those made later); the namespace's
    # table, which names interfaces, so it holds before they are up; then the links
    # (``ip -batch`` reads the shell's input). /proc/sys/net is the namespace's for a process
    # in it.
    ns_script = "\n".join([
        "set -e",
        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "nft -f - <<'TENKI_TABLE'",
        namespace_table(net, spec.inbound) + "TENKI_TABLE",
        "exec ip -batch -",
    ]) + "\n"
    _run(["nft", "-f", "-"], vm_table(net, spec.egress))
    _run(["ip", "-batch", "-"], up_batch)
    _run(["nsenter", f"--net={NETNS_DIR / ns}", "--", "sh", "-c", ns_script], ns_batch,
         what=f"the set-up inside namespace {ns} (sysctls, nft, ip)")


def remove(net: VMNet) -> None:
    """The VM's namespace and host table (both named by owner and session: any slot will do)."""
    for argv in (["ip", "netns", "delete", net.netns],
                 ["nft", "delete", "table", "ip", net.table]):
        try:
            _run(argv)
        except NetworkError as exc:
            if "No such file" not in exc.message and "not exist" not in exc.message.lower():
                log.warning("%s", exc.message)


def apply(script: str) -> None:
    _run(["nft", "-f", "-"], script)


def host_tables(owner: str) -> list[str]:
    """Session ids that have a host table of ``owner`` here (raises ``NetworkError``)."""
    tables: list[str] = []
    for line in _run(["nft", "list", "tables", "ip"]).splitlines():
        name = line.split()[-1] if line.strip() else ""
        if name.startswith(f"tenki_{owner}_"):
            tables.append(name.removeprefix(f"tenki_{owner}_"))
    return tables


def ours(owner: str) -> tuple[list[str], list[str]]:
    """Session ids that have a namespace of ``owner`` here, and those that have a host table."""
    prefix = f"tenki-{owner}-"
    spaces = [p.name.removeprefix(prefix) for p in NETNS_DIR.glob(f"{prefix}*")] \
        if NETNS_DIR.exists() else []
    try:
        tables = host_tables(owner)
    except NetworkError as exc:
        log.warning("%s", exc.message)
        tables = []
    return spaces, tables


def slot_taken(slot: int) -> bool:
    """Whether the machine has the host-side interface of ``slot`` (any server's)."""
    return (SYS_NET / f"tkh{slot}").exists()


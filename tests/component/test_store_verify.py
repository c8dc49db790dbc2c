"""``tenki admin verify [--repair]`` and the scrub behind it, through the real app, control plane
and CLI over the fake host: what is checked (snapshots, images, live sessions' VMs), what repair
does to RAM caches and unowned files, and what the report and the CLI say about each."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.fake_host import FakeHost, image_digest
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.host.api import Manifest
from tenkibox.models import SessionState, SnapshotState
from tenkibox.store.tables import SnapshotRow

Run = Callable[..., Result]


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url, api_key=inproc.api_key) as c:
        yield c


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), obj=CliState())

    return invoke


def manifest_of(inproc: InProcessServer, snapshot_id: str) -> Manifest:
    return Manifest.from_json(inproc.plane.records.get(SnapshotRow, snapshot_id).files)


def test_a_damaged_image_is_named_with_the_snapshots_and_sessions_that_use_it(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    snap = s.snapshot("x")
    disk = image_digest("sandbox")
    fake_host.corrupt.add(disk)
    report = client.verify_store(repair=False)
    problem = f"disk {disk[:12]} does not match its digest"
    assert not report.ok and report.bad_artifacts == {disk: problem}
    assert [(d.image_id, d.problems) for d in report.damaged_images] == [("sandbox", [problem])]
    assert [(d.session_id, d.problems) for d in report.damaged_sessions] == [
        (s.id, [f"disk layer 0: {problem}"])]
    assert [(d.snapshot_id, d.problems) for d in report.damaged] == [(snap.id, [problem])]
    assert client.get_snapshot(snap.id).state == SnapshotState.READY
    # repair fails the snapshot (no restore of it can succeed); the running session and the
    # image are only reported: a capture refuses the one, a boot the other
    report = client.verify_store(repair=True)
    assert client.get_snapshot(snap.id).state == SnapshotState.FAILED
    assert client.get(s.id).state == SessionState.READY
    assert [d.image_id for d in report.damaged_images] == ["sandbox"]
    assert [d.session_id for d in report.damaged_sessions] == [s.id]


def test_the_layers_of_a_live_session_are_checked_once_no_snapshot_names_them(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    src = client.create_and_wait()
    snap = src.snapshot("lower")
    layers = manifest_of(inproc, snap.id).layers
    clone = client.create_and_wait(snapshot_id=snap.id)
    src.terminate()
    client.delete_snapshot(snap.id)
    eventually(lambda: client.get_snapshot(snap.id).state == SnapshotState.DELETED,
               what="DELETED")
    assert client.verify_store().ok
    fake_host.corrupt.add(layers[-1])
    report = client.verify_store()
    assert not report.ok and report.damaged == [] and report.damaged_images == []
    assert [(d.session_id, d.problems) for d in report.damaged_sessions] == [
        (clone.id, [f"disk layer 1 {layers[-1][:12]} does not match its digest"])]


def test_damaged_ram_caches_are_rebuilt_only_by_repair(run: Run, fake_host: FakeHost) -> None:
    cache = "ab" * 32
    fake_host.damaged_caches.add(cache)
    found = run("admin", "verify")
    assert found.exit_code == 1, found.output
    assert f"RAM cache {cache[:12]} does not match its RAM image" in found.stdout
    assert "rebuilt" not in found.stdout
    report = json.loads(run("admin", "verify", "--json").stdout)
    assert report["damaged_caches"] == {cache: f"RAM cache {cache[:12]} does not match its "
                                        "RAM image"}
    assert report["rebuilt"] == [] and report["ok"] is False
    repaired = run("admin", "verify", "--repair", "--json")
    assert repaired.exit_code == 1  # something was wrong
    report = json.loads(repaired.stdout)
    assert report["rebuilt"] == [cache] and report["damaged_caches"] == {}
    after = run("admin", "verify")
    assert after.exit_code == 0 and "all intact" in after.stdout


def test_repair_removes_only_what_no_one_can_claim_and_says_so(
        run: Run, client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    orphan, busy, live = "ses_orphan", "ses_busy", s.id
    fake_host.orphan_vms.update({orphan, busy, live})
    fake_host.busy_vms.add(busy)
    found = run("admin", "verify")
    assert found.exit_code == 1 and "(removed)" not in found.stdout
    repaired = run("admin", "verify", "--repair")
    assert repaired.exit_code == 1
    lines = repaired.stdout.splitlines()
    assert f"unowned vm: {orphan} (removed)" in lines
    assert f"unowned vm: {busy}" in lines and f"unowned vm: {live}" in lines
    report = client.verify_store(repair=True)
    assert sorted(u.name for u in report.unowned) == sorted([busy, live])
    assert report.removed == []
    assert fake_host.orphan_vms == {busy, live}

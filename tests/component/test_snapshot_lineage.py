"""A lineage of snapshots over the fake host: each capture of a session after the first (or of
a session restored from a snapshot) references its parent's RAM images by digest; what each
snapshot would free (``unique_bytes``) follows from the records alone, changes as neighbours
are deleted, and deleting a snapshot in the middle never takes what the others need."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.host.api import Manifest
from tenkibox.models import SnapshotState
from tenkibox.store.tables import SnapshotRow

MiB = 1 << 20
RAM0, DELTA = FakeHost.full_ram_stored, FakeHost.delta_ram_stored
STATE, LAYER = FakeHost.state_stored, FakeHost.layer_stored


def manifest_of(inproc: InProcessServer, snapshot_id: str) -> Manifest:
    return Manifest.from_json(inproc.plane.records.get(SnapshotRow, snapshot_id).files)


def uniques(client: Client, ids: list[str]) -> list[int]:
    return [client.get_snapshot(i).unique_bytes for i in ids]


def delete(client: Client, inproc: InProcessServer, fake_host: FakeHost, sid: str) -> None:
    client.delete_snapshot(sid)
    eventually(lambda: client.get_snapshot(sid).state == SnapshotState.DELETED, what="DELETED")
    fake_host.age_artifacts()
    inproc.run(inproc.plane.snapshots.collect_garbage())


def test_a_lineage_shares_by_digest_and_unique_bytes_follow_deletes(
        client: Client, inproc: InProcessServer, fake_host: FakeHost, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = client.create_and_wait()
    ids = [s.snapshot(f"gen{i}").id for i in range(1, 6)]
    ms = [manifest_of(inproc, i) for i in ids]
    # each RAM chain is its parent's plus one delta
    assert [len(m.rams) for m in ms] == [1, 2, 3, 4, 5]
    for parent, child in itertools.pairwise(ms):
        assert child.rams[:-1] == parent.rams and child.ram == child.rams[-1]
    assert ms[0].stored[ms[0].ram] == RAM0 and ms[1].stored[ms[1].ram] == DELTA
    # the session runs on every frozen layer; each RAM image but the last is a child's too
    assert uniques(client, ids) == [STATE] * 4 + [DELTA + STATE]
    # the list answers the same numbers
    assert [x.unique_bytes for x in client.list_snapshots()] == uniques(client, ids)

    delete(client, inproc, fake_host, ids[2])  # the middle one
    assert ms[2].ram in fake_host.artifacts  # its RAM image: the children's chains name it
    assert ms[2].state not in fake_host.artifacts  # its own device state is freed
    kept = [ids[0], ids[1], ids[3], ids[4]]
    assert uniques(client, kept) == [STATE, STATE, STATE, DELTA + STATE]
    for sid in kept:  # every other snapshot restores: all it names is stored
        assert set(manifest_of(inproc, sid).digests()) <= set(fake_host.artifacts)
        r = client.restore_snapshot(sid)
        r.wait_ready(5)
        r.terminate()

    s.terminate()  # no session holds the layers any more
    eventually(lambda: uniques(client, kept)[-1] == DELTA + STATE + LAYER, what="unique")
    delete(client, inproc, fake_host, ids[4])
    # now the fourth alone names its RAM delta, the deleted third's delta and layer, its own
    assert uniques(client, [ids[3]]) == [DELTA + STATE + LAYER + DELTA + LAYER]
    assert uniques(client, [ids[0], ids[1]]) == [STATE, STATE]

    # the CLI says it too
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)
    out = CliRunner().invoke(cli, ["sandbox", "snapshot", "get", ids[3], "--json"], obj=CliState())
    assert out.exit_code == 0, out.output
    assert f'"unique_bytes": {DELTA + STATE + LAYER + DELTA + LAYER}' in out.output


def test_a_snapshot_of_a_restored_session_is_a_delta_over_its_source(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    first = s.snapshot("one")
    r = client.restore_snapshot(first.id)
    r.wait_ready(5)
    child = r.snapshot("child")
    m1, m2 = manifest_of(inproc, first.id), manifest_of(inproc, child.id)
    assert m2.rams == [*m1.rams, m2.ram] and m2.stored[m2.ram] == DELTA
    s.terminate()
    delete(client, inproc, fake_host, first.id)
    assert m1.ram in fake_host.artifacts  # the child's chain keeps it
    r.terminate()
    assert client.restore_snapshot(child.id).wait_ready(5).state.value in ("READY", "RUNNING")

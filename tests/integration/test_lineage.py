"""Incremental lineages with real VMs under TCG (issue 13 goal 4).

One booted session (golden snapshots off: its first snapshot is a full one), five snapshots with
~10 MiB written in the guest between them: each later snapshot stores only what changed (a
delta RAM image over its parent's, the new disk layer) and references the rest by digest;
``unique_bytes`` says what deleting each would free. Deleting the middle one breaks none of the
others: every remaining one restores with exactly the files written before it. A session
restored from a snapshot continues the lineage (its snapshot is a delta over its source).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time

import pytest

from tenkibox import Client

# plain creates boot (a golden snapshot would make the first capture a delta already)
SERVER_ENV = {"TENKI_GOLDEN": "off"}
MiB = 1 << 20
GENERATIONS = 5


def _sh(session, cmd: str) -> str:  # type: ignore[no-untyped-def]
    return session.shell(cmd, timeout=120).check().stdout.strip()


def _manifest(tenki_server, snapshot_id: str) -> dict:  # type: ignore[no-untyped-def]
    with sqlite3.connect(tenki_server.home / "tenki.db") as db:
        row = db.execute("SELECT files FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    return json.loads(row[0])


def _stored(tenki_server, digest: str):  # type: ignore[no-untyped-def]
    return tenki_server.home / "artifacts" / "sha256" / digest


@pytest.fixture(scope="module")
def lineage(client: Client, tenki_server):  # type: ignore[no-untyped-def]
    """(session, [snapshot 1..5], {generation: md5 of /root/f<generation>})."""
    s = client.create_and_wait(name="lineage", memory_mb=512, timeout=300)
    snaps, md5 = [], {}
    try:
        for gen in range(1, GENERATIONS + 1):
            if gen > 1:  # a small change: 10 MiB of new data, in the page cache and on disk
                # (64 KiB blocks: dd's buffer, freed but not zeroed, is new random RAM too)
                _sh(s, f"dd if=/dev/urandom of=/root/f{gen} bs=64k count=160 status=none && "
                       "sync")
                md5[gen] = _sh(s, f"md5sum /root/f{gen}").split()[0]
            snaps.append(client.create_snapshot_and_wait(s.id, f"gen{gen}", timeout=300))
        yield s, snaps, md5
    finally:
        s.terminate()


def test_later_snapshots_store_only_what_changed(tenki_server, lineage) -> None:
    _, snaps, _ = lineage
    ms = [_manifest(tenki_server, x.id) for x in snaps]
    # each RAM chain is its parent's and one delta image
    assert [len(m["ram_chain"]) for m in ms] == list(range(1, GENERATIONS + 1))
    for parent, child in itertools.pairwise(ms):
        assert child["ram_chain"][:-1] == parent["ram_chain"]
        assert child["layers"][:-1] == parent["layers"]  # and the disk chain one layer
    first = snaps[0].compressed_bytes
    ram_first = ms[0]["stored"][ms[0]["ram"]]
    report = []
    for x, m in zip(snaps[1:], ms[1:], strict=False):
        ram = m["stored"][m["ram"]]
        layer = m["stored"][m["layers"][-1]]
        report.append(f"{x.name}: stored {x.compressed_bytes / MiB:.1f} MiB "
                      f"({x.compressed_bytes / first:.3f}x of {first / MiB:.1f} MiB): RAM delta "
                      f"{ram / MiB:.1f} MiB ({ram / ram_first:.3f}x of {ram_first / MiB:.1f}), "
                      f"new disk layer {layer / MiB:.1f} MiB")
        # the change is 10 MiB of random (incompressible) data, once in the guest's page cache
        # (the RAM delta) and once in the new disk layer: 0.05x of the first snapshot cannot
        # hold that. What the RAM delta holds beyond it (the guest's own churn, chunks it did
        # not share with its parent) is at most 0.05x of the first RAM image; the whole
        # snapshot's overhead beyond the 2 x 10 MiB (device state ~0.7 MiB, the qcow2 layer's
        # clusters and metadata ~2 MiB) at most 0.15x of the first snapshot
        assert ram - 10 * MiB <= 0.05 * ram_first, report[-1]
        assert x.compressed_bytes - 2 * 10 * MiB <= 0.15 * first, report[-1]
    report.append(f"first: size {snaps[0].size_bytes / MiB:.1f} MiB, stored {first / MiB:.1f} "
                  f"MiB (RAM image {ram_first / MiB:.1f} MiB)")
    print("\n".join(report))


def test_unique_bytes_of_each(client: Client, tenki_server, lineage) -> None:
    s, snaps, _ = lineage
    got = [client.get_snapshot(x.id) for x in snaps]
    ms = [_manifest(tenki_server, x.id) for x in snaps]
    # the running session holds every disk layer; each RAM image but the last is a child's
    # too: what deleting one would free is its device state (the last: and its RAM delta)
    for g, m in zip(got[:-1], ms[:-1], strict=False):
        assert g.unique_bytes == m["stored"][m["state"]], g
    last = ms[-1]
    assert got[-1].unique_bytes == last["stored"][last["state"]] + last["stored"][last["ram"]]
    listed = {x.id: x.unique_bytes for x in client.list_snapshots(session_id=s.id)}
    assert [listed[g.id] for g in got] == [g.unique_bytes for g in got]
    print("unique_bytes:", [g.unique_bytes for g in got])


def _check_restore(client: Client, snapshot_id: str, gen: int, md5: dict[int, str]) -> None:
    r = client.create_and_wait(snapshot_id=snapshot_id, name=f"from-gen{gen}", timeout=300)
    try:
        present = _sh(r, "ls /root").split()
        for g in range(2, GENERATIONS + 1):
            if g <= gen:
                assert _sh(r, f"md5sum /root/f{g}").split()[0] == md5[g], (gen, g)
            else:
                assert f"f{g}" not in present, (gen, present)
    finally:
        r.terminate()


def test_deleting_the_middle_one_breaks_none_of_the_others(
        client: Client, tenki_server, lineage) -> None:
    _, snaps, md5 = lineage
    middle = snaps[2]
    m3 = _manifest(tenki_server, middle.id)
    client.delete_snapshot(middle.id)
    deadline = time.monotonic() + 120
    # the collector ran: the deleted snapshot's own device state is freed ...
    while _stored(tenki_server, m3["state"]).exists() or \
            client.get_snapshot(middle.id).state.value != "DELETED":
        assert time.monotonic() < deadline, "the middle snapshot's state was never collected"
        time.sleep(0.5)
    # ... but its RAM image stays: the children's chains name it
    assert _stored(tenki_server, m3["ram"]).exists()
    for gen, x in enumerate(snaps, 1):
        if x.id != middle.id:
            _check_restore(client, x.id, gen, md5)


def test_a_restored_session_continues_the_lineage(client: Client, tenki_server,
                                                  lineage) -> None:
    _, snaps, md5 = lineage
    source = snaps[1]  # generation 2
    r = client.create_and_wait(snapshot_id=source.id, name="branch", timeout=300)
    try:
        _sh(r, "dd if=/dev/urandom of=/root/branch bs=64k count=160 status=none && sync")
        branch_md5 = _sh(r, "md5sum /root/branch").split()[0]
        child = client.create_snapshot_and_wait(r.id, "branch", timeout=300)
    finally:
        r.terminate()
    m2, mc = _manifest(tenki_server, source.id), _manifest(tenki_server, child.id)
    assert mc["ram_chain"] == [*m2["ram_chain"], mc["ram"]]
    ram, ram_first = mc["stored"][mc["ram"]], _manifest(tenki_server, snaps[0].id)["stored"][
        _manifest(tenki_server, snaps[0].id)["ram"]]
    print(f"branch: stored {child.compressed_bytes / MiB:.1f} MiB, RAM delta {ram / MiB:.1f} MiB"
          f" ({ram / ram_first:.3f}x of the first full RAM image)")
    assert ram <= 10 * MiB + 0.05 * ram_first
    c = client.create_and_wait(snapshot_id=child.id, name="from-branch", timeout=300)
    try:
        assert _sh(c, "md5sum /root/f2 /root/branch").split()[::2] == [md5[2], branch_md5]
        assert "f3" not in _sh(c, "ls /root").split()
    finally:
        c.terminate()


def test_a_snapshot_after_a_tiny_change_stores_little(client: Client, tenki_server,
                                                      lineage) -> None:
    """What a lineage costs when the change itself is small: the guest's own churn, the device
    state and the qcow2 layer's clusters."""
    s, snaps, _ = lineage
    _sh(s, "echo small > /root/small && sync")
    x = client.create_snapshot_and_wait(s.id, "tiny", timeout=300)
    try:
        m = _manifest(tenki_server, x.id)
        first = snaps[0].compressed_bytes
        print(f"tiny change: stored {x.compressed_bytes / MiB:.2f} MiB "
              f"({x.compressed_bytes / first:.3f}x of {first / MiB:.1f} MiB): RAM delta "
              f"{m['stored'][m['ram']] / MiB:.2f} MiB, state {m['stored'][m['state']] / MiB:.2f}"
              f" MiB, disk layer {m['stored'][m['layers'][-1]] / MiB:.2f} MiB")
        # memory and device state: what lineages made incremental, well under 0.05x (measured
        # ~0.03x); the new qcow2 layer costs ~0.9 MiB whatever the change (each 4 KiB the
        # guest writes allocates a 64 KiB cluster, filled from the layer below, and the layer
        # has its own tables): the whole measured 0.047x once, so bounded here at 0.075x
        assert m["stored"][m["ram"]] + m["stored"][m["state"]] <= 0.05 * first
        assert x.compressed_bytes <= 0.075 * first
    finally:
        client.delete_snapshot(x.id)

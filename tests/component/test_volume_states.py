"""Every state change of a volume through the REST API (the SDK over HTTP), with the real app,
control plane and SQLite, and the fake host below them (no VMs).

    AVAILABLE ──attach──> IN_USE ──detach / its session ended──> AVAILABLE
        └──delete──> DELETING ──file removed──> DELETED
"""

from __future__ import annotations

import threading

import pytest
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client, errors
from tenkibox.models import SessionState, VolumeState

V = VolumeState


def test_attach_is_in_use_detach_is_available(client: Client, fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    assert vol.state == V.AVAILABLE and vol.id in fake_host.volumes
    s = client.create_and_wait()
    record = s.attach_volume(vol.id, "/data", read_only=False).record
    assert [(a.volume_id, a.path) for a in record.volumes] == [(vol.id, "/data")]
    in_use = client.get_volume(vol.id)
    assert (in_use.state, in_use.session_id, in_use.path) == (V.IN_USE, s.id, "/data")
    s.files.write("/data/kept", "on the volume")
    assert s.detach_volume(vol.id).record.volumes == []
    free = client.get_volume(vol.id)
    assert (free.state, free.session_id, free.path) == (V.AVAILABLE, None, None)
    with pytest.raises(errors.NotFoundError):
        s.files.read("/data/kept")  # not mounted any more
    # the data stays with the volume: another session sees it
    other = client.create_and_wait(volumes=[f"{vol.id}:/mnt:ro"])
    assert other.files.read("/mnt/kept") == b"on the volume"
    with pytest.raises(errors.ValidationError, match="Read-only"):
        other.files.write("/mnt/x", "no")


def test_a_session_end_makes_its_volumes_available(client: Client) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait(volumes=[f"{vol.id}:/data"])
    assert client.get_volume(vol.id).state == V.IN_USE
    s.terminate()
    assert client.get_volume(vol.id).state == V.AVAILABLE


def test_one_volume_one_session(client: Client, inproc: InProcessServer) -> None:
    vol = client.create_volume("data", "1MiB")
    a = client.create_and_wait()
    b = client.create_and_wait()
    a.attach_volume(vol.id, "/data")
    with pytest.raises(errors.ConflictError, match="in use by session"):
        b.attach_volume(vol.id, "/data")
    with pytest.raises(errors.ConflictError, match="in use by session"):
        client.create(volumes=[f"{vol.id}:/data"])
    assert client.get_volume(vol.id).session_id == a.id


def test_concurrent_attaches_one_wins(client: Client, inproc: InProcessServer,
                                      fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    sessions = [client.create_and_wait() for _ in range(3)]
    gate = fake_host.block("attach_volume")  # hold the winner inside the host
    answers: dict[str, object] = {}

    def attach(session_id: str) -> None:
        with Client(endpoint=inproc.url) as c:
            try:
                answers[session_id] = c.attach_volume(session_id, vol.id, "/data").state
            except Exception as exc:
                answers[session_id] = exc

    threads = [threading.Thread(target=attach, args=(s.id,)) for s in sessions]
    for t in threads:
        t.start()
    gate.wait_entered()
    eventually(lambda: len(answers) == 2, what="two refusals")
    gate.release()
    for t in threads:
        t.join(10)
    won = [sid for sid, a in answers.items() if a == SessionState.READY]
    refused = [a for a in answers.values() if isinstance(a, errors.ConflictError)]
    assert len(won) == 1 and len(refused) == 2, answers
    assert gate.held == 1 and client.get_volume(vol.id).session_id == won[0]


def test_a_failed_attach_leaves_the_volume_available(client: Client,
                                                     fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait()
    fake_host.fail_next("attach_volume", errors.InternalError("mount failed: bad superblock"))
    with pytest.raises(errors.InternalError, match="bad superblock"):
        s.attach_volume(vol.id, "/data")
    assert client.get_volume(vol.id).state == V.AVAILABLE
    # at create time a failed attach is a warning on a READY session
    fake_host.fail_next("attach_volume", errors.InternalError("mount failed: bad superblock"))
    s2 = client.create_and_wait(volumes=[f"{vol.id}:/data"])
    assert s2.record.state == SessionState.READY
    assert s2.record.state_reason is not None and "bad superblock" in s2.record.state_reason
    assert client.get_volume(vol.id).state == V.AVAILABLE


def test_terminate_during_the_create_time_attach(client: Client,
                                                 fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    gate = fake_host.block("attach_volume")
    s = client.create(volumes=[f"{vol.id}:/data"])
    gate.wait_entered()
    assert client.get_volume(vol.id).state == V.IN_USE  # reserved before the hot-plug
    assert client.terminate(s.id).state == SessionState.TERMINATED
    assert client.get_volume(vol.id).state == V.AVAILABLE
    gate.release()
    assert client.get_volume(vol.id).state == V.AVAILABLE
    assert not fake_host.has_vm(s.id)


def test_a_volume_lost_at_a_capture_is_available_again(client: Client,
                                                       fake_host: FakeHost) -> None:
    kept = client.create_volume("kept", "1MiB")
    lost = client.create_volume("lost", "1MiB")
    s = client.create_and_wait(volumes=[f"{kept.id}:/kept", f"{lost.id}:/lost"])
    fake_host.lose_at_capture = {lost.id}  # plugged back after the capture: it fails
    assert s.snapshot("x").state == "READY"
    assert [a.volume_id for a in client.get(s.id).record.volumes] == [kept.id]
    assert client.get_volume(lost.id).state == V.AVAILABLE
    assert client.get_volume(kept.id).state == V.IN_USE


def test_delete_is_deleting_then_deleted(client: Client, fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    gate = fake_host.block("delete_volume")
    answer: list[object] = []
    t = threading.Thread(target=lambda: answer.append(client.delete_volume(vol.id)))
    t.start()
    gate.wait_entered()
    assert client.get_volume(vol.id).state == V.DELETING
    with pytest.raises(errors.NotFoundError, match="deleted"):
        client.create(volumes=[f"{vol.id}:/data"])
    gate.release()
    t.join(10)
    gone = client.get_volume(vol.id)
    assert gone.state == V.DELETED and vol.id not in fake_host.volumes
    assert client.list_volumes() == []
    assert client.delete_volume(vol.id).state == V.DELETED  # idempotent


def test_delete_in_use_is_refused(client: Client) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait(volumes=[f"{vol.id}:/data"])
    with pytest.raises(errors.ConflictError, match="detach it"):
        client.delete_volume(vol.id)
    assert client.get_volume(vol.id).state == V.IN_USE
    s.terminate()
    assert client.delete_volume(vol.id).state == V.DELETED


def test_concurrent_deletes_all_answer_deleted(client: Client, inproc: InProcessServer,
                                               fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    gate = fake_host.block("delete_volume")
    answers: list[object] = []

    def delete() -> None:
        with Client(endpoint=inproc.url) as c:
            try:
                answers.append(c.delete_volume(vol.id).state)
            except Exception as exc:
                answers.append(exc)

    threads = [threading.Thread(target=delete) for _ in range(3)]
    for t in threads:
        t.start()
    gate.wait_entered()
    eventually(lambda: len(inproc.requests.to("DELETE", vol.id)) == 3, what="three DELETEs")
    gate.release()
    for t in threads:
        t.join(10)
    assert answers == [V.DELETED] * 3

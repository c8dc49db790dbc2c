"""Every state change of a session through the REST API (the SDK over HTTP), with the real app,
control plane and SQLite, and the fake host below them (no VMs).

    CREATING ──boot/restore done──> READY <──> RUNNING (a process runs)
       ├──failed──> FAILED <──VM died── READY/RUNNING
       └──terminate──> TERMINATING <──terminate── READY/RUNNING
                           └──> TERMINATED
"""

from __future__ import annotations

import threading

import pytest
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client, errors
from tenkibox.engine.machine import MachineError
from tenkibox.host.api import SnapshotDamagedError
from tenkibox.models import SessionState, SnapshotState, VolumeState

S = SessionState


def state_of(client: Client, session_id: str) -> SessionState:
    return client.get(session_id).state


# -- create -------------------------------------------------------------------------------------


def test_create_is_creating_then_ready(client: Client, fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create(name="box", cpu=3, memory_mb=1024, env={"A": "1"})
    assert s.state == S.CREATING
    gate.wait_entered()
    assert state_of(client, s.id) == S.CREATING  # still booting
    assert not fake_host.has_vm(s.id)
    gate.release()
    ready = s.wait_ready(5).record
    assert ready.state == S.READY and ready.state_reason is None
    assert ready.ready_at is not None and ready.terminated_at is None
    vm = fake_host.vm(s.id)
    assert (vm.shape.cpu, vm.shape.memory_mb) == (3, 1024)
    assert fake_host.calls_to("boot") == [s.id]
    assert s.exec("env").stdout == "A=1\n"  # the session's environment reaches its processes


def test_boot_failure_is_failed_with_the_reason(client: Client, fake_host: FakeHost) -> None:
    fake_host.fail_next("boot", errors.InternalError("no space left for the overlay"))
    s = client.create()
    with pytest.raises(errors.SessionFailedError, match="is FAILED: no space left"):
        s.wait_ready(5)
    record = client.get(s.id).record
    assert record.state == S.FAILED
    assert record.state_reason == "no space left for the overlay"
    assert record.terminated_at is not None and record.ready_at is None
    assert not fake_host.has_vm(s.id)
    # an exception that is not a TenkiError is named with its type
    fake_host.fail_next("boot", OSError(28, "No space left on device"))
    s = client.create()
    with pytest.raises(errors.SessionFailedError):
        s.wait_ready(5)
    assert client.get(s.id).record.state_reason == "OSError: [Errno 28] No space left on device"


def test_failed_and_terminated_are_final(client: Client, fake_host: FakeHost) -> None:
    fake_host.fail_next("boot", errors.InternalError("boom"))
    failed = client.create()
    with pytest.raises(errors.SessionFailedError):
        failed.wait_ready(5)
    # a terminate of a FAILED session answers it as it is (idempotent), FAILED stays FAILED
    assert client.terminate(failed.id).state == S.FAILED
    assert client.get(failed.id).record.state_reason == "boom"
    assert fake_host.calls_to("terminate") == []
    with pytest.raises(errors.ConflictError, match="is FAILED"):
        failed.exec("true")
    with pytest.raises(errors.ConflictError, match="only a running session"):
        client.create_snapshot(failed.id, "x")


# -- terminate ----------------------------------------------------------------------------------


def test_terminate_from_creating_cancels_the_boot(client: Client, fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create()
    gate.wait_entered()
    record = client.terminate(s.id).record
    assert record.state == S.TERMINATED and record.terminated_at is not None
    assert fake_host.calls_to("terminate") == [s.id]
    gate.release()  # the boot was cancelled: nothing comes of it
    assert not fake_host.has_vm(s.id) and s.id not in fake_host.starting
    assert state_of(client, s.id) == S.TERMINATED
    with pytest.raises(errors.SessionFailedError, match="TERMINATED"):
        s.wait_ready(1)


def test_terminate_from_ready(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    assert fake_host.has_vm(s.id)
    assert s.terminate().state == S.TERMINATED
    assert not fake_host.has_vm(s.id)
    # idempotent: the record as it is, the host is not asked again
    assert client.terminate(s.id).state == S.TERMINATED
    assert fake_host.calls_to("terminate") == [s.id]
    with pytest.raises(errors.ConflictError, match="is TERMINATED"):
        s.exec("true")


def test_terminate_from_running(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    proc = s.start("sh", "-c", "echo started; cat", stdin=True)
    assert next(iter(proc)) == ("stdout", b"started\n")  # its output stream is open
    assert state_of(client, s.id) == S.RUNNING
    assert client.terminate(s.id).state == S.TERMINATED
    # the stream ends with an error (the rest of the output is lost with the VM), not an exit
    with pytest.raises(errors.InternalError, match="no longer available"):
        proc.wait()
    assert state_of(client, s.id) == S.TERMINATED  # not READY: the settle of the process lost


def test_two_concurrent_terminates_while_booting(client: Client, inproc: InProcessServer,
                                                 fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create()
    gate.wait_entered()
    stop = fake_host.block("terminate")  # hold the first terminate inside the host
    answers: list[object] = []

    def terminate() -> None:
        with Client(endpoint=inproc.url) as c:
            try:
                answers.append(c.terminate(s.id).state)
            except Exception as exc:
                answers.append(exc)

    threads = [threading.Thread(target=terminate) for _ in range(2)]
    for t in threads:
        t.start()
    stop.wait_entered()
    eventually(lambda: len(inproc.requests.to("DELETE", s.id)) == 2, what="both DELETEs")
    stop.release()
    for t in threads:
        t.join(10)
    assert answers == [S.TERMINATED, S.TERMINATED]
    assert fake_host.calls_to("terminate") == [s.id]  # exactly one did the work
    assert stop.held == 1
    assert [r.status for r in inproc.requests.to("DELETE", s.id)] == [200, 200]


def test_boot_done_and_terminate_at_once(client: Client, fake_host: FakeHost) -> None:
    """Whichever comes first, the session ends TERMINATED and no VM is left."""
    for _ in range(5):
        gate = fake_host.block("boot")
        s = client.create()
        gate.wait_entered()
        gate.release()
        assert client.terminate(s.id).state == S.TERMINATED
        assert not fake_host.has_vm(s.id)
        assert state_of(client, s.id) == S.TERMINATED


def test_a_failed_host_terminate_can_be_retried(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    fake_host.fail_next("terminate", errors.InternalError("QEMU did not quit"))
    with pytest.raises(errors.InternalError, match="QEMU did not quit"):
        client.terminate(s.id)
    assert state_of(client, s.id) == S.TERMINATING
    assert client.terminate(s.id).state == S.TERMINATED
    assert not fake_host.has_vm(s.id)


def test_a_terminate_whose_vm_outlives_sigkill_stays_terminating_until_the_sweeper(
        client: Client, fake_host: FakeHost) -> None:
    """The host's terminate raises while a VM process still exists (``Machine.kill``): the
    record stays TERMINATING, and the sweeper tries again without another call."""
    s = client.create_and_wait()
    fake_host.fail_next("terminate", MachineError(
        f"{s.id}: QEMU (pid 4242) still running 5s after SIGKILL"))
    with pytest.raises(errors.InternalError, match="still running 5s after SIGKILL"):
        client.terminate(s.id)
    assert state_of(client, s.id) == S.TERMINATING
    eventually(lambda: state_of(client, s.id) == S.TERMINATED, timeout=10,
               what="the sweeper's retry")
    assert fake_host.calls_to("terminate") == [s.id, s.id]
    assert not fake_host.has_vm(s.id)


# -- the VM dies on its own ---------------------------------------------------------------------


@pytest.mark.parametrize("running", [False, True], ids=["READY", "RUNNING"])
def test_vm_died_is_failed_with_the_reason(client: Client, fake_host: FakeHost,
                                           running: bool) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait(volumes=[f"{vol.id}:/data"])
    assert client.get_volume(vol.id).state == VolumeState.IN_USE
    if running:
        s.start("sleep", "60")
        eventually(lambda: state_of(client, s.id) == S.RUNNING, what="RUNNING")
    fake_host.kill_vm(s.id, "the VM stopped unexpectedly: killed by signal 9")
    eventually(lambda: state_of(client, s.id) == S.FAILED, what="FAILED")
    record = client.get(s.id).record
    assert record.state_reason == "the VM stopped unexpectedly: killed by signal 9"
    assert record.terminated_at is not None and record.volumes == []
    assert client.get_volume(vol.id).state == VolumeState.AVAILABLE  # released
    assert client.terminate(s.id).state == S.FAILED  # final
    assert fake_host.calls_to("terminate") == []


# -- exec ---------------------------------------------------------------------------------------


def test_exec_is_running_then_ready(client: Client) -> None:
    s = client.create_and_wait()
    proc = s.start("cat", stdin=True)
    eventually(lambda: state_of(client, s.id) == S.RUNNING, what="RUNNING")
    second = s.start("cat", stdin=True)
    proc.write_stdin("x")
    proc.close_stdin()
    assert proc.wait().stdout == "x"
    assert state_of(client, s.id) == S.RUNNING  # the second still runs
    second.close_stdin()
    assert second.wait().exit_code == 0
    eventually(lambda: state_of(client, s.id) == S.READY, what="READY again")
    assert s.exec("sh", "-c", "exit 7").exit_code == 7
    eventually(lambda: state_of(client, s.id) == S.READY, what="READY again")


def test_exec_refused_unless_live(client: Client, fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create()
    with pytest.raises(errors.ConflictError, match="is CREATING, not running"):
        s.exec("true")
    gate.release()
    s.wait_ready(5)
    with pytest.raises(errors.ValidationError, match="argv"):
        s.exec("no-such-program")
    assert state_of(client, s.id) == S.READY


# -- restore ------------------------------------------------------------------------------------


def test_restore_is_creating_then_ready_with_the_files(client: Client,
                                                      fake_host: FakeHost) -> None:
    src = client.create_and_wait(env={"FROM": "source"})
    src.files.write("/etc/state", "captured")
    snap = src.snapshot("base")
    src.files.write("/etc/state", "later")
    gate = fake_host.block("restore")
    r = client.create(snapshot_id=snap.id, env={"EXTRA": "1"})
    assert r.state == S.CREATING
    gate.wait_entered()
    gate.release()
    r.wait_ready(5)
    assert r.record.snapshot_id == snap.id
    assert r.files.read("/etc/state") == b"captured"
    assert r.exec("env").stdout == "EXTRA=1\nFROM=source\n"  # the source's env carries on
    assert fake_host.vm(r.id).ram is not None  # restored, not booted
    assert fake_host.calls_to("boot") == [src.id]


def test_restore_of_a_damaged_snapshot_fails_both(client: Client, fake_host: FakeHost) -> None:
    src = client.create_and_wait()
    snap = src.snapshot("base")
    fake_host.fail_next("restore", SnapshotDamagedError(
        f"snapshot {snap.id} cannot be restored: RAM image 1234 is missing"))
    r = client.create(snapshot_id=snap.id)
    with pytest.raises(errors.SessionFailedError, match="cannot be restored"):
        r.wait_ready(5)
    snap_after = client.get_snapshot(snap.id)
    assert snap_after.state == SnapshotState.FAILED
    assert snap_after.state_reason is not None and "damaged in storage" in snap_after.state_reason
    with pytest.raises(errors.SnapshotFailedError, match="only a READY snapshot"):
        client.create(snapshot_id=snap.id)

"""``RemoteHost`` -> ``host.service`` (uvicorn on a real socket) -> ``FakeHost``: every method of
``HostAPI`` travels the wire and comes back as the host answered it; typed errors keep their
class; file bodies and process output are streamed, not held; a wrong secret is refused; a host
that does not answer is ``HostUnreachableError``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterable

import httpx
import pytest
from support.fake_host import FakeHost, image_digest
from support.host_service import SECRET, remote_of, serve

from tenkibox.errors import (
    AuthenticationError,
    CapacityUnavailableError,
    ConflictError,
    HostUnreachableError,
    InternalError,
    NotFoundError,
    SessionFailedError,
    ValidationError,
)
from tenkibox.host.api import (
    BootSpec,
    CaptureSpec,
    ExecSpec,
    ImageDamagedError,
    NetworkSpec,
    RestoreSpec,
    SnapshotDamagedError,
    Unowned,
    VolumeMountSpec,
)
from tenkibox.host.capacity import HostCapacity
from tenkibox.host.remote import RemoteHost
from tenkibox.server.runtime import connect_remote

MiB = 1 << 20


def boot_spec(sid: str = "ses_a", *, inbound: bool = False) -> BootSpec:
    return BootSpec(sid, 2, 1024, "sandbox", sid, NetworkSpec(inbound=inbound))


async def test_boot_exec_capture_restore_terminate_round_trip() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        assert remote.capacity == fake.capacity
        assert remote.network_enforced is True
        started = await remote.boot(boot_spec())
        assert started.layers == [image_digest("sandbox")]
        assert remote.has_vm("ses_a") and remote.list_vms() == ["ses_a"]
        assert remote.memory_used_mib() == fake.memory_used_mib() == 256
        assert remote.tmpfs_use() == fake.tmpfs_use()

        script = "echo hi; echo oops >&2; cat; exit 3"
        ref = await remote.start_process("ses_a", ExecSpec(["sh", "-c", script], {}, stdin=True))
        assert remote.running_processes("ses_a") == 1
        await remote.process_stdin("ses_a", ref.process_id, b"from stdin\n")
        await remote.process_close_stdin("ses_a", ref.process_id)
        events = [e async for e in remote.process_events("ses_a", ref.process_id)]
        out = b"".join(e.data for e in events if e.type == "stdout")
        assert out == b"hi\nfrom stdin\n"
        assert b"".join(e.data for e in events if e.type == "stderr") == b"oops\n"
        assert events[-1].type == "exit" and events[-1].exit_code == 3
        assert await remote.process_exit("ses_a", ref.process_id) == 3
        assert remote.running_processes("ses_a") == 0

        assert await remote.write_file("ses_a", "/root/a.txt", _chunks([b"ab", b"cd"]),
                                       0o600) == 4
        assert fake.file("ses_a", "/root/a.txt") == b"abcd"
        assert b"".join([c async for c in remote.read_file("ses_a", "/root/a.txt")]) == b"abcd"

        vol = VolumeMountSpec("vol_a", "/data")
        await remote.create_volume("vol_a", 1 << 30)
        assert await remote.volume_files() == ["vol_a"]
        await remote.attach_volume("ses_a", vol)
        assert fake.vms["ses_a"].mounts == {"/data": vol}
        captured = await remote.capture(CaptureSpec("ses_a", "snp_a", "sandbox", [vol]))
        assert captured.manifest.base_image_id == "sandbox"
        assert captured.size_bytes == FakeHost.capture_size_bytes
        await remote.detach_volume("ses_a", vol)

        await remote.terminate("ses_a", [])
        assert not remote.has_vm("ses_a") and "ses_a" not in fake.vms
        await remote.delete_volume("vol_a")
        assert await remote.volume_files() == []

        # a spare prepared ahead, claimed by the restore of its session id
        spec = RestoreSpec("ses_b", "snp_a", captured.manifest, "b")
        await remote.prepare_spare(spec)
        assert fake.spares == {"ses_b": spec}
        with pytest.raises(ConflictError, match="already has a VM"):
            await remote.prepare_spare(spec)
        back = await remote.restore(spec)
        assert fake.claimed == ["ses_b"] and fake.spares == {}
        assert back.ram == captured.manifest.ram and back.ram_chain == captured.manifest.rams
        assert fake.file("ses_b", "/root/a.txt") == b"abcd"
        assert remote.has_vm("ses_b")
        await remote.terminate("ses_b", [])
        await remote.prepare_spare(RestoreSpec("ses_c", "snp_a", captured.manifest, "c"))
        await remote.drop_spare("ses_c")
        await remote.drop_spare("ses_none")  # none: nothing to do
        assert fake.spares == {} and fake.dropped_spares == ["ses_c"]


async def _chunks(parts: list[bytes]) -> AsyncGenerator[bytes, None]:
    for p in parts:
        yield p


async def test_the_other_methods() -> None:
    fake = FakeHost()
    fake.seed_vm("ses_old")
    fake.strays = 2
    async with remote_of(fake) as remote:
        assert remote.list_vms() == ["ses_old"]
        rec = await remote.recover({"ses_old": [], "ses_lost": []})
        assert rec.found == ["ses_old"] and "ses_lost" in rec.lost and rec.strays_killed == 2
        assert remote.list_vms() == ["ses_old"]

        assert await remote.image_digest("sandbox") == image_digest("sandbox")
        assert [i.id for i in await remote.list_images()] == ["sandbox"]

        await remote.boot(boot_spec("ses_p", inbound=True))
        fake.guest_ports[("ses_p", 8080)] = ("127.0.0.1", 5555)
        assert await remote.port_address("ses_p", 8080) == ("127.0.0.1", 5555)

        ref = await remote.start_process("ses_p", ExecSpec(["sleep", "30"], {}))
        await remote.process_kill("ses_p", ref.process_id, 9)
        assert await remote.process_exit("ses_p", ref.process_id) is not None

        await remote.refresh()
        assert remote.referenced_locally() == fake.referenced_locally()
        assert remote.local_artifacts() == fake.local_artifacts()

        fake.artifacts["d" * 64] = 0.0  # stored long ago, referenced by nothing
        fake.orphan_vms.add("ses_gone")
        fake.damaged_caches.add("e" * 64)
        scrub = await remote.scrub_caches(repair=False)
        assert list(scrub.damaged) == ["e" * 64]
        found = remote.unowned_files(set())
        assert found == fake.unowned_files(set())
        assert Unowned("artifact", "d" * 64) in found
        # what the caller references is owned after all
        assert Unowned("artifact", "d" * 64) not in remote.unowned_files({"d" * 64})
        removed = await remote.remove_unowned(found, set(), set())
        assert sorted(removed, key=str) == sorted(found, key=str)
        assert remote.unowned_files(set()) == []

        digests = {image_digest("sandbox"): "disk", "f" * 64: "RAM image"}
        fake.artifacts[image_digest("sandbox")] = 0.0
        bad = await remote.verify_artifacts(digests, deep=True)
        assert list(bad) == ["f" * 64] and "missing" in bad["f" * 64]
        assert await remote.cached_bytes([image_digest("sandbox"), "f" * 64]) \
            == await fake.cached_bytes([image_digest("sandbox"), "f" * 64]) > 0
        fake.artifacts["0" * 64] = 0.0
        assert await remote.collect_garbage(set(), grace_s=0) >= 1
        assert "0" * 64 not in fake.artifacts


async def test_errors_keep_their_type_field_and_message() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        fake.fail_next("boot", CapacityUnavailableError("the host's memory is promised"))
        with pytest.raises(CapacityUnavailableError, match="memory is promised"):
            await remote.boot(boot_spec())
        fake.fail_next("boot", ValueError("a bug of the host"))  # not the caller's input: 500
        with pytest.raises(InternalError, match="ValueError: a bug of the host"):
            await remote.boot(boot_spec())
        fake.fail_next("boot", ImageDamagedError("image sandbox: its disk is damaged"))
        with pytest.raises(ImageDamagedError):
            await remote.boot(boot_spec())
        await remote.boot(boot_spec())
        with pytest.raises(ConflictError, match="already"):
            await remote.boot(boot_spec())
        with pytest.raises(ValidationError) as err:
            await remote.start_process("ses_a", ExecSpec(["nosuch"], {}))
        assert err.value.field == "argv"
        with pytest.raises(NotFoundError, match="process prc_x"):
            await remote.process_exit("ses_a", "prc_x")
        with pytest.raises(NotFoundError):
            [c async for c in remote.read_file("ses_a", "/nope")]
        with pytest.raises(ConflictError):
            await remote.capture(CaptureSpec("ses_none", "snp_x", "sandbox", []))
        captured = await remote.capture(CaptureSpec("ses_a", "snp_a", "sandbox", []))
        del fake.artifacts[captured.manifest.ram]
        with pytest.raises(SnapshotDamagedError, match="is missing"):
            await remote.restore(RestoreSpec("ses_b", "snp_a", captured.manifest, "b"))
        fake.fail_next("terminate", SessionFailedError("stuck"))
        with pytest.raises(SessionFailedError):
            await remote.terminate("ses_a", [])
        ref = await remote.start_process("ses_a", ExecSpec(["echo", "x"], {}))
        [e async for e in remote.process_events("ses_a", ref.process_id)]
        with pytest.raises(ConflictError, match="already read"):
            [e async for e in remote.process_events("ses_a", ref.process_id)]


async def test_bad_input_is_422_and_an_unknown_route_404_never_a_500() -> None:
    served = await serve(FakeHost())
    try:
        async with httpx.AsyncClient(base_url=served.url,
                                     headers={"Authorization": f"Bearer {SECRET}"}) as c:
            r = await c.post("/host/v1/vms/boot", json={"cpu": 2})
            assert r.status_code == 422 and r.json()["error"]["code"] == "ValidationError"
            r = await c.post("/host/v1/vms/boot", content=b"{not json")
            assert r.status_code == 422 and r.json()["error"]["field"] == "body"
            r = await c.post("/host/v1/vms/boot", json=[1, 2])
            assert r.status_code == 422
            r = await c.get("/host/v1/vms/ses_a/files")
            assert r.status_code == 422 and r.json()["error"]["field"] == "path"
            r = await c.put("/host/v1/vms/ses_a/files?path=/x&mode=rw", content=b"x")
            assert r.status_code == 422
            r = await c.post("/host/v1/artifacts/collect", json={"referenced": 3})
            assert r.status_code == 422
            r = await c.get("/host/v1/nothing")
            assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
            r = await c.delete("/host/v1/status")
            assert r.status_code == 405
    finally:
        await served.stop()


async def test_a_wrong_or_missing_secret_is_refused() -> None:
    fake = FakeHost()
    served = await serve(fake)
    try:
        async with httpx.AsyncClient(base_url=served.url) as c:
            r = await c.get("/host/v1/status")
            assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
            r = await c.get("/host/v1/status", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
        wrong = RemoteHost(served.url, "not-the-secret", host_id="h")
        with pytest.raises(AuthenticationError):
            await wrong.boot(boot_spec())
        assert fake.vms == {}
        await wrong.aclose()
    finally:
        await served.stop()


async def test_a_host_that_does_not_answer_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    remote = RemoteHost(f"http://127.0.0.1:{port}", SECRET, host_id="h-down")
    with pytest.raises(HostUnreachableError, match="h-down") as err:
        await remote.refresh()
    assert isinstance(err.value.__cause__, httpx.ConnectError)
    assert err.value.status == 503
    with pytest.raises(HostUnreachableError):
        [c async for c in remote.read_file("ses_a", "/x")]
    await remote.aclose()


async def test_watch_reports_a_vm_that_died_and_reconnects_after_a_host_restart() -> None:
    fake = FakeHost()
    served = await serve(fake)
    port = int(served.url.rsplit(":", 1)[1])
    remote = RemoteHost(served.url, SECRET, host_id="h")
    try:
        await remote.boot(boot_spec("ses_a"))
        await remote.boot(boot_spec("ses_b"))
        stream = remote.watch()
        first = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.2)  # connected
        fake.kill_vm("ses_a", "qemu died")
        gone = await asyncio.wait_for(first, 10)
        assert (gone.session_id, gone.reason) == ("ses_a", "qemu died")
        assert not remote.has_vm("ses_a") and remote.has_vm("ses_b")

        await served.stop()  # the worker restarts on the same address
        served = await serve(fake, port=port)
        nxt = asyncio.create_task(anext(stream))
        await asyncio.sleep(2.5)  # the stream noticed and connected again
        fake.kill_vm("ses_b")
        assert (await asyncio.wait_for(nxt, 10)).session_id == "ses_b"
        await stream.aclose()
    finally:
        await remote.aclose()
        await served.stop()


class StreamingHost(FakeHost):
    """A host whose files are generated and counted, never stored: what the wire holds at
    once is then all the memory the test sees. ``gate``: the host waits for it after its
    first chunk, so a reader that got a chunk before it is set got it streamed."""

    size = 50 * MiB
    chunk = 256 << 10

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.received = 0
        self.first_received = asyncio.Event()

    async def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]:
        self.vm(session_id)
        for i in range(self.size // self.chunk):
            yield bytes([i % 251]) * self.chunk
            if i == 0:
                await self.gate.wait()

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int:
        self.vm(session_id)
        async for c in chunks:
            self.received += len(c)
            self.first_received.set()
        return self.received


async def test_50_mib_both_ways_streamed_with_bounded_memory() -> None:
    host = StreamingHost()
    async with remote_of(host) as remote:
        await remote.boot(boot_spec())
        tracemalloc.start()
        try:
            total = 0
            got_first = False
            async for chunk in remote.read_file("ses_a", "/big"):
                if not got_first:
                    got_first = True
                    assert not host.gate.is_set()  # the first chunk came before the rest
                    host.gate.set()
                total += len(chunk)
            assert total == StreamingHost.size
            _, read_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()

            sent_after_first = asyncio.Event()

            async def produce() -> AsyncGenerator[bytes, None]:
                for i in range(StreamingHost.size // StreamingHost.chunk):
                    if i == 8:
                        # the host has our first chunks while we still hold the rest
                        await asyncio.wait_for(host.first_received.wait(), 10)
                        sent_after_first.set()
                    yield bytes([i % 251]) * StreamingHost.chunk

            assert await remote.write_file("ses_a", "/big", produce(), 0o644) \
                == StreamingHost.size
            assert sent_after_first.is_set()
            _, write_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert read_peak < 16 * MiB, f"read held {read_peak / MiB:.1f} MiB at once"
        assert write_peak < 16 * MiB, f"write held {write_peak / MiB:.1f} MiB at once"


async def test_process_output_is_streamed_while_the_process_runs() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        await remote.boot(boot_spec())
        ref = await remote.start_process("ses_a", ExecSpec(["cat"], {}, stdin=True))
        events = remote.process_events("ses_a", ref.process_id)
        await remote.process_stdin("ses_a", ref.process_id, b"one\n")
        first = await asyncio.wait_for(anext(events), 5)
        assert (first.type, first.data) == ("stdout", b"one\n")  # the process still runs
        await remote.process_close_stdin("ses_a", ref.process_id)
        rest = [e async for e in events]
        assert rest[-1].type == "exit" and rest[-1].exit_code == 0


async def test_answers_arriving_out_of_order_do_not_undo_a_boot_or_terminate() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        gate = fake.block("boot")
        boot = asyncio.create_task(remote.boot(boot_spec()))
        await gate.until_entered()
        await remote.refresh()  # sent after the boot, answered before it finished
        assert not remote.has_vm("ses_a")
        gate.release()
        await boot
        assert remote.has_vm("ses_a")
        # an answer sent before the boot (its seq is older) that arrives now lists no VM
        remote._take_brief({"vms": []}, seq=1)
        assert remote.has_vm("ses_a")
        await remote.terminate("ses_a", [])
        remote._take_brief({"vms": ["ses_a"]}, seq=2)  # older than the terminate
        assert not remote.has_vm("ses_a")
        await remote.refresh()
        assert remote.list_vms() == []


async def test_a_failed_capture_says_whether_its_vm_is_still_there() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        await remote.boot(boot_spec())
        gate = fake.block("capture")
        capture = asyncio.create_task(remote.capture(CaptureSpec("ses_a", "snp", "sandbox", [])))
        await gate.until_entered()
        fake.kill_vm("ses_a", "QEMU was killed")
        await asyncio.sleep(0.05)
        gate.release()
        with pytest.raises(ConflictError):
            await capture
        assert not remote.has_vm("ses_a")  # the error's answer said so, before any watch


async def test_a_vm_gone_whose_event_was_lost_is_reported_by_a_later_refresh() -> None:
    fake = FakeHost()
    async with remote_of(fake) as remote:
        await remote.boot(boot_spec("ses_a"))
        await remote.boot(boot_spec("ses_b"))
        fake.kill_vm("ses_a", "qemu died")
        await asyncio.sleep(0.05)
        fake._bind_queue().get_nowait()  # the event was lost (a stream that broke)
        await remote.refresh()
        assert not remote.has_vm("ses_a")
        await remote.refresh()  # the watch stream had a refresh interval to say why
        stream = remote.watch()
        gone = await asyncio.wait_for(anext(stream), 5)
        assert gone.session_id == "ses_a" and "no longer on host" in gone.reason

        fake.kill_vm("ses_b", "qemu died")  # its event comes: reported once, with the reason
        gone = await asyncio.wait_for(anext(stream), 5)
        assert (gone.session_id, gone.reason) == ("ses_b", "qemu died")
        await remote.refresh()
        await remote.refresh()
        nothing = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.3)
        assert not nothing.done()
        nothing.cancel()  # ends the stream (its pump with it)
        with contextlib.suppress(asyncio.CancelledError):
            await nothing


async def test_a_member_places_by_its_registered_capacity_before_it_first_answers() -> None:
    """The control plane admits sessions to a host the moment it registers: the member the
    runtime makes of the registration holds the capacity it registered with until its first
    status answer (nothing listens here, so no answer ever comes)."""
    cap = HostCapacity("host-new", 8192, 1024, 2.0, 4, "tcg")
    remote = connect_remote("host-new", "http://127.0.0.1:9", "s" * 43, cap)
    try:
        assert remote.capacity == cap
        assert remote.capacity.memory_capacity_mib == 14336
    finally:
        assert isinstance(remote, RemoteHost)
        await remote.aclose()

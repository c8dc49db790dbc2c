"""The sync and async clients against the real server in-process: the real app and control
plane over SQLite, with the fake host below them (no VMs; see tests/support)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from support.fake_host import FakeHost
from support.server import InProcessServer

import tenkibox
from tenkibox import AsyncClient, Client, errors, models
from tenkibox.client import AsyncProcess, AsyncSession, Process, Session

URL = "http://fake.test"
MakeServer = Callable[..., InProcessServer]


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url) as c:
        yield c


# -- public surface ---------------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.TenkiError):
            assert getattr(tenkibox, name) is obj
    for name in ("Snapshot", "Volume", "Image", "VolumeMount", "SessionState", "SnapshotState"):
        assert getattr(tenkibox, name) is getattr(models, name)
    assert tenkibox.SessionRecord is models.Session
    assert tenkibox.Session is Session
    assert set(tenkibox.__all__) <= set(dir(tenkibox))


def _public(obj: object) -> dict[str, object]:
    return {n: getattr(obj, n) for n in dir(obj) if not n.startswith("_")}


def _params(fn: object) -> list[tuple[str, object, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]


@pytest.mark.parametrize(
    "sync_obj, async_obj",
    [
        ("client", "aclient"),
        ("client.sessions", "aclient.sessions"),
        ("client.snapshots", "aclient.snapshots"),
        ("client.volumes", "aclient.volumes"),
        ("session", "asession"),
        ("session.files", "asession.files"),
        ("process", "aprocess"),
    ],
)
def test_sync_async_parity(sync_obj: str, async_obj: str) -> None:
    client = Client(endpoint=URL)  # nothing is sent
    aclient = AsyncClient(endpoint=URL)
    record = models.Session(
        id="ses_1",
        workspace_id="ws_1",
        state=models.SessionState.READY,
        cpu=1,
        memory_mb=512,
        base_image_id="x",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    info = models.ProcessInfo(process_id="prc_1", session_id="ses_1")
    scope = {
        "client": client,
        "aclient": aclient,
        "session": Session(client, record),
        "asession": AsyncSession(aclient, record),
        "process": Process(client, info),
        "aprocess": AsyncProcess(aclient, info),
    }
    s = eval(sync_obj, {}, scope)
    a = eval(async_obj, {}, scope)
    sync_names, async_names = _public(s), _public(a)
    assert sorted(sync_names) == sorted(async_names)
    routines = sorted(n for n, v in sync_names.items() if inspect.isroutine(v))
    assert routines
    for name in routines:
        sync_attr, async_attr = sync_names[name], async_names[name]
        assert inspect.isroutine(async_attr), name
        assert _params(sync_attr) == _params(async_attr), name
        if inspect.isgeneratorfunction(sync_attr):
            assert inspect.isasyncgenfunction(async_attr), name
        else:
            assert inspect.iscoroutinefunction(async_attr), name
        assert sync_attr.__doc__ and async_attr.__doc__, f"{name} has no docstring"


def test_namespaces_are_the_client_methods(client: Client) -> None:
    assert client.sessions.create == client.create
    assert client.snapshots.create == client.create_snapshot
    assert client.snapshots.restore == client.restore_snapshot
    assert client.volumes.list == client.list_volumes
    assert inspect.signature(client.snapshots.wait_ready) == inspect.signature(
        client.wait_snapshot_ready
    )


# -- sessions ---------------------------------------------------------------------------------


def test_create_returns_creating_then_wait(
    client: Client, inproc: InProcessServer, fake_host: FakeHost
) -> None:
    gate = fake_host.block("boot")
    s = client.create(name="box", cpu=4, env={"A": "1"}, volumes=None)
    assert s.state == models.SessionState.CREATING
    assert inproc.requests.to("POST", "/v1/sessions")[0].body == (
        b'{"name":"box","cpu":4,"env":{"A":"1"}}'
    )
    gate.release()
    s.wait_ready(10)
    assert s.state == models.SessionState.READY
    assert client.get(s.id).record.env_keys == ["A"]
    assert [x.id for x in client.list("READY")] == [s.id]
    assert client.list(state=models.SessionState.CREATING) == []


def test_create_and_wait_failed(client: Client, fake_host: FakeHost) -> None:
    fake_host.fail_next("boot", errors.InternalError("the VM could not boot"))
    with pytest.raises(errors.SessionFailedError, match="the VM could not boot"):
        client.create_and_wait()


def test_create_and_wait_timeout(client: Client, fake_host: FakeHost) -> None:
    fake_host.block("boot")
    with pytest.raises(errors.WaitTimeoutError, match=r"is still CREATING after 0\.1s"):
        client.create_and_wait(timeout=0.1)


def test_session_context_manager_terminates(client: Client, fake_host: FakeHost) -> None:
    with client.create_and_wait(name="tmp") as s:
        sid = s.id
        assert fake_host.has_vm(sid)
    assert client.get(sid).state == models.SessionState.TERMINATED
    assert not fake_host.has_vm(sid)


def test_not_found_is_typed(client: Client) -> None:
    with pytest.raises(errors.SessionNotFoundError, match="session ses_nope not found"):
        client.get("ses_nope")
    with pytest.raises(errors.SnapshotNotFoundError):
        client.get_snapshot("snp_nope")
    with pytest.raises(errors.VolumeNotFoundError):
        client.volumes.get("vol_nope")


def test_local_validation_never_calls_the_server(
    client: Client, inproc: InProcessServer
) -> None:
    with pytest.raises(errors.ValidationError, match="cpu"):
        client.create(cpu=99)
    with pytest.raises(errors.ValidationError, match="volumes"):
        client.create(volumes=["bad"])
    assert inproc.requests == []


SECRET = "tk_another-admin-key-of-its-own-00000000000000"


def test_api_key_is_sent(make_inproc: MakeServer) -> None:
    server = make_inproc(api_key=SECRET)
    with Client(endpoint=server.url, api_key="tk_wrong") as c:
        with pytest.raises(errors.AuthenticationError, match="unknown API key tk_wrong"):
            c.list()
    with Client(endpoint=server.url, api_key=SECRET) as c:
        assert c.list() == []
    assert [r.status for r in server.requests] == [401, 200]


def test_env_configuration(make_inproc: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_inproc(api_key=SECRET)
    monkeypatch.setenv("TENKI_API_ENDPOINT", server.url.removeprefix("http://") + "/")
    monkeypatch.setenv("TENKI_API_KEY", SECRET)
    with Client() as c:
        assert c.endpoint == server.url
        assert c.list() == []


def test_connection_errors_are_translated() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with Client(endpoint=URL, transport=httpx.MockTransport(refuse)) as c:
        with pytest.raises(errors.ConnectionError, match="cannot reach") as info:
            c.health()
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_server_error_body_maps_to_class(client: Client, inproc: InProcessServer) -> None:
    s = client.create_and_wait()
    s.terminate()
    with pytest.raises(errors.ConflictError, match="is TERMINATED"):
        s.exec("true")
    assert inproc.requests.to("POST", "/processes")[0].status == 409


# -- exec -------------------------------------------------------------------------------------


def test_exec_collects_output_and_exit_code(client: Client, inproc: InProcessServer) -> None:
    s = client.create_and_wait()
    r = s.exec("sh", "-c", "echo hi; echo oops >&2; exit 3", cwd="/tmp", env={"X": "1"}, timeout=5)
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == ("hi\n", "oops\n", 3, False)
    with pytest.raises(errors.CommandError) as info:
        r.check()
    assert info.value.result is r
    body = models.ExecRequest.model_validate_json(inproc.requests.to("POST", "/processes")[0].body)
    assert body.argv == ["sh", "-c", "echo hi; echo oops >&2; exit 3"]
    assert (body.cwd, body.env, body.timeout_s) == ("/tmp", {"X": "1"}, 5)


def test_shell_and_stdin_data(client: Client) -> None:
    s = client.create_and_wait()
    assert s.shell("echo a; echo b").stdout == "a\nb\n"
    r = s.exec("cat", stdin=b"\x00\xffbytes")
    assert r.stdout_bytes == b"\x00\xffbytes"
    assert r.stdout == "\x00\ufffdbytes"


def test_timeout_exit_code(client: Client) -> None:
    r = client.create_and_wait().exec("sleep", "100", timeout=0.2)
    assert r.timed_out and r.exit_code == 124


def test_start_streams_and_takes_stdin(client: Client) -> None:
    s = client.create_and_wait()
    proc = s.start("cat", stdin=True)
    seen: list[tuple[str, bytes]] = []

    def feed() -> None:
        proc.write_stdin("one ")
        proc.write_stdin(b"two")
        proc.close_stdin()

    t = threading.Thread(target=feed)
    t.start()
    for stream, data in proc:
        seen.append((stream, data))
    t.join()
    assert b"".join(d for _, d in seen) == b"one two"
    assert all(st == "stdout" for st, _ in seen)
    result = proc.wait()
    assert result.exit_code == 0 and result.stdout == "one two"
    assert proc.exit_code == 0


def test_partial_iteration_then_wait_loses_nothing(client: Client) -> None:
    s = client.create_and_wait()
    proc = s.start("sh", "-c", "echo 1; echo 2 >&2; echo 3")
    it = proc.events()
    assert next(it) == ("stdout", b"1\n")
    result = proc.wait()  # continues where the abandoned iteration stopped
    assert result.stdout == "1\n3\n" and result.stderr == "2\n"


def test_kill(client: Client) -> None:
    s = client.create_and_wait()
    proc = s.start("cat", stdin=True)
    proc.kill()
    assert proc.wait().exit_code == 137


# -- files, snapshots, volumes ------------------------------------------------------------------


def test_files_roundtrip(client: Client, inproc: InProcessServer) -> None:
    s = client.create_and_wait()
    written = s.files.write("/etc/motd", "héllo", mode=0o600)
    assert written.size_bytes == len("héllo".encode())
    assert inproc.requests.to("PUT", "/files")[0].query == {"path": "/etc/motd", "mode": "384"}
    assert s.files.read("/etc/motd") == "héllo".encode()
    assert s.files.read_text("/etc/motd") == "héllo"
    with pytest.raises(errors.NotFoundError):
        s.files.read("/nope")


def test_snapshot_create_wait_restore_delete(
    client: Client, inproc: InProcessServer, fake_host: FakeHost
) -> None:
    s = client.create_and_wait(name="orig")
    s.files.write("/state", "before")
    gate = fake_host.block("capture")
    snap = client.create_snapshot(s.id, "base", expires_at="2999-01-01T00:00:00Z")
    assert snap.state == models.SnapshotState.CREATING
    assert snap.expires_at is not None and snap.expires_at.year == 2999
    gate.release()
    ready = client.wait_snapshot_ready(snap.id, timeout=5)
    assert ready.state == models.SnapshotState.READY
    assert [x.id for x in client.list_snapshots(session_id=s.id)] == [snap.id]
    assert client.list_snapshots(session_id="ses_other") == []
    restored = client.restore_snapshot(snap.id, name="copy")
    assert restored.state == models.SessionState.READY
    assert restored.record.snapshot_id == snap.id
    assert restored.files.read("/state") == b"before"
    # a restore sends only what was given: cpu and memory come from the snapshot
    assert inproc.requests.to("POST", "/v1/sessions")[-1].body == (
        b'{"name":"copy","snapshot_id":"' + snap.id.encode() + b'"}'
    )
    assert client.delete_snapshot(snap.id).state == models.SnapshotState.DELETING


def test_session_snapshot_and_failures(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    assert s.snapshot("a").state == models.SnapshotState.READY
    gate = fake_host.block("capture")
    b = s.snapshot("b", wait=False)
    assert b.state == models.SnapshotState.CREATING
    gate.release()
    assert client.wait_snapshot_ready(b.id, timeout=5).state == models.SnapshotState.READY
    fake_host.fail_next("capture", errors.InternalError("disk capture failed"))
    with pytest.raises(errors.SnapshotFailedError, match="disk capture failed"):
        client.create_snapshot_and_wait(s.id, "c")
    fake_host.block("capture")
    snap = client.create_snapshot(s.id, "d")
    with pytest.raises(errors.WaitTimeoutError, match=f"snapshot {snap.id} is still CREATING"):
        client.snapshots.wait_ready(snap.id, timeout=0.05)


def test_volumes(client: Client) -> None:
    vol = client.create_volume("data", "64MiB")
    assert vol.size_bytes == 64 << 20
    s = client.create_and_wait(volumes=[f"{vol.id}:/mnt/data:ro"])
    assert s.record.volumes[0].read_only
    vol2 = client.volumes.create("more", 1 << 20)
    s.attach_volume(vol2.id, "/more")
    assert [v.volume_id for v in s.record.volumes] == [vol.id, vol2.id]
    with pytest.raises(errors.ConflictError):
        client.delete_volume(vol2.id)
    s.detach_volume(vol2.id)
    assert client.delete_volume(vol2.id).state == models.VolumeState.DELETED
    assert [v.id for v in client.list_volumes()] == [vol.id]
    with pytest.raises(errors.ValidationError, match="size_bytes"):
        client.create_volume("tiny", 10)


def test_images_and_health(client: Client) -> None:
    assert client.list_images()[0].id == "sandbox"
    assert client.health().accelerator == "tcg"


# -- async ------------------------------------------------------------------------------------


async def test_async_client_end_to_end(inproc: InProcessServer, fake_host: FakeHost) -> None:
    async with AsyncClient(endpoint=inproc.url) as c:
        async with await c.create_and_wait(name="a") as s:
            r = await s.exec("sh", "-c", "echo hi; exit 3")
            assert (r.stdout, r.exit_code) == ("hi\n", 3)
            proc = await s.start("cat", stdin=True)

            async def feed() -> None:
                await proc.write_stdin("x")
                await asyncio.sleep(0.01)
                await proc.write_stdin("y")
                await proc.close_stdin()

            task = asyncio.create_task(feed())
            chunks = [data async for _, data in proc]
            await task
            assert b"".join(chunks) == b"xy"
            assert (await proc.wait()).stdout == "xy"
            await s.files.write("/f", b"data")
            assert await s.files.read_text("/f") == "data"
            snap = await s.snapshot("base")
            restored = await c.snapshots.restore(snap.id, name="copy")
            assert restored.record.snapshot_id == snap.id
            assert len(await c.sessions.list()) == 2
            sid = s.id
        assert (await c.get(sid)).state == models.SessionState.TERMINATED
        with pytest.raises(errors.SessionNotFoundError):
            await c.get("ses_nope")
        fake_host.fail_next("boot", errors.InternalError("the VM could not boot"))
        with pytest.raises(errors.SessionFailedError, match="the VM could not boot"):
            await c.create_and_wait()

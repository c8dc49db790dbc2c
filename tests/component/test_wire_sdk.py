"""Tenki's gRPC wire, driven by the official Python SDK (PyPI ``tenki`` 1.4.1, unmodified).

The real app, control plane and gRPC server (``InProcessServer(grpc=True)``) over the fake
host: every flow the SDK offers for sessions, exec, files, snapshots and volumes, and each
error the SDK turns into its own exception from our status code and message. The same flows
run against real VMs in ``tests/conformance``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tenki_sandbox.errors as sdk_errors
from support.fake_host import FakeHost
from support.server import ADMIN_KEY, InProcessServer
from tenki import Client, Sandbox

from tenkibox.errors import InternalError
from tenkibox.host.api import EgressPolicy, NetworkSpec
from tenkibox.rpc import proto


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("wire") / "home", grpc=True).start()
    yield server
    server.stop()


@pytest.fixture
def env(wire: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> InProcessServer:
    """Only what a user sets: the endpoint and the key."""
    monkeypatch.setenv("TENKI_API_ENDPOINT", wire.grpc_endpoint)
    monkeypatch.setenv("TENKI_API_KEY", ADMIN_KEY)
    monkeypatch.delenv("TENKI_AUTH_TOKEN", raising=False)
    return wire


@pytest.fixture
def sandbox(env: InProcessServer) -> Iterator[Sandbox]:
    sb = Sandbox.create(name="wire-test")
    yield sb
    sb.terminate()


def host(server: InProcessServer) -> FakeHost:
    return server.host


def test_create_waits_until_running_and_reports_the_session(sandbox: Sandbox,
                                                            env: InProcessServer) -> None:
    assert sandbox.id.startswith("ses_")
    assert sandbox.info.state == "RUNNING"
    assert sandbox.info.name == "wire-test"
    assert env.plane.sessions.get(sandbox.id).state.value in ("READY", "RUNNING")


def test_exec_gives_stdout_stderr_and_the_exit_code(sandbox: Sandbox) -> None:
    r = sandbox.exec("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.stdout_text, r.stderr_text, r.exit_code) == ("out\n", "err\n", 3)
    assert sandbox.exec("echo", "hello world").stdout_text == "hello world\n"


def test_exec_runs_as_the_guest_user_in_its_workdir(sandbox: Sandbox,
                                                    env: InProcessServer) -> None:
    out = sandbox.exec("env").stdout_text
    assert "HOME=/home/tenki" in out and "USER=tenki" in out
    [proc] = [p for p in host(env).vm(sandbox.id).procs if p.spec.argv == ["env"]]
    assert (proc.spec.user, proc.spec.cwd) == (1000, "/home/tenki")
    sandbox.exec("true", privileged=True)
    assert host(env).vm(sandbox.id).procs[-1].spec.user is None  # root
    assert host(env).vm(sandbox.id).procs[-1].spec.argv == ["true"]


def test_a_command_that_cannot_start_is_an_exit_127(sandbox: Sandbox) -> None:
    result = sandbox.exec("no-such-program")
    assert (result.exit_code, result.errno) == (127, 2)
    assert result.reason is not None and "no-such-program" in result.reason


def test_stdin_streams_to_the_command_while_it_runs(sandbox: Sandbox) -> None:
    proc = sandbox.start("cat")
    proc.write_stdin(b"one\n")
    proc.write_stdin(b"two\n")
    proc.close_stdin()
    result = proc.wait()
    assert (result.stdout_text, result.exit_code) == ("one\ntwo\n", 0)


def test_files_are_relative_to_the_workdir_and_confined_to_it(sandbox: Sandbox,
                                                              env: InProcessServer) -> None:
    sandbox.fs.write_text("notes/a.txt", "data")
    assert sandbox.fs.read_text("notes/a.txt") == "data"
    assert sandbox.fs.read_text("/home/tenki/notes/a.txt") == "data"
    assert host(env).file(sandbox.id, "/home/tenki/notes/a.txt") == b"data"
    for outside in ("/etc/passwd", "../../etc/passwd"):
        with pytest.raises(sdk_errors.SandboxError, match="path outside workdir"):
            sandbox.fs.read_text(outside)
    with pytest.raises(sdk_errors.FileNotFoundError):
        sandbox.fs.read_text("missing.txt")


def test_snapshot_create_get_list_restore_delete(sandbox: Sandbox, env: InProcessServer) -> None:
    client = Client()
    sandbox.fs.write_text("before.txt", "kept")
    snap = sandbox.snapshot(name="baseline")
    assert (snap.state, snap.name, snap.session_id) == ("READY", "baseline", sandbox.id)
    assert client.snapshots.get(snap.id).state == "READY"
    assert snap.id in [s.id for s in client.snapshots.list()]
    restored = Sandbox.create(snapshot_id=snap.id)
    try:
        assert restored.id != sandbox.id
        assert restored.fs.read_text("before.txt") == "kept"
    finally:
        restored.terminate()
    client.snapshots.delete(snap.id)
    with pytest.raises(sdk_errors.SnapshotNotFoundError):
        client.snapshots.get("snp_doesnotexist0000")


def test_a_failed_capture_is_snapshot_failed_with_its_reason(sandbox: Sandbox,
                                                             env: InProcessServer) -> None:
    host(env).fail_next("capture", InternalError("disk full while copying RAM"))
    with pytest.raises(sdk_errors.SnapshotFailedError) as caught:
        sandbox.snapshot(name="doomed")
    assert "disk full" in (caught.value.failure_reason or str(caught.value))
    assert sandbox.exec("true").exit_code == 0  # the session is unhurt


def test_unknown_and_terminated_sessions(env: InProcessServer) -> None:
    client = Client()
    with pytest.raises(sdk_errors.SessionNotFoundError):
        client.get("ses_doesnotexist0000")
    sb = Sandbox.create()
    sb.terminate()
    with pytest.raises(sdk_errors.SessionTerminatedError):
        sb.exec("true")


def test_volumes_create_attach_in_use_delete(env: InProcessServer) -> None:
    client = Client()
    vol = client.volumes.create(name="cache", size_bytes=64 << 20)
    assert client.volumes.get(vol.id).name == "cache"
    assert vol.id in [v.id for v in client.volumes.list()]
    sb = Sandbox.create(volumes=[{"volume_id": vol.id, "mount_path": "/mnt/cache"}])
    try:
        with pytest.raises(sdk_errors.VolumeInUseError):
            client.volumes.delete(vol.id)
    finally:
        sb.terminate()
    client.volumes.delete(vol.id)
    with pytest.raises(sdk_errors.VolumeNotFoundError):
        client.volumes.get("vol_doesnotexist0000")


def test_a_wrong_key_is_unauthorized(env: InProcessServer, monkeypatch: pytest.MonkeyPatch,
                                     ) -> None:
    monkeypatch.setenv("TENKI_API_KEY", "tk_not-a-key-of-this-server")
    with pytest.raises(sdk_errors.UnauthorizedError):
        Client().get("ses_doesnotexist0000")


def test_who_am_i_names_the_keys_workspace(env: InProcessServer) -> None:
    me = Client().who_am_i()
    assert [w.id for w in me.workspaces] == [env.default_workspace]


def _raw(server: InProcessServer, method: str, request: Any,
         metadata: tuple[tuple[str, str], ...]) -> Any:
    target = server.grpc_endpoint.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda raw: raw)
        return call(request, metadata=metadata, timeout=10)


def test_methods_we_do_not_serve_say_their_name(env: InProcessServer) -> None:
    auth = (("authorization", f"Bearer {ADMIN_KEY}"),)
    for method in ("/tenki.sandbox.v1.SandboxService/GetSessionMetrics",
                   "/tenki.other.v9.Nothing/AtAll"):
        with pytest.raises(grpc.RpcError) as caught:
            _raw(env, method, proto.message("GetSessionRequest")(), auth)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert method.rsplit("/", 1)[1] in (caught.value.details() or "")


def test_the_data_plane_takes_only_a_session_credential(env: InProcessServer) -> None:
    stat = proto.message("SandboxSessionDataPlaneServiceStatRequest")()
    stat.request.path = "/home/tenki"
    path = "/tenki.sandbox.v1.SandboxSessionDataPlaneService/Stat"
    for md in ((("authorization", f"Bearer {ADMIN_KEY}"),),
               (("x-tenki-session-cert", "tkdp1.forged.signature"),)):
        with pytest.raises(grpc.RpcError) as caught:
            _raw(env, path, stat, md)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_credential_reaches_only_its_own_session(env: InProcessServer) -> None:
    a, b = Sandbox.create(), Sandbox.create()
    try:
        cred = env.run(_credential(env, a.id))
        req = proto.message("SandboxSessionDataPlaneServiceReadFileRequest")()
        req.request.session_id, req.request.path = b.id, "x.txt"
        with pytest.raises(grpc.RpcError) as caught:
            _raw(env, "/tenki.sandbox.v1.SandboxSessionDataPlaneService/ReadFile", req,
                 (("x-tenki-session-cert", cred),))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        a.terminate()
        b.terminate()


async def _credential(server: InProcessServer, session_id: str) -> str:
    from tenkibox.rpc.credentials import Credentials
    creds = Credentials.from_file(Path(server.home) / "dataplane.key")
    s = server.plane.sessions.get(session_id)
    return creds.encode(creds.issue(session_id, s.workspace_id))


def test_lists_page_with_a_token(env: InProcessServer) -> None:
    made = [Sandbox.create(wait=False) for _ in range(3)]
    try:
        req = proto.message("ListWorkspaceSandboxesRequest")(page_size=2)
        auth = (("authorization", f"Bearer {ADMIN_KEY}"),)
        cls = proto.message("ListWorkspaceSandboxesResponse")
        first = cls.FromString(_raw(env, "/tenki.sandbox.v1.SandboxService/"
                                    "ListWorkspaceSandboxes", req, auth))
        assert len(first.sessions) == 2 and first.next_page_token
        req.page_token = first.next_page_token
        rest = cls.FromString(_raw(env, "/tenki.sandbox.v1.SandboxService/"
                                   "ListWorkspaceSandboxes", req, auth))
        ids = {s.id for s in first.sessions} | {s.id for s in rest.sessions}
        assert {m.id for m in made} <= ids
    finally:
        for m in made:
            m.terminate()


def test_mutating_calls_are_audited(env: InProcessServer) -> None:
    sb = Sandbox.create(name="audited")
    sb.terminate()
    actions = [(e.action, e.object_id, e.method) for e in env.plane.audit.query(None, 50)]
    assert ("TerminateSession", sb.id, "GRPC") in actions
    assert any(a == "CreateSession" for a, _, _ in actions)


def test_rest_and_the_wire_agree_on_relative_paths(sandbox: Sandbox,
                                                   env: InProcessServer) -> None:
    from tenkibox.client import Client as OurClient
    ours = OurClient(endpoint=env.url, api_key=ADMIN_KEY).sessions.get(sandbox.id)
    ours.files.write("shared/from-rest.txt", "rest")
    assert host(env).file(sandbox.id, "/home/tenki/shared/from-rest.txt") == b"rest"
    assert sandbox.fs.read_text("shared/from-rest.txt") == "rest"
    sandbox.fs.write_text("from-wire.txt", "wire")
    assert ours.files.read_text("/home/tenki/from-wire.txt") == "wire"
    assert ours.files.read_text("from-wire.txt") == "wire"


def test_usage_counts_what_the_workspace_holds(sandbox: Sandbox, env: InProcessServer) -> None:
    limits = {item.key: item for item in Client().get_usage()}
    assert limits["max_concurrent_sessions"].current >= 1
    assert limits["max_stored_bytes"].unit == "bytes"


def test_one_endpoint_serves_the_official_sdk_and_ours(sandbox: Sandbox,
                                                       env: InProcessServer) -> None:
    """TENKI_API_ENDPOINT set for the official SDKs also serves our SDK (REST behind the same
    port): nobody has to keep two variables apart."""
    from tenkibox.client import Client as OurClient
    ours = OurClient(endpoint=env.grpc_endpoint, api_key=ADMIN_KEY)
    session = ours.sessions.get(sandbox.id)
    assert session.id == sandbox.id
    result = session.exec("sh", "-c", "echo via-front; echo e >&2; exit 4")
    assert (result.stdout, result.exit_code) == ("via-front\n", 4)
    sandbox.fs.write_text("front.txt", "x" * 300_000)
    assert session.files.read_text("front.txt") == "x" * 300_000


def test_update_and_extend_a_session(sandbox: Sandbox, env: InProcessServer) -> None:
    sandbox.update(name="renamed", tags=["Blue", "team:a"])
    assert (sandbox.info.name, sorted(sandbox.info.tags)) == ("renamed", ["blue", "team:a"])
    record = env.plane.sessions.get(sandbox.id)
    assert record.name == "renamed" and record.expires_at is None
    sandbox.extend(600)
    after = env.plane.sessions.get(sandbox.id).expires_at
    assert after is not None
    sandbox.extend(60)
    assert (env.plane.sessions.get(sandbox.id).expires_at - after).total_seconds() == 60
    sandbox.update(tags=[])
    assert list(Client().get(sandbox.id).info.tags) == []


def test_update_a_snapshot(sandbox: Sandbox, env: InProcessServer) -> None:
    from datetime import UTC, datetime, timedelta
    client = Client()
    snap = sandbox.snapshot(name="first")
    later = datetime.now(UTC) + timedelta(days=2)
    updated = client.snapshots.update(snap.id, name="second", expires_at=later)
    assert updated.name == "second"
    assert abs((updated.expires_at - later).total_seconds()) < 1
    cleared = client.snapshots.update(snap.id, clear_expires_at=True)
    assert cleared.expires_at is None
    with pytest.raises(sdk_errors.SandboxError, match="tags"):
        client.snapshots.update(snap.id, tags=["x"])
    with pytest.raises(sdk_errors.SandboxError, match="must be in the future"):
        client.snapshots.update(snap.id, expires_at=datetime(2020, 1, 1, tzinfo=UTC))
    client.snapshots.delete(snap.id)


def test_pause_and_resume_keep_the_session_id(sandbox: Sandbox, env: InProcessServer) -> None:
    sandbox.fs.write_text("kept.txt", "across a pause")
    sandbox.pause()
    assert sandbox.info.state == "PAUSED"
    assert not host(env).has_vm(sandbox.id)  # the VM is gone while paused
    with pytest.raises(sdk_errors.SandboxError, match="PAUSED"):
        sandbox.exec("true")
    sandbox.resume()
    assert sandbox.info.state == "RUNNING"
    assert sandbox.fs.read_text("kept.txt") == "across a pause"
    sandbox.pause_async()
    assert sandbox.info.state in ("PAUSING", "PAUSED")
    sandbox.wait_paused(timeout=30)
    sandbox.resume()
    assert sandbox.exec("true").exit_code == 0


def test_a_disk_size_we_do_not_give_is_a_warning(env: InProcessServer) -> None:
    with pytest.warns(Warning, match="disk_size_gb 20 was asked"):
        sb = Sandbox.create(disk_size_gb=20)
    try:
        assert sb.info.disk_size_gb == 4
        assert any("disk_size_gb 20" in w.message for w in sb.warnings)
    finally:
        sb.terminate()


def test_what_this_server_cannot_do_is_refused_not_ignored(env: InProcessServer) -> None:
    with pytest.raises(sdk_errors.SandboxError, match="ssh_authorized_keys"):
        Sandbox.create(ssh_authorized_keys=["ssh-ed25519 AAAA test"])
    assert env.plane.sessions.query(env.default_workspace, "CREATING") == []


# -- the network policy (allow_inbound 3, allow_outbound 4, egress 33; the session's 9, 10, 39) --


def test_the_sdks_default_create_has_outbound_and_inbound(sandbox: Sandbox,
                                                          env: InProcessServer) -> None:
    """The SDK sends allow_inbound and allow_outbound true unless told otherwise; this host
    enforces policies (the fake says so), so the session has both."""
    assert (sandbox.info.outbound_enabled, sandbox.info.inbound_enabled) == (True, True)
    assert sandbox.egress.allow_domains == () and sandbox.egress.allow_cidrs == ()
    vm = host(env).vm(sandbox.id)
    assert vm.network == NetworkSpec(EgressPolicy(), inbound=True)
    assert sandbox.warnings == ()


def test_an_allow_list_reaches_the_host_and_comes_back(env: InProcessServer) -> None:
    sb = Sandbox.create(allow_domains=["PyPI.org", "*.example.org"],
                        allow_cidrs=["10.0.0.0/8", "203.0.113.7"], allow_inbound=False)
    try:
        want = NetworkSpec(EgressPolicy(True, ("pypi.org", "*.example.org"),
                                        ("10.0.0.0/8", "203.0.113.7/32")), inbound=False)
        assert host(env).vm(sb.id).network == want
        for info in (sb.info, Client().get(sb.id).info):
            assert info.egress.allow_domains == ("pypi.org", "*.example.org")
            assert info.egress.allow_cidrs == ("10.0.0.0/8", "203.0.113.7/32")
            assert (info.outbound_enabled, info.inbound_enabled) == (True, False)
        assert env.plane.sessions.get(sb.id).egress.allow_cidrs == ["10.0.0.0/8",
                                                                    "203.0.113.7/32"]
    finally:
        sb.terminate()


def test_no_outbound(env: InProcessServer) -> None:
    sb = Sandbox.create(allow_outbound=False)
    try:
        assert sb.info.outbound_enabled is False
        assert host(env).vm(sb.id).network.egress == EgressPolicy(outbound=False)
    finally:
        sb.terminate()


def test_no_outbound_ignores_the_lists_as_the_sdk_documents(env: InProcessServer) -> None:
    """The SDK says allow_domains/allow_cidrs are "ignored when allow_outbound is false", and
    sends them anyway: the session has no outbound at all (stricter than any list), and the
    answer says the lists were ignored."""
    with pytest.warns(Warning, match="egress allow-lists were ignored"):
        sb = Sandbox.create(allow_outbound=False, allow_domains=["pypi.org"])
    try:
        assert sb.info.outbound_enabled is False and sb.info.egress.allow_domains == ()
        assert host(env).vm(sb.id).network.egress == EgressPolicy(outbound=False)
    finally:
        sb.terminate()


@pytest.mark.parametrize(("kw", "words"), [
    ({"allow_domains": ["*.*.example.org"]},
     "egress.allow_domains.0: '*.*.example.org': a wildcard is allowed only as a leading '*.'"),
    ({"allow_domains": ["pypi.org", "203.0.113.7"]},
     "egress.allow_domains.1: '203.0.113.7' is an IP address"),
    ({"allow_cidrs": ["10.0.0.1/8"]}, "egress.allow_cidrs.0: '10.0.0.1/8' has host bits set"),
    ({"allow_cidrs": ["fd00::/8"]}, "egress.allow_cidrs.0: 'fd00::/8' is IPv6"),
    ({"allow_cidrs": [f"10.0.{i}.0/24" for i in range(65)]},
     "egress.allow_cidrs: must have at most 64 networks"),
    # checked even when the lists would be ignored: a mistake is said, not dropped
    ({"allow_outbound": False, "allow_domains": ["bad*.org"]}, "egress.allow_domains.0"),
])
def test_bad_policies_are_invalid_argument_naming_the_field(env: InProcessServer,
                                                            kw: dict[str, Any],
                                                            words: str) -> None:
    with pytest.raises(sdk_errors.SandboxError) as caught:
        Sandbox.create(**kw)
    assert type(caught.value) is sdk_errors.SandboxError  # INVALID_ARGUMENT: no subclass
    assert words in str(caught.value)
    assert env.plane.sessions.query(env.default_workspace, "CREATING") == []


def test_a_restore_gets_its_own_policy(sandbox: Sandbox, env: InProcessServer) -> None:
    snap = sandbox.snapshot(name="net")
    clone = Sandbox.create(snapshot_id=snap.id, allow_cidrs=["192.168.0.0/16"],
                           allow_inbound=False)
    try:
        want = NetworkSpec(EgressPolicy(True, (), ("192.168.0.0/16",)), inbound=False)
        spec = [r for r in host(env).restores if r.session_id == clone.id][-1]
        assert spec.snapshot_id == snap.id and spec.network == want
        assert clone.info.egress.allow_cidrs == ("192.168.0.0/16",)
        assert host(env).vm(sandbox.id).network == NetworkSpec(EgressPolicy(), inbound=True)
    finally:
        clone.terminate()
        Client().snapshots.delete(snap.id)


def test_a_resume_keeps_the_sessions_policy(env: InProcessServer) -> None:
    sb = Sandbox.create(allow_domains=["pypi.org"])
    try:
        sb.pause()
        sb.resume()
        spec = [r for r in host(env).restores if r.session_id == sb.id][-1]
        assert spec.keep_identity
        assert spec.network == NetworkSpec(EgressPolicy(True, ("pypi.org",)), inbound=True)
        assert sb.info.egress.allow_domains == ("pypi.org",)
    finally:
        sb.terminate()


@pytest.fixture
def unenforcing(env: InProcessServer) -> Iterator[FakeHost]:
    """The server's host as one without root or nftables, for one test."""
    h = host(env)
    h.network_enforced = False
    try:
        yield h
    finally:
        h.network_enforced = True


def test_an_unenforcing_host_runs_the_sdks_default_create_without_inbound(
        env: InProcessServer, unenforcing: FakeHost) -> None:
    """The SDKs ask for inbound by default; where ports cannot be exposed the session is made
    without it, as the answer and a warning say, rather than refusing every default create."""
    with pytest.warns(Warning, match="allow_inbound was asked, but this host cannot enforce"):
        sb = Sandbox.create()
    try:
        assert (sb.info.outbound_enabled, sb.info.inbound_enabled) == (True, False)
        assert unenforcing.vm(sb.id).network == NetworkSpec()
    finally:
        sb.terminate()
    quiet = Sandbox.create(allow_inbound=False)  # nothing asked that is not given: no warning
    try:
        assert quiet.warnings == ()
    finally:
        quiet.terminate()


@pytest.mark.parametrize(("kw", "field"), [
    ({"allow_outbound": False}, "allow_outbound"),
    ({"allow_domains": ["pypi.org"]}, "egress.allow_domains"),
    ({"allow_cidrs": ["10.0.0.0/8"]}, "egress.allow_cidrs"),
])
def test_an_unenforcing_host_refuses_what_would_restrict_the_guest(
        env: InProcessServer, unenforcing: FakeHost, kw: dict[str, Any], field: str) -> None:
    with pytest.raises(sdk_errors.InvalidStateError) as caught:  # FAILED_PRECONDITION
        Sandbox.create(**kw)
    assert f"{field}: this host cannot enforce network policies" in str(caught.value)
    assert "root and nftables" in str(caught.value)
    assert env.plane.sessions.query(env.default_workspace, "CREATING") == []


def test_a_blocking_create_snapshot_answers_the_finished_snapshot(sandbox: Sandbox,
                                                                 env: InProcessServer) -> None:
    """``async=false`` (the TypeScript SDK's createSnapshotAndWait): the call returns once the
    capture is done, held here at the host until released."""
    import threading

    gate = host(env).block("capture")
    req = proto.message("CreateSnapshotRequest")(session_id=sandbox.id, name="blocking")
    answer: dict[str, Any] = {}
    call = threading.Thread(target=lambda: answer.update(raw=_raw(
        env, "/tenki.sandbox.v1.SandboxService/CreateSnapshot", req,
        (("authorization", f"Bearer {ADMIN_KEY}"),))))
    call.start()
    gate.wait_entered()
    call.join(0.5)
    assert call.is_alive()  # still waiting for the capture
    gate.release()
    call.join(10)
    snap = proto.message("CreateSnapshotResponse").FromString(answer["raw"]).snapshot
    assert snap.state == proto.enum_value("SnapshotState", "SNAPSHOT_STATE_READY")
    Client().snapshots.delete(snap.id)


def test_rename_a_volume(env: InProcessServer) -> None:
    client = Client()
    vol = client.volumes.create(name="before", size_bytes=1 << 20)
    try:
        assert client.volumes.update(vol.id, name="after").name == "after"
        assert client.volumes.get(vol.id).name == "after"
        with pytest.raises(sdk_errors.SandboxError, match="tags"):
            client.volumes.update(vol.id, tags=["x"])
        with pytest.raises(sdk_errors.SandboxError, match="name"):
            client.volumes.update(vol.id, name="x" * 200)
        with pytest.raises(sdk_errors.VolumeNotFoundError):
            client.volumes.update("vol_doesnotexist0000", name="n")
    finally:
        client.volumes.delete(vol.id)

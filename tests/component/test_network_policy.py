"""A session's network policy (issue 14, the control plane's part), through REST (our SDK over
HTTP, and raw requests), the CLI and the control plane, with the real app and control plane over
SQLite and the fake host below them.

What is proved here: the policy of a create's own request reaches the host in its ``BootSpec``
or ``RestoreSpec`` (a restore of a snapshot, a template's session and a golden restore get their
own create's policy, never the source's; a resume gets its record's), the answer shows it (a
record from before the policy existed shows the defaults), bad values are refused naming the
field, and a host that cannot enforce policies runs only the default one. The host's enforcement
itself is tested with real VMs elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from support.fake_host import FakeHost
from support.helpers import (
    eventually,
    eventually_async,
    fake_manifest,
    now,
    seed,
    session_row,
    snapshot_row,
)
from support.server import InProcessServer, open_test_store

from tenkibox import Client, errors
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.control.plane import ControlPlane
from tenkibox.host.api import EgressPolicy, NetworkSpec
from tenkibox.models import SessionEgress, SessionState
from tenkibox.store.tables import SessionRow, SnapshotRow, WorkspaceRow

S = SessionState
DEFAULT = NetworkSpec()
LISTED = NetworkSpec(EgressPolicy(True, ("pypi.org", "*.example.org"), ("10.0.0.0/8",)), True)


def post(server: InProcessServer, body: dict[str, Any]) -> httpx.Response:
    """``POST /v1/sessions`` as sent, without our SDK's local checks."""
    return httpx.post(f"{server.url}/v1/sessions", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {server.api_key}"})


def vm_calls(host: FakeHost) -> list[tuple[str, str]]:
    """What the host was asked to do to VMs (not the start's recovery)."""
    return [c for c in host.calls if c[0] != "recover"]


def restore_spec(host: FakeHost, session_id: str) -> Any:
    return [r for r in host.restores if r.session_id == session_id][-1]


# -- boot: the policy reaches the host, and the answer shows it ----------------------------------


def test_a_plain_create_has_the_default_policy(client: Client, fake_host: FakeHost,
                                               inproc: InProcessServer) -> None:
    s = client.create_and_wait()
    assert fake_host.vm(s.id).network == DEFAULT
    assert s.egress == SessionEgress(outbound=True, allow_domains=[], allow_cidrs=[])
    assert s.allow_inbound is False
    row = inproc.store.get_session(s.id)
    assert row is not None and NetworkSpec.from_json(row.network) == DEFAULT


def test_an_allow_list_reaches_the_boot_and_the_answer(client: Client,
                                                       fake_host: FakeHost) -> None:
    s = client.create_and_wait(allow_domains=["PyPI.org.", "*.Example.org"],
                               allow_cidrs=["10.0.0.0/8"], allow_inbound=True)
    assert fake_host.calls_to("boot") == [s.id]
    assert fake_host.vm(s.id).network == LISTED
    assert s.egress.outbound is True
    assert s.egress.allow_domains == ["pypi.org", "*.example.org"]  # as normalised
    assert s.egress.allow_cidrs == ["10.0.0.0/8"] and s.allow_inbound is True
    again = client.get(s.id).record  # read back from the record
    assert again.egress == s.egress and again.allow_inbound
    assert [x.record.egress for x in client.list()] == [s.egress]


def test_no_outbound_reaches_the_boot(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(allow_outbound=False)
    assert fake_host.vm(s.id).network == NetworkSpec(EgressPolicy(outbound=False), False)
    assert s.egress == SessionEgress(outbound=False)


def test_the_rest_body_is_the_policy(inproc: InProcessServer, fake_host: FakeHost) -> None:
    r = post(inproc, {"allow_outbound": False, "allow_inbound": True})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["allow_inbound"] is True
    assert body["egress"] == {"outbound": False, "allow_domains": [], "allow_cidrs": []}
    eventually(lambda: fake_host.has_vm(body["id"]), what="the boot")
    assert fake_host.vm(body["id"]).network == NetworkSpec(EgressPolicy(False), True)


def test_a_record_from_before_the_policy_shows_the_defaults(client: Client,
                                                            inproc: InProcessServer) -> None:
    row = session_row("READY", workspace_id=inproc.default_workspace)
    assert row.network is None
    seed(inproc.store, row)
    got = client.get(row.id).record
    assert got.egress == SessionEgress(outbound=True, allow_domains=[], allow_cidrs=[])
    assert got.allow_inbound is False
    raw = httpx.get(f"{inproc.url}/v1/sessions/{row.id}", timeout=10,
                    headers={"Authorization": f"Bearer {inproc.api_key}"}).json()
    assert raw["egress"] == {"outbound": True, "allow_domains": [], "allow_cidrs": []}
    assert raw["allow_inbound"] is False


# -- bad values: 422 naming the field, nothing created --------------------------------------------


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"egress": {"allow_domains": ["*.*.example.org"]}}, "egress.allow_domains.0",
     "a wildcard is allowed only as a leading '*.'"),
    ({"egress": {"allow_domains": ["pypi.org", "203.0.113.7"]}}, "egress.allow_domains.1",
     "put it in allow_cidrs (203.0.113.7/32)"),
    ({"egress": {"allow_domains": ["h.org"] * 257}}, "egress.allow_domains",
     "at most 256 names, got 257"),
    ({"egress": {"allow_cidrs": ["10.0.0.1/8"]}}, "egress.allow_cidrs.0",
     "'10.0.0.1/8' has host bits set"),
    ({"egress": {"allow_cidrs": ["2001:db8::/32"]}}, "egress.allow_cidrs.0",
     "guests have no IPv6"),
    ({"egress": {"allow_cidrs": ["10.0.0.0/8"] * 65}}, "egress.allow_cidrs",
     "at most 64 networks"),
    ({"allow_outbound": False, "egress": {"allow_domains": ["pypi.org"]}}, "egress",
     "an allow-list needs outbound access"),
])
def test_bad_policies_are_refused_naming_the_field(inproc: InProcessServer, fake_host: FakeHost,
                                                  body: dict[str, Any], field: str,
                                                  words: str) -> None:
    r = post(inproc, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("ValidationError", field)
    assert words in err["message"] and err["message"].startswith(field + ": ")
    assert inproc.store.all(SessionRow) == [] and vm_calls(fake_host) == []


def test_our_sdk_refuses_before_sending(client: Client, inproc: InProcessServer) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        client.create(allow_cidrs=["10.0.0.1/8"])
    assert caught.value.field == "egress.allow_cidrs.0"
    with pytest.raises(errors.ValidationError) as caught:
        client.create(allow_outbound=False, allow_domains=["pypi.org"])
    assert caught.value.field == "egress"
    assert inproc.requests.to("POST", "/v1/sessions") == []


# -- restores, templates, golden snapshots: each session its own create's policy ------------------


def test_a_restore_gets_its_own_policy_not_the_sources(client: Client,
                                                       fake_host: FakeHost) -> None:
    source = client.create_and_wait(allow_domains=["pypi.org"], allow_inbound=True)
    snap = client.create_snapshot_and_wait(source.id, "s")
    clone = client.restore_snapshot(snap.id, allow_cidrs=["192.168.0.0/16"], timeout=5)
    want = NetworkSpec(EgressPolicy(True, (), ("192.168.0.0/16",)), False)
    spec = restore_spec(fake_host, clone.id)
    assert spec.snapshot_id == snap.id and not spec.keep_identity
    assert spec.network == want and fake_host.vm(clone.id).network == want
    assert clone.egress.allow_cidrs == ["192.168.0.0/16"] and clone.egress.allow_domains == []
    assert clone.allow_inbound is False
    # a plain restore is the default policy, whatever the source had
    plain = client.create_and_wait(snapshot_id=snap.id)
    assert restore_spec(fake_host, plain.id).network == DEFAULT
    assert plain.egress == SessionEgress() and not plain.allow_inbound
    # and the source keeps its own
    assert fake_host.vm(source.id).network == NetworkSpec(EgressPolicy(True, ("pypi.org",)),
                                                          True)


def test_a_templates_session_gets_its_own_policy(client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("net", memory_mb=512)
    build = client.wait_build(t.id, client.build_template(t.id).id, timeout=20)
    assert build.snapshot_id is not None
    # the build session had the default policy (it installs packages)
    assert all(fake_host.vms[s].network == DEFAULT for s in fake_host.vms)
    s = client.create_and_wait(template_id=t.id, allow_outbound=False)
    spec = restore_spec(fake_host, s.id)
    assert spec.snapshot_id == build.snapshot_id
    assert spec.network == NetworkSpec(EgressPolicy(outbound=False), False)
    assert s.egress.outbound is False


def test_a_golden_restore_gets_the_creates_policy(client: Client, fake_host: FakeHost,
                                                  inproc: InProcessServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_GOLDEN", "on")
    first = client.create_and_wait(cpu=1, memory_mb=512)  # boots; the golden build follows
    assert fake_host.vm(first.id).network == DEFAULT
    eventually(lambda: any((r.template_id or "").startswith("golden:") and r.state == "READY"
                           for r in inproc.store.all(SnapshotRow)),
               timeout=10, what="the golden snapshot")
    s = client.create_and_wait(cpu=1, memory_mb=512, allow_domains=["*.example.org"])
    spec = restore_spec(fake_host, s.id)  # a restore of the golden snapshot
    assert spec.network == NetworkSpec(EgressPolicy(True, ("*.example.org",)), False)


# -- pause and resume: the record's own policy ---------------------------------------------------


def test_a_resume_restores_with_the_records_policy(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(allow_cidrs=["203.0.113.0/24"], allow_inbound=True)
    want = NetworkSpec(EgressPolicy(True, (), ("203.0.113.0/24",)), True)
    client.pause(s.id)
    assert not fake_host.has_vm(s.id)
    assert client.resume(s.id).state == S.READY
    spec = restore_spec(fake_host, s.id)
    assert spec.keep_identity and spec.network == want
    assert fake_host.vm(s.id).network == want
    assert client.get(s.id).record.egress.allow_cidrs == ["203.0.113.0/24"]


# -- a host that cannot enforce policies: only the default policy runs ----------------------------


@pytest.mark.parametrize(("kw", "field", "words"), [
    ({"allow_outbound": False}, "allow_outbound", "turn outbound access off"),
    ({"allow_domains": ["pypi.org"]}, "egress.allow_domains", "restrict outbound access"),
    ({"allow_cidrs": ["10.0.0.0/8"]}, "egress.allow_cidrs", "restrict outbound access"),
    ({"allow_inbound": True}, "allow_inbound", "allow inbound access"),
])
def test_an_unenforcing_host_refuses_any_policy_but_the_default(
        client: Client, fake_host: FakeHost, inproc: InProcessServer,
        monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], field: str, words: str) -> None:
    monkeypatch.setenv("TENKI_GOLDEN", "on")  # no golden build is started for a refused create
    fake_host.network_enforced = False
    with pytest.raises(errors.NetworkPolicyUnsupportedError) as caught:
        client.create(**kw)
    assert caught.value.field == field
    assert isinstance(caught.value, errors.ValidationError)
    message = str(caught.value)
    assert message.startswith(f"{field}: this host cannot enforce network policies")
    assert "root and nftables" in message and words in message
    assert inproc.store.all(SessionRow) == [] and vm_calls(fake_host) == []
    assert inproc.plane.golden.building() == []
    # the answer on the wire: 422, its own code, the field
    r = post(inproc, json.loads(inproc.requests.to("POST", "/v1/sessions")[-1].body))
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "NetworkPolicyUnsupported"
    assert r.json()["error"]["field"] == field
    # the default policy runs
    s = client.create_and_wait(cold_boot=True)
    assert fake_host.vm(s.id).network == DEFAULT


def test_a_restore_on_an_unenforcing_host_takes_no_policy_from_its_source(
        client: Client, fake_host: FakeHost) -> None:
    source = client.create_and_wait(allow_outbound=False)
    snap = client.create_snapshot_and_wait(source.id, "s")
    fake_host.network_enforced = False
    with pytest.raises(errors.NetworkPolicyUnsupportedError):
        client.create(snapshot_id=snap.id, allow_domains=["pypi.org"])
    clone = client.restore_snapshot(snap.id, timeout=5)  # the default policy: runs
    assert restore_spec(fake_host, clone.id).network == DEFAULT


def test_a_paused_policy_is_not_resumed_where_it_cannot_be_enforced(
        client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(allow_domains=["pypi.org"])
    client.pause(s.id)
    restores = len(fake_host.restores)
    fake_host.network_enforced = False  # e.g. the server restarted without root
    with pytest.raises(errors.NetworkPolicyUnsupportedError) as caught:
        client.resume(s.id)
    assert caught.value.field == "egress.allow_domains"
    assert f"session {s.id} cannot be resumed" in str(caught.value)
    assert client.get(s.id).state == S.PAUSED and len(fake_host.restores) == restores
    fake_host.network_enforced = True
    assert client.resume(s.id).state == S.READY
    assert restore_spec(fake_host, s.id).network.egress.allow_domains == ("pypi.org",)
    # a session with the default policy resumes on such a host
    plain = client.create_and_wait()
    client.pause(plain.id)
    fake_host.network_enforced = False
    assert client.resume(plain.id).state == S.READY


async def test_a_resume_tried_again_after_a_restart_checks_the_policy_too(
        tmp_path: Path) -> None:
    """A server restarted (without root) while resuming: a RESUMING session with a policy is
    not restored unenforced (it ends FAILED; its PAUSE snapshot is kept), one with the
    default policy is resumed."""
    store = open_test_store(tmp_path / "home")
    host = FakeHost()
    host.network_enforced = False
    m = fake_manifest("paused")
    for d in m.digests():
        host.artifacts[d] = time.monotonic()
    ws = "ws_test"
    seed(store, WorkspaceRow(id=ws, name="test", quotas={}, created_at=now(), updated_at=now()))
    listed = session_row("RESUMING", workspace_id=ws, network=LISTED.to_json())
    plain = session_row("RESUMING", workspace_id=ws, network=DEFAULT.to_json())
    for row in (listed, plain):
        seed(store, row)
        seed(store, snapshot_row("READY", row.id, manifest=m, type="PAUSE", workspace_id=ws))
    plane = ControlPlane(store, host)
    await plane.start()
    try:
        def state(sid: str) -> str:
            row = store.get_session(sid)
            assert row is not None
            return row.state

        await eventually_async(lambda: state(plain.id) == "READY", what="the plain resume")
        await eventually_async(lambda: state(listed.id) == "FAILED", what="the refusal")
        reason = (store.get_session(listed.id) or SessionRow()).state_reason or ""
        assert "resume failed" in reason and "cannot enforce network policies" in reason
        assert [r.session_id for r in host.restores] == [plain.id]
        assert host.restores[0].network == DEFAULT
        pause_snaps = [s for s in store.all(SnapshotRow) if s.session_id == listed.id]
        assert [s.state for s in pause_snaps] == ["READY"]  # kept, to restore elsewhere
    finally:
        await plane.stop()


# -- the CLI -------------------------------------------------------------------------------------

Run = Callable[..., Result]


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), obj=CliState())

    return invoke


def test_cli_create_with_a_policy_and_get_shows_it(run: Run, inproc: InProcessServer,
                                                   fake_host: FakeHost) -> None:
    result = run("sandbox", "create", "--allow-domain", "PyPI.org", "--allow-domain",
                 "*.example.org", "--allow-cidr", "10.0.0.0/8", "--allow-inbound")
    assert result.exit_code == 0, result.output
    sid = result.stdout.strip()
    body = json.loads(inproc.requests.to("POST", "/v1/sessions")[0].body)
    assert body == {"allow_inbound": True, "egress": {
        "allow_domains": ["pypi.org", "*.example.org"], "allow_cidrs": ["10.0.0.0/8"]}}
    assert fake_host.vm(sid).network == LISTED
    out = run("sandbox", "get", sid).stdout
    assert "egress:        only pypi.org, *.example.org, 10.0.0.0/8\n" in out
    assert "inbound:       allowed\n" in out
    record = json.loads(run("sandbox", "get", sid, "--json").stdout)
    assert record["egress"] == {"outbound": True, "allow_domains": ["pypi.org", "*.example.org"],
                                "allow_cidrs": ["10.0.0.0/8"]}
    assert record["allow_inbound"] is True
    header, row = run("sandbox", "list").stdout.splitlines()
    assert header.split()[-2:] == ["NETWORK", "CREATED"]
    assert row.split()[-2] == "allow:3+in"
    assert json.loads(run("sandbox", "list", "--json").stdout)[0]["egress"] == record["egress"]


def test_cli_no_outbound_and_the_default(run: Run, fake_host: FakeHost) -> None:
    off = run("sandbox", "create", "--no-outbound").stdout.strip()
    assert fake_host.vm(off).network == NetworkSpec(EgressPolicy(outbound=False), False)
    out = run("sandbox", "get", off).stdout
    assert "egress:        none (no outbound connections)\n" in out
    assert "inbound:       off\n" in out
    plain = run("sandbox", "create").stdout.strip()
    assert "egress:        public addresses\n" in run("sandbox", "get", plain).stdout
    rows = {line.split()[0]: line.split() for line in run("sandbox", "list").stdout.splitlines()}
    assert rows["ID"][-2] == "NETWORK"
    assert (rows[off][-2], rows[plain][-2]) == ("none", "open")


@pytest.mark.parametrize(("args", "message"), [
    (["--allow-domain", "*.*.org"],
     "error: --allow-domain: '*.*.org': a wildcard is allowed only as a leading '*.'"),
    (["--allow-domain", "10.1.2.3"], "error: --allow-domain: '10.1.2.3' is an IP address"),
    (["--allow-cidr", "10.0.0.1/8"], "error: --allow-cidr: '10.0.0.1/8' has host bits set"),
    (["--allow-cidr", "fd00::/8"], "error: --allow-cidr: 'fd00::/8' is IPv6: guests have no "
     "IPv6"),
    (["--no-outbound", "--allow-domain", "pypi.org"],
     "error: --no-outbound: an allow-list (--allow-domain, --allow-cidr) needs outbound access"),
])
def test_cli_bad_policies_are_one_line_naming_the_flag(run: Run, inproc: InProcessServer,
                                                       args: list[str], message: str) -> None:
    result = run("sandbox", "create", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert inproc.requests == []


def test_cli_restore_takes_its_own_policy(run: Run, client: Client, fake_host: FakeHost) -> None:
    source = client.create_and_wait(allow_domains=["pypi.org"])
    snap = client.create_snapshot_and_wait(source.id, "s")
    result = run("sandbox", "snapshot", "restore", snap.id, "--no-outbound")
    assert result.exit_code == 0, result.output
    clone = result.stdout.strip()
    assert restore_spec(fake_host, clone).network == NetworkSpec(EgressPolicy(False), False)


def test_cli_on_an_unenforcing_host(run: Run, fake_host: FakeHost) -> None:
    fake_host.network_enforced = False
    result = run("sandbox", "create", "--allow-inbound")
    assert result.exit_code == 2  # refused as the request is (a 422), like bad input
    assert result.stderr.startswith("error: allow_inbound: this host cannot enforce network "
                                    "policies (the server needs root and nftables)")
    assert vm_calls(fake_host) == []

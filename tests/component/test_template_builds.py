"""Template builds over the fake host: a build of an unchanged template on an unchanged base
reuses the last READY build; a spec template keeps its spec; the golden snapshot is the
template's."""

from __future__ import annotations

import pytest
from support.helpers import build_row, seed
from support.server import InProcessServer

from tenkibox import Client, errors
from tenkibox.models import TemplateBuild
from tenkibox.store.tables import BuildRow


def ready(client: Client, b: TemplateBuild) -> TemplateBuild:
    return client.wait_build(b.template_id, b.id, timeout=20)


def test_an_unchanged_template_reuses_its_build(client: Client) -> None:
    t = client.create_template("reuse", memory_mb=512, env={"A": "1"})
    first = ready(client, client.build_template(t.id))
    assert first.state.value == "READY"
    again = client.build_template(t.id)
    assert again.id == first.id and again.state.value == "READY"
    assert [b.id for b in client.list_builds(t.id)] == [first.id]
    client.update_template(t.id, env={"A": "2"})
    changed = ready(client, client.build_template(t.id))
    assert changed.id != first.id and changed.version == 2
    # the old golden snapshot went with the new build
    with pytest.raises(errors.ConflictError):
        client.delete_snapshot(changed.snapshot_id or "")


def test_a_spec_template(client: Client) -> None:
    t = client.create_template("from-spec", spec={
        "spec_version": "tenki.template.v1", "env": {"A": "1"},
        "runtime": {"env": {"B": "2"}}, "resources": {"cpu": 1, "memory_mb": 512},
        "tags": ["x"]})
    assert t.spec is not None and t.spec.spec_version == "tenki.template.v1"
    assert (t.env, t.cpu, t.memory_mb, t.tags) == ({"A": "1", "B": "2"}, 1, 512, ["x"])
    b = ready(client, client.build_template(t.id))
    assert b.state.value == "READY"
    s = client.create_and_wait(template_id=t.id)
    assert s.record.template_id == t.id and s.record.env_keys == ["A", "B"]
    # changing a field drops the spec it came from
    assert client.update_template(t.id, env={"C": "3"}).spec is None
    with pytest.raises(errors.ValidationError, match="steps\\[0\\]"):
        client.create_template("bad", spec={"spec_version": "tenki.template.v1",
                                            "steps": [{}]})


def test_a_deleted_template_takes_a_build_no_job_runs(client: Client,
                                                      inproc: InProcessServer) -> None:
    """A build row in progress with no job in this server (its task not started yet) ends
    FAILED first, so that it goes with its template (a build row is deleted only once ended)."""
    t = client.create_template("orphan")
    seed(inproc.store, build_row("PENDING", template_id=t.id,
                                 workspace_id=inproc.default_workspace))
    with pytest.raises(errors.ConflictError, match="build in progress"):
        client.delete_template(t.id)
    client.delete_template(t.id, force=True)
    assert inproc.plane.records.all(BuildRow, BuildRow.template_id == t.id) == []

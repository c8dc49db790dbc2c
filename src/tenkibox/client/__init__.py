"""The tenki Python SDK: :class:`Client` (sync) and :class:`AsyncClient` (async).

from tenkibox import Client

with Client() as client, client.create_and_wait(name="box") as session:
    print(session.exec("uname", "-a").check().stdout)
    snap = session.snapshot("baseline")
    restored = client.restore_snapshot(snap.id, name="copy")
"""

from ._async import (
    AsyncApiKeys,
    AsyncAudit,
    AsyncClient,
    AsyncFiles,
    AsyncHost,
    AsyncProcess,
    AsyncSession,
    AsyncSessions,
    AsyncSnapshots,
    AsyncTemplates,
    AsyncVolumes,
    AsyncWorkspaces,
)
from ._core import (
    DEFAULT_BUILD_TIMEOUT,
    DEFAULT_CREATE_TIMEOUT,
    DEFAULT_SNAPSHOT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ExecResult,
    Stream,
    parse_volume_spec,
)
from ._local import LocalKey, LocalServer, local_key, local_server
from ._sync import (
    ApiKeys,
    Audit,
    Client,
    Files,
    Host,
    Process,
    Session,
    Sessions,
    Snapshots,
    Templates,
    Volumes,
    Workspaces,
)

__all__ = [
    "DEFAULT_BUILD_TIMEOUT",
    "DEFAULT_CREATE_TIMEOUT",
    "DEFAULT_SNAPSHOT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ApiKeys",
    "AsyncApiKeys",
    "AsyncAudit",
    "AsyncClient",
    "AsyncFiles",
    "AsyncHost",
    "AsyncProcess",
    "AsyncSession",
    "AsyncSessions",
    "AsyncSnapshots",
    "AsyncTemplates",
    "AsyncVolumes",
    "AsyncWorkspaces",
    "Audit",
    "Client",
    "ExecResult",
    "Files",
    "Host",
    "LocalKey",
    "LocalServer",
    "Process",
    "Session",
    "Sessions",
    "Snapshots",
    "Stream",
    "Templates",
    "Volumes",
    "Workspaces",
    "local_key",
    "local_server",
    "parse_volume_spec",
]

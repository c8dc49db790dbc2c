"""The tenki Python SDK: :class:`Client` (sync) and :class:`AsyncClient` (async).

from tenkibox import Client

with Client() as client, client.create_and_wait(name="box") as session:
    print(session.exec("uname", "-a").check().stdout)
    snap = session.snapshot("baseline")
    restored = client.restore_snapshot(snap.id, name="copy")
"""

from ._async import (
    AsyncClient,
    AsyncFiles,
    AsyncProcess,
    AsyncSession,
    AsyncSessions,
    AsyncSnapshots,
    AsyncVolumes,
)
from ._core import (
    DEFAULT_CREATE_TIMEOUT,
    DEFAULT_SNAPSHOT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ExecResult,
    Stream,
    parse_volume_spec,
)
from ._local import LocalServer, local_server
from ._sync import Client, Files, Process, Session, Sessions, Snapshots, Volumes

__all__ = [
    "DEFAULT_CREATE_TIMEOUT",
    "DEFAULT_SNAPSHOT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncSession",
    "AsyncSessions",
    "AsyncSnapshots",
    "AsyncVolumes",
    "Client",
    "ExecResult",
    "Files",
    "LocalServer",
    "Process",
    "Session",
    "Sessions",
    "Snapshots",
    "Stream",
    "Volumes",
    "local_server",
    "parse_volume_spec",
]

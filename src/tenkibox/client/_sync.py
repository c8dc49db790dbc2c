"""The synchronous client: :class:`Client`, :class:`Session`, :class:`Process`, :class:`Files`."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx

from .. import errors, models
from . import _core, _local
from ._core import ExecResult, Stream

T = TypeVar("T")


class Client:
    """A client of the tenki server (synchronous).

    ``endpoint``: the server URL; default ``$TENKI_API_ENDPOINT``, else the local server of
    ``$TENKI_HOME`` (started in the background when none answers). ``api_key``: sent as
    ``Authorization: Bearer``; default ``$TENKI_API_KEY``, else, for the local server only, the
    admin key in ``$TENKI_HOME/admin.key``. ``timeout``: seconds per HTTP request
    (None: no limit); waits and streams extend it as needed. ``transport``: an httpx transport
    (for tests, e.g. ``httpx.MockTransport``). ``autostart``: start a local server when needed.

    The server is resolved on the first call, not here. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        api_key: str | None = None,
        timeout: float | None = _core.DEFAULT_TIMEOUT,
        *,
        transport: httpx.BaseTransport | None = None,
        autostart: bool = True,
    ) -> None:
        self._endpoint = _local.configured_endpoint(endpoint)
        self._api_key = _local.resolve_api_key(api_key)
        self._timeout = timeout
        self._transport = transport
        self._autostart = autostart
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.sessions = Sessions(self)
        self.snapshots = Snapshots(self)
        self.volumes = Volumes(self)
        self.workspaces = Workspaces(self)
        self.api_keys = ApiKeys(self)
        self.audit = Audit(self)
        self.host = Host(self)
        self.hosts = Hosts(self)
        self.templates = Templates(self)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str | None:
        """The server URL, once resolved (None before the first call when it is local)."""
        return self._endpoint

    def _client(self) -> httpx.Client:
        if self._http is not None:
            return self._http
        with self._lock:
            if self._closed:
                raise errors.ConnectionError("the client is closed")
            if self._http is None:
                url = self._endpoint
                if url is None:
                    # the local server: its key file is read now (it appears on its first start)
                    url, self._api_key = _local.resolve(None, self._api_key, self._autostart)
                self._endpoint = url
                self._http = httpx.Client(
                    base_url=url,
                    headers=_local.auth_headers(self._api_key),
                    timeout=self._timeout,
                    transport=self._transport,
                )
            return self._http

    def _call(self, call: _core.Call[T]) -> T:
        http = self._client()
        try:
            resp = http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                content=call.content,
                timeout=_core.request_timeout(self._timeout, call),
            )
        except httpx.HTTPError as exc:
            raise _core.transport_error(exc, str(http.base_url)) from exc
        return _core.parse_response(call, resp)

    def _run(self, flow: _core.Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                call = flow.send(self._call(call))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _stream(
        self,
        path: str,
        params: Mapping[str, str | int] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        http = self._client()
        try:
            request = http.build_request(
                "GET", path, params=params, timeout=timeout or _core.stream_timeout(self._timeout)
            )
            resp = http.send(request, stream=True)
            if not resp.is_success:
                resp.read()
                resp.close()
                raise _core.error_from_response(resp)
        except httpx.HTTPError as exc:
            raise _core.transport_error(exc, str(http.base_url)) from exc
        return resp

    def close(self) -> None:
        """Close the connections. Sessions keep running on the server."""
        with self._lock:
            self._closed = True
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(endpoint={self._endpoint or 'local'!r})"

    # -- server ---------------------------------------------------------------------------

    def health(self) -> models.ServerInfo:
        """The server's version, pid and accelerator, and to an admin key its data directory
        (``GET /v1/health``)."""
        return self._call(_core.health())

    def verify_store(self, repair: bool = False) -> models.StoreReport:
        """Re-read every stored artifact against its digest and list unowned files;
        ``repair`` marks damaged snapshots FAILED and removes unowned files."""
        return self._call(_core.verify_store(repair))

    def list_images(self) -> builtins.list[models.Image]:
        """The base images the server can boot (sizes in bytes)."""
        return self._call(_core.list_images())

    def shutdown_server(self, wait: bool = True, timeout: float | None = 30.0) -> None:
        """Ask the server to stop; its VMs keep running and a new server adopts them.

        With ``wait``, return once it no longer answers and (local server) its process is gone,
        waiting at most ``timeout`` seconds (WaitTimeoutError after that).
        """
        info = self.health()
        self._call(_core.shutdown_server())
        if not wait:
            return
        url = str(self._endpoint)
        local = _local.local_server(None, self._api_key)
        same_host = local is not None and local.url == url and local.pid == info.pid
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            answering = _local.probe(url, self._api_key, timeout=1.0) is not None
            if not answering and (not same_host or _local.process_gone(info.pid)):
                return
            time.sleep(0.1)
        raise errors.WaitTimeoutError(
            f"the server (pid {info.pid}) is still running after "
            f"{_core.format_duration(timeout or 0)}"
        )

    # -- sessions -------------------------------------------------------------------------

    def create(
        self,
        name: str | None = None,
        snapshot_id: str | None = None,
        cpu: int | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        volumes: Iterable[models.VolumeMount | str] | None = None,
        max_duration: float | str | None = None,
        base_image_id: str | None = None,
        *,
        template_id: str | None = None,
        cold_boot: bool = False,
        allow_outbound: bool = True,
        allow_inbound: bool = False,
        allow_domains: Iterable[str] | None = None,
        allow_cidrs: Iterable[str] | None = None,
        host_id: str | None = None,
    ) -> Session:
        """Start creating a session and return at once (state CREATING).

        ``cpu``: vCPUs (1-16, default 2); ``memory_mb``: MiB (512-65536, default 4096);
        ``env``/``metadata``: string maps; ``volumes``: :class:`VolumeMount` or
        ``"vol_x:/path[:ro]"``; ``max_duration``: seconds or ``"30m"``, after which the session
        is terminated; ``snapshot_id``: restore that snapshot instead of booting;
        ``base_image_id``: the image to boot (default ``sandbox``); ``template_id``: start from
        the template's latest READY build (its golden snapshot); ``cold_boot``: boot the image
        instead of restoring its golden snapshot (the server's default for a plain create).
        Unset values take the server's defaults (a restore takes the snapshot's cpu and
        memory).

        The network policy, fixed at create (a restore gets this create's, not the
        snapshot's): ``allow_outbound=False``: no connection out at all; ``allow_domains``
        (``"pypi.org"``, ``"*.example.org"``) and/or ``allow_cidrs`` (IPv4, ``"10.0.0.0/8"``):
        only these, DNS included; ``allow_inbound``: ports may be exposed. Anything but the
        default needs a server that enforces policies (else NetworkPolicyUnsupportedError).
        The record shows it: ``session.egress``, ``session.allow_inbound``.
        """
        body = _core.session_create(
            name=name,
            snapshot_id=snapshot_id,
            cpu=cpu,
            memory_mb=memory_mb,
            env=env,
            metadata=metadata,
            volumes=volumes,
            max_duration=max_duration,
            base_image_id=base_image_id,
            template_id=template_id,
            cold_boot=cold_boot,
            allow_outbound=allow_outbound,
            allow_inbound=allow_inbound,
            allow_domains=allow_domains,
            allow_cidrs=allow_cidrs,
            host_id=host_id,
        )
        return Session(self, self._call(_core.create_session(body)))

    def create_and_wait(
        self,
        name: str | None = None,
        snapshot_id: str | None = None,
        cpu: int | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        volumes: Iterable[models.VolumeMount | str] | None = None,
        max_duration: float | str | None = None,
        base_image_id: str | None = None,
        timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT,
        *,
        template_id: str | None = None,
        cold_boot: bool = False,
        allow_outbound: bool = True,
        allow_inbound: bool = False,
        allow_domains: Iterable[str] | None = None,
        allow_cidrs: Iterable[str] | None = None,
        host_id: str | None = None,
    ) -> Session:
        """:meth:`create`, then wait up to ``timeout`` seconds (None: no limit) until it runs.

        Raises SessionFailedError (with the server's reason) when it failed, and
        WaitTimeoutError when it is still CREATING after ``timeout`` (it goes on).
        """
        body = _core.session_create(
            name=name,
            snapshot_id=snapshot_id,
            cpu=cpu,
            memory_mb=memory_mb,
            env=env,
            metadata=metadata,
            volumes=volumes,
            max_duration=max_duration,
            base_image_id=base_image_id,
            template_id=template_id,
            cold_boot=cold_boot,
            allow_outbound=allow_outbound,
            allow_inbound=allow_inbound,
            allow_domains=allow_domains,
            allow_cidrs=allow_cidrs,
            host_id=host_id,
        )
        return Session(self, self._run(_core.create_and_wait_flow(body, timeout)))

    def get(self, session_id: str) -> Session:
        """The session ``session_id`` (SessionNotFoundError when there is none)."""
        return Session(self, self._call(_core.get_session(session_id)))

    def list(self, state: models.SessionState | str | None = None) -> builtins.list[Session]:
        """All sessions, or those in ``state`` (e.g. ``"RUNNING"``)."""
        return [Session(self, r) for r in self._call(_core.list_sessions(state))]

    def wait_session_ready(
        self, session_id: str, timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT
    ) -> Session:
        """Wait up to ``timeout`` seconds until the session left CREATING; see create_and_wait."""
        return Session(self, self._run(_core.wait_session_flow(session_id, timeout)))

    def terminate(self, session_id: str) -> Session:
        """Terminate the session (idempotent); its VM is stopped and its disk removed."""
        return Session(self, self._call(_core.terminate_session(session_id)))

    def pause(
        self,
        session_id: str,
        wait: bool = True,
        timeout: float | None = _core.DEFAULT_SNAPSHOT_TIMEOUT,
    ) -> Session:
        """Pause the session: its memory and disk go into a snapshot of type PAUSE and its VM
        is stopped (a paused session counts against no session or memory quota). Idempotent.

        With ``wait``, wait up to ``timeout`` seconds until it is PAUSED: SnapshotFailedError
        if the capture failed (the session runs on, READY, the reason in ``state_reason``),
        WaitTimeoutError if it is still PAUSING (it goes on). ``wait=False``: returns PAUSING.
        """
        return Session(self, self._run(_core.pause_flow(session_id, wait, timeout)))

    def resume(
        self,
        session_id: str,
        wait: bool = True,
        timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT,
    ) -> Session:
        """Resume a PAUSED session under the same id: its processes keep their PIDs, its clock
        is set. Quotas and the host's capacity are checked again (QuotaExceededError,
        CapacityUnavailableError: it stays PAUSED). Idempotent.

        With ``wait``, wait up to ``timeout`` seconds until it runs: SessionFailedError if the
        restore failed (the session is FAILED). ``wait=False``: returns RESUMING.
        """
        return Session(self, self._run(_core.resume_flow(session_id, wait, timeout)))

    def attach_volume(
        self, session_id: str, volume_id: str, path: str, read_only: bool = False
    ) -> Session:
        """Attach a volume to a running session, mounted at the absolute ``path``."""
        body = _core.build(models.VolumeAttach, volume_id=volume_id, path=path, read_only=read_only)
        return Session(self, self._call(_core.attach_volume(session_id, body)))

    def detach_volume(self, session_id: str, volume_id: str) -> Session:
        """Unmount and detach a volume from a session; its data stays in the volume."""
        return Session(self, self._call(_core.detach_volume(session_id, volume_id)))

    def update_session(
        self,
        session_id: str,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Session:
        """Rename a session and/or replace its metadata (the whole map; ``{}`` empties it).
        Only what is given changes. ConflictError once the session is over (FAILED,
        TERMINATING, TERMINATED).
        """
        body = _core.session_update(name, metadata)
        return Session(self, self._call(_core.update_session(session_id, body)))

    def extend_session(self, session_id: str, seconds: float | str) -> Session:
        """Move the session's expiry ``seconds`` later (a number, or a duration such as
        ``"1h"``); a session without an expiry gets one ``seconds`` from now. ConflictError
        once the session is over.
        """
        body = _core.session_extend(seconds)
        return Session(self, self._call(_core.extend_session(session_id, body)))

    # -- exposed ports --------------------------------------------------------------------

    def expose_port(
        self, session_id: str, port: int, ttl: float | str | None = None
    ) -> models.PortExposure:
        """Make ``port`` of a running session's guest reachable at the returned ``url``
        (served by the server's preview proxy; the URL's token, or an API key of the
        workspace, lets requests in). ``ttl``: seconds or a duration such as ``"1h"`` (none:
        until unexposed or the session stops running). An exposed port is answered as it is
        (its expiry moved if ``ttl`` is given). ConflictError "inbound access is disabled"
        for a session created without inbound access; QuotaExceededError past 16 ports.
        """
        body = _core.port_expose(port, ttl)
        return self._call(_core.expose_port(session_id, body))

    def list_ports(self, session_id: str) -> builtins.list[models.PortExposure]:
        """The session's exposed ports."""
        return self._call(_core.list_ports(session_id))

    def unexpose_port(self, session_id: str, port: int) -> None:
        """Close an exposed port: its URL stops working and live connections are cut
        (NotFoundError if it is not exposed)."""
        self._call(_core.unexpose_port(session_id, port))

    # -- snapshots ------------------------------------------------------------------------

    def create_snapshot(
        self, session_id: str, name: str | None = None, expires_at: datetime | str | None = None
    ) -> models.Snapshot:
        """Start capturing a snapshot (memory + disk) of a session; returns it CREATING.

        ``expires_at``: an aware datetime or RFC 3339 string after which it is deleted.
        """
        body = _core.snapshot_create(session_id, name, expires_at)
        return self._run(_core.create_snapshot_flow(body, False, None))

    def create_snapshot_and_wait(
        self,
        session_id: str,
        name: str | None = None,
        expires_at: datetime | str | None = None,
        timeout: float | None = _core.DEFAULT_SNAPSHOT_TIMEOUT,
    ) -> models.Snapshot:
        """:meth:`create_snapshot`, then :meth:`wait_snapshot_ready` (``timeout`` seconds)."""
        body = _core.snapshot_create(session_id, name, expires_at)
        return self._run(_core.create_snapshot_flow(body, True, timeout))

    def get_snapshot(self, snapshot_id: str) -> models.Snapshot:
        """The snapshot ``snapshot_id`` (SnapshotNotFoundError when there is none)."""
        return self._call(_core.get_snapshot(snapshot_id))

    def list_snapshots(self, session_id: str | None = None) -> builtins.list[models.Snapshot]:
        """All snapshots not deleted, or those of ``session_id``."""
        return self._call(_core.list_snapshots(session_id))

    def wait_snapshot_ready(
        self, snapshot_id: str, timeout: float | None = _core.DEFAULT_SNAPSHOT_TIMEOUT
    ) -> models.Snapshot:
        """Wait up to ``timeout`` seconds (None: no limit) until the snapshot is READY.

        Raises SnapshotFailedError (with the reason) when it FAILED or is being deleted, and
        WaitTimeoutError when it is still CREATING after ``timeout`` (capture goes on).
        """
        return self._run(_core.wait_snapshot_flow(snapshot_id, timeout))

    def update_snapshot(
        self,
        snapshot_id: str,
        name: str | None = None,
        expires_at: datetime | str | None = None,
        clear_expiry: bool = False,
    ) -> models.Snapshot:
        """Rename a snapshot and/or change its expiry; only what is given changes.

        ``expires_at``: an aware datetime or RFC 3339 string in the future; ``clear_expiry``:
        the snapshot no longer expires (not with ``expires_at``). ConflictError for a snapshot
        of type PAUSE or TEMPLATE (its owner manages it) or one being deleted.
        """
        body = _core.snapshot_update(name, expires_at, clear_expiry)
        return self._call(_core.update_snapshot(snapshot_id, body))

    def delete_snapshot(self, snapshot_id: str) -> models.Snapshot:
        """Delete a snapshot; returns it DELETING. Sessions restored from it are unaffected."""
        return self._call(_core.delete_snapshot(snapshot_id))

    def restore_snapshot(
        self,
        snapshot_id: str,
        name: str | None = None,
        cpu: int | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        volumes: Iterable[models.VolumeMount | str] | None = None,
        max_duration: float | str | None = None,
        wait: bool = True,
        timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT,
        *,
        allow_outbound: bool = True,
        allow_inbound: bool = False,
        allow_domains: Iterable[str] | None = None,
        allow_cidrs: Iterable[str] | None = None,
        host_id: str | None = None,
    ) -> Session:
        """A new session in the snapshot's state: ``create(snapshot_id=...)`` and, with
        ``wait``, wait up to ``timeout`` seconds for it. Volumes are not re-attached unless
        given in ``volumes``. The network policy is this call's (as :meth:`create`), not the
        snapshot's session's.
        """
        kwargs: dict[str, Any] = dict(
            name=name,
            snapshot_id=snapshot_id,
            cpu=cpu,
            memory_mb=memory_mb,
            env=env,
            metadata=metadata,
            volumes=volumes,
            max_duration=max_duration,
            allow_outbound=allow_outbound,
            allow_inbound=allow_inbound,
            allow_domains=allow_domains,
            allow_cidrs=allow_cidrs,
            host_id=host_id,
        )
        if wait:
            return self.create_and_wait(**kwargs, timeout=timeout)
        return self.create(**kwargs)

    # -- volumes --------------------------------------------------------------------------

    def create_volume(self, name: str, size: int | str) -> models.Volume:
        """Create a volume of ``size`` (bytes, or a string such as ``"1GiB"``; 1 MiB-100 GiB)."""
        body = _core.build(models.VolumeCreate, name=name, size_bytes=_core.size_bytes(size))
        return self._call(_core.create_volume(body))

    def get_volume(self, volume_id: str) -> models.Volume:
        """The volume ``volume_id`` (VolumeNotFoundError when there is none)."""
        return self._call(_core.get_volume(volume_id))

    def list_volumes(self) -> builtins.list[models.Volume]:
        """All volumes."""
        return self._call(_core.list_volumes())

    def delete_volume(self, volume_id: str) -> models.Volume:
        """Delete a volume and its data (ConflictError while it is attached)."""
        return self._call(_core.delete_volume(volume_id))


    # -- workspaces -----------------------------------------------------------------------

    def create_workspace(
        self, name: str, quotas: _core.QuotaValues | None = None
    ) -> models.Workspace:
        """Create a workspace (admin key). ``quotas``: limits by name, e.g.
        ``{"max_concurrent_sessions": 4, "max_stored_bytes": 10 << 30}``; a missing or None
        quota is no limit (names in :data:`tenkibox.models.QUOTA_NAMES`).
        """
        body = _core.workspace_create(name, quotas)
        return self._call(_core.create_workspace(body))

    def list_workspaces(self) -> builtins.list[models.Workspace]:
        """All workspaces (admin key), or the key's own workspace."""
        return self._call(_core.list_workspaces())

    def get_workspace(self, workspace_id: str) -> models.Workspace:
        """The workspace ``workspace_id`` (WorkspaceNotFoundError when there is none)."""
        return self._call(_core.get_workspace(workspace_id))

    def update_workspace(
        self,
        workspace_id: str,
        name: str | None = None,
        quotas: _core.QuotaValues | None = None,
    ) -> models.Workspace:
        """Rename a workspace and/or change quotas (admin key). Only what is given changes:
        in ``quotas``, only the names given (None removes that limit).
        """
        body = _core.workspace_update(name, quotas)
        return self._call(_core.update_workspace(workspace_id, body))

    def delete_workspace(self, workspace_id: str) -> models.Workspace:
        """Delete an empty workspace (admin key); ConflictError names what it still holds."""
        return self._call(_core.delete_workspace(workspace_id))

    def workspace_usage(self, workspace_id: str) -> models.Usage:
        """What the workspace holds now, with its quotas."""
        return self._call(_core.workspace_usage(workspace_id))

    # -- API keys -------------------------------------------------------------------------

    def create_api_key(
        self,
        workspace_id: str,
        name: str | None = None,
        expires_at: datetime | str | None = None,
        admin: bool = False,
    ) -> models.ApiKeyCreated:
        """Create an API key for ``workspace_id`` (admin key). The secret is in ``.key`` of
        the answer, and only there: the server keeps just a hash. ``expires_at``: an aware
        datetime or RFC 3339 string; ``admin``: the key may manage workspaces, keys and the
        server.
        """
        body = _core.api_key_create(workspace_id, name, expires_at, admin)
        return self._call(_core.create_api_key(body))

    def list_api_keys(self, workspace_id: str | None = None) -> builtins.list[models.ApiKey]:
        """The API keys (admin key), or those of ``workspace_id``; secrets are never listed."""
        return self._call(_core.list_api_keys(workspace_id))

    def revoke_api_key(self, key_id: str) -> models.ApiKey:
        """Revoke an API key (admin key; idempotent): it is refused from now on."""
        return self._call(_core.revoke_api_key(key_id))


    # -- templates ------------------------------------------------------------------------

    def create_template(
        self,
        name: str,
        *,
        base_image: str | None = None,
        from_template: str | None = None,
        from_snapshot: str | None = None,
        setup_script: str | None = None,
        start_cmd: str | None = None,
        ready_when: models.ReadyCheck | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        build_env: Mapping[str, str] | None = None,
        cpu: int | None = None,
        memory_mb: int | None = None,
        tags: Iterable[str] | None = None,
        spec: models.TemplateSpec | Mapping[str, Any] | None = None,
    ) -> models.Template:
        """Create a template (a recipe; :meth:`build_template` makes it usable).

        ``spec``: a declarative spec (``tenki.template.v1``: base, env, steps, runtime,
        resources) instead of the other fields.

        It starts from one of ``base_image`` (an image id, default ``sandbox``),
        ``from_template`` (another template's latest READY build) or ``from_snapshot``; a build
        runs ``setup_script`` (``/bin/sh -se``, as the user ``tenki`` with sudo, with ``env`` and
        ``build_env``), starts ``start_cmd`` detached, waits for ``ready_when`` (a
        :class:`~tenkibox.models.ReadyCheck` or a mapping with one of ``port``, ``http_url``
        [+ ``http_status``] or ``command``, and ``timeout_s``), then captures the golden
        snapshot sessions start from. ``build_env`` is for the build only (secrets: never in a
        session; only its keys are shown). ConflictError when the name is taken.
        """
        body = _core.template_create(
            name, base_image=base_image, from_template=from_template,
            from_snapshot=from_snapshot, setup_script=setup_script, start_cmd=start_cmd,
            ready_when=ready_when, env=env, build_env=build_env, cpu=cpu, memory_mb=memory_mb,
            tags=tags, spec=spec,
        )
        return self._call(_core.create_template(body))

    def list_templates(self) -> builtins.list[models.Template]:
        """All templates of the workspace."""
        return self._call(_core.list_templates())

    def get_template(self, template_id: str) -> models.Template:
        """The template ``template_id`` (TemplateNotFoundError when there is none); its
        ``latest_build`` is the READY build sessions start from."""
        return self._call(_core.get_template(template_id))

    def update_template(self, template_id: str, **fields: Any) -> models.Template:
        """Change the fields given (those of :meth:`create_template`, ``name`` included); the
        next build uses them. None removes ``setup_script``, ``start_cmd``, ``ready_when``,
        ``env``, ``build_env`` or ``tags``; a base given as None returns to the default image.
        """
        body = _core.template_update(fields)
        return self._call(_core.update_template(template_id, body))

    def delete_template(self, template_id: str, force: bool = False) -> models.Template:
        """Delete a template and its golden snapshots (sessions started from them go on).
        ConflictError while a build runs, unless ``force`` (which cancels it)."""
        return self._call(_core.delete_template(template_id, force))

    def build_template(self, template_id: str) -> models.TemplateBuild:
        """Start a build (PENDING) and return at once; ConflictError while one runs."""
        return self._call(_core.build_template(template_id))

    def list_builds(self, template_id: str) -> builtins.list[models.TemplateBuild]:
        """The builds of a template, oldest first."""
        return self._call(_core.list_builds(template_id))

    def get_build(self, template_id: str, build_id: str) -> models.TemplateBuild:
        """One build of a template."""
        return self._call(_core.get_build(template_id, build_id))

    def wait_build(
        self,
        template_id: str,
        build_id: str,
        timeout: float | None = _core.DEFAULT_BUILD_TIMEOUT,
    ) -> models.TemplateBuild:
        """Wait up to ``timeout`` seconds (None: no limit) until the build is READY or FAILED,
        and return it either way (a FAILED build names its ``failed_step`` and ``error``).
        WaitTimeoutError when it is still going after ``timeout`` (it goes on).
        """
        return self._run(_core.wait_build_flow(template_id, build_id, timeout))

    def build_template_and_wait(
        self,
        template_id: str,
        timeout: float | None = _core.DEFAULT_BUILD_TIMEOUT,
        on_log: Callable[[str], Any] | None = None,
    ) -> models.TemplateBuild:
        """:meth:`build_template`, then follow its log until it ends: ``on_log(text)`` gets
        each piece of the log as it is written. Returns the final build, READY or FAILED
        (check ``.state``); WaitTimeoutError when it is still going after ``timeout`` seconds.
        """
        follow = _core.BuildFollower(self._call(_core.build_template(template_id)), timeout)
        while follow.reading:
            try:
                resp = self._stream(follow.path, follow.params,
                                    follow.stream_timeout(self._timeout))
            except errors.ConnectionError as exc:
                if not _core.read_timed_out(exc):
                    raise
                continue  # its head came no sooner than the read bound: as a silent stream
            try:
                for text in resp.iter_text():
                    follow.feed(text)
                    if on_log is not None and text:
                        on_log(text)
                    if follow.expired:
                        break
                else:
                    follow.ended = True
            except httpx.ReadTimeout:
                pass  # silent for a while: open it again (from what was read), time permitting
            except httpx.HTTPError as exc:
                raise _core.transport_error(exc, str(self.endpoint)) from exc
            finally:
                resp.close()
        return self._run(follow.finish())

    def build_log(
        self, template_id: str, build_id: str, offset: int = 0
    ) -> Iterator[str]:
        """The build's log as it is written, from character ``offset``: yields pieces of text
        until the build ends (at once for an ended build)."""
        params = {"offset": _core.build_offset(offset)}
        resp = self._stream(_core.build_log_path(template_id, build_id), params)
        try:
            yield from resp.iter_text()
        except httpx.HTTPError as exc:
            raise _core.transport_error(exc, str(self.endpoint)) from exc
        finally:
            resp.close()

    # -- audit and host -------------------------------------------------------------------

    def list_audit(
        self,
        workspace_id: str | None = None,
        limit: int = _core.AUDIT_LIMIT_DEFAULT,
        before_id: int | None = None,
    ) -> builtins.list[models.AuditEntry]:
        """The audit log, newest first: at most ``limit`` (1-1000) entries, those of
        ``workspace_id`` only if given, older than the entry ``before_id`` if given (to page:
        pass the last id of the previous page). A workspace key sees its workspace only.
        """
        return self._call(_core.list_audit(workspace_id, limit, before_id))

    def host_status(self) -> models.HostStatus:
        """The host's memory capacity as the admission of sessions counts it (admin key)."""
        return self._call(_core.host_status())

    # -- hosts (admin key) --------------------------------------------------------------------

    def list_hosts(self) -> builtins.list[models.HostInfo]:
        """Every host of the control plane: the embedded one (``local``) first."""
        return self._call(_core.list_hosts())

    def get_host(self, host_id: str) -> models.HostInfo:
        """The host ``host_id`` (HostNotFoundError when there is none)."""
        return self._call(_core.get_host(host_id))

    def drain_host(self, host_id: str) -> models.HostInfo:
        """No new sessions on the host; those it runs go on (idempotent)."""
        return self._call(_core.drain_host(host_id))

    def undrain_host(self, host_id: str) -> models.HostInfo:
        """A DRAINING host takes new sessions again (idempotent)."""
        return self._call(_core.undrain_host(host_id))

    def remove_host(self, host_id: str, force: bool = False) -> None:
        """Forget a host: ConflictError while sessions are placed on it, unless ``force``
        (they are terminated first)."""
        self._call(_core.remove_host(host_id, force))

class Sessions:
    """``client.sessions``: the session calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create)
    create_and_wait = _core.alias(Client.create_and_wait)
    get = _core.alias(Client.get)
    list = _core.alias(Client.list)
    wait_ready = _core.alias(Client.wait_session_ready)
    terminate = _core.alias(Client.terminate)
    update = _core.alias(Client.update_session)
    extend = _core.alias(Client.extend_session)
    pause = _core.alias(Client.pause)
    resume = _core.alias(Client.resume)
    attach_volume = _core.alias(Client.attach_volume)
    detach_volume = _core.alias(Client.detach_volume)
    expose_port = _core.alias(Client.expose_port)
    list_ports = _core.alias(Client.list_ports)
    unexpose_port = _core.alias(Client.unexpose_port)


class Snapshots:
    """``client.snapshots``: the snapshot calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create_snapshot)
    create_and_wait = _core.alias(Client.create_snapshot_and_wait)
    get = _core.alias(Client.get_snapshot)
    list = _core.alias(Client.list_snapshots)
    wait_ready = _core.alias(Client.wait_snapshot_ready)
    update = _core.alias(Client.update_snapshot)
    delete = _core.alias(Client.delete_snapshot)
    restore = _core.alias(Client.restore_snapshot)


class Volumes:
    """``client.volumes``: the volume calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create_volume)
    get = _core.alias(Client.get_volume)
    list = _core.alias(Client.list_volumes)
    delete = _core.alias(Client.delete_volume)
    attach = _core.alias(Client.attach_volume)
    detach = _core.alias(Client.detach_volume)



class Workspaces:
    """``client.workspaces``: the workspace calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create_workspace)
    list = _core.alias(Client.list_workspaces)
    get = _core.alias(Client.get_workspace)
    update = _core.alias(Client.update_workspace)
    delete = _core.alias(Client.delete_workspace)
    usage = _core.alias(Client.workspace_usage)


class ApiKeys:
    """``client.api_keys``: the API key calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create_api_key)
    list = _core.alias(Client.list_api_keys)
    revoke = _core.alias(Client.revoke_api_key)


class Audit:
    """``client.audit``: the audit log of :class:`Client`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    list = _core.alias(Client.list_audit)


class Host:
    """``client.host``: the host's capacity (:meth:`Client.host_status`)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    status = _core.alias(Client.host_status)



class Hosts:
    """``client.hosts``: the host calls of :class:`Client` under short names (admin key)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    list = _core.alias(Client.list_hosts)
    get = _core.alias(Client.get_host)
    drain = _core.alias(Client.drain_host)
    undrain = _core.alias(Client.undrain_host)
    remove = _core.alias(Client.remove_host)

class Templates:
    """``client.templates``: the template calls of :class:`Client` under short names."""

    def __init__(self, client: Client) -> None:
        self._client = client

    create = _core.alias(Client.create_template)
    list = _core.alias(Client.list_templates)
    get = _core.alias(Client.get_template)
    update = _core.alias(Client.update_template)
    delete = _core.alias(Client.delete_template)
    build = _core.alias(Client.build_template)
    build_and_wait = _core.alias(Client.build_template_and_wait)
    builds = _core.alias(Client.list_builds)
    get_build = _core.alias(Client.get_build)
    wait_build = _core.alias(Client.wait_build)
    log = _core.alias(Client.build_log)


class Session:
    """A handle on one session (sync). ``record`` is the last :class:`models.Session` seen.

    As a context manager it terminates the session on exit.
    """

    def __init__(self, client: Client, record: models.Session) -> None:
        self._client = client
        self._record = record
        self.files = Files(self)

    @property
    def id(self) -> str:
        """The session id (``ses_...``)."""
        return self._record.id

    @property
    def name(self) -> str | None:
        """The session's name, if it was given one."""
        return self._record.name

    @property
    def state(self) -> models.SessionState:
        """The state as last seen; :meth:`refresh` to update."""
        return self._record.state

    @property
    def egress(self) -> models.SessionEgress:
        """The egress policy fixed at create: ``outbound``, ``allow_domains``,
        ``allow_cidrs``."""
        return self._record.egress

    @property
    def allow_inbound(self) -> bool:
        """Whether ports of the session may be exposed (fixed at create)."""
        return self._record.allow_inbound

    @property
    def record(self) -> models.Session:
        """The last :class:`tenkibox.models.Session` record seen (see :meth:`refresh`)."""
        return self._record

    def refresh(self) -> Session:
        """Reload the record from the server; returns ``self``."""
        self._record = self._client._call(_core.get_session(self.id))
        return self

    def wait_ready(self, timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT) -> Session:
        """Wait up to ``timeout`` seconds until the session runs; returns ``self``."""
        self._record = self._client._run(_core.wait_session_flow(self.id, timeout, self._record))
        return self

    def exec(
        self,
        *argv: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """Run ``argv`` to completion and return its :class:`ExecResult`.

        ``cwd``: working directory; ``env``: variables added to the session's; ``timeout``:
        seconds after which the command is killed (exit code 124, ``timed_out``); ``stdin``:
        data written to the command's standard input, then closed (default: empty).
        A non-zero exit is not an error: call ``.check()`` on the result for that.
        """
        return self.start(*argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin).wait()

    def shell(
        self,
        command: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """``exec("/bin/sh", "-c", command, ...)``: run a shell command line."""
        return self.exec(*_core.shell_argv(command), cwd=cwd, env=env, timeout=timeout, stdin=stdin)

    def start(
        self,
        *argv: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | bool | None = None,
    ) -> Process:
        """Start ``argv`` and return a :class:`Process` at once, to stream its output.

        ``stdin``: data written then closed, or ``True`` to keep standard input open for
        :meth:`Process.write_stdin` / :meth:`Process.close_stdin`. ``timeout`` in seconds.
        """
        body = _core.exec_request(argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin)
        info = self._client._call(_core.start_process(self.id, body))
        return Process(self._client, info, tuple(body.argv or ()))

    def snapshot(
        self,
        name: str | None = None,
        expires_at: datetime | str | None = None,
        wait: bool = True,
        timeout: float | None = _core.DEFAULT_SNAPSHOT_TIMEOUT,
    ) -> models.Snapshot:
        """Snapshot this session; with ``wait``, wait up to ``timeout`` seconds for READY."""
        body = _core.snapshot_create(self.id, name, expires_at)
        return self._client._run(_core.create_snapshot_flow(body, wait, timeout))

    def attach_volume(self, volume_id: str, path: str, read_only: bool = False) -> Session:
        """Attach a volume at the absolute ``path``; returns ``self`` (record updated)."""
        self._record = self._client.attach_volume(self.id, volume_id, path, read_only).record
        return self

    def detach_volume(self, volume_id: str) -> Session:
        """Detach a volume; returns ``self`` (record updated)."""
        self._record = self._client.detach_volume(self.id, volume_id).record
        return self

    def pause(
        self, wait: bool = True, timeout: float | None = _core.DEFAULT_SNAPSHOT_TIMEOUT
    ) -> Session:
        """Pause this session (see :meth:`Client.pause`); returns ``self`` (record updated)."""
        self._record = self._client._run(_core.pause_flow(self.id, wait, timeout))
        return self

    def resume(
        self, wait: bool = True, timeout: float | None = _core.DEFAULT_CREATE_TIMEOUT
    ) -> Session:
        """Resume this session (see :meth:`Client.resume`); returns ``self`` (record updated)."""
        self._record = self._client._run(_core.resume_flow(self.id, wait, timeout))
        return self

    def update(
        self, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> Session:
        """Rename this session and/or replace its metadata (see :meth:`Client.update_session`);
        returns ``self`` (record updated)."""
        body = _core.session_update(name, metadata)
        self._record = self._client._call(_core.update_session(self.id, body))
        return self

    def extend(self, seconds: float | str) -> Session:
        """Move this session's expiry ``seconds`` later (see :meth:`Client.extend_session`);
        returns ``self`` (record updated)."""
        body = _core.session_extend(seconds)
        self._record = self._client._call(_core.extend_session(self.id, body))
        return self

    def expose_port(self, port: int, ttl: float | str | None = None) -> models.PortExposure:
        """Expose ``port`` of this session (see :meth:`Client.expose_port`)."""
        return self._client.expose_port(self.id, port, ttl)

    def list_ports(self) -> builtins.list[models.PortExposure]:
        """This session's exposed ports."""
        return self._client.list_ports(self.id)

    def unexpose_port(self, port: int) -> None:
        """Close an exposed port of this session (see :meth:`Client.unexpose_port`)."""
        self._client.unexpose_port(self.id, port)

    def terminate(self) -> Session:
        """Terminate this session (idempotent); returns ``self`` (record updated)."""
        self._record = self._client._call(_core.terminate_session(self.id))
        return self

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.terminate()
        except errors.NotFoundError:
            pass

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, name={self.name!r}, state={self.state.value})"


class Files:
    """``session.files``: read and write files in the session."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def read(self, path: str) -> bytes:
        """The content of the file at ``path`` in the session."""
        return self._session._client._call(_core.read_file(self._session.id, path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The content of ``path`` as text (undecodable bytes replaced)."""
        return self.read(path).decode(encoding, errors="replace")

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> models.FileWritten:
        """Write ``data`` (text is UTF-8 encoded) to ``path``, creating parents; ``mode``
        is the permission bits of the file.
        """
        call = _core.write_file(self._session.id, path, _core.to_bytes(data), mode)
        return self._session._client._call(call)


class Process:
    """A running command (sync). Iterate it for ``(stream, data)`` output as it arrives:
    ``for stream, data in proc:`` where ``stream`` is ``"stdout"`` or ``"stderr"`` and
    ``data`` bytes; :meth:`wait` returns the :class:`ExecResult` with all the output.
    """

    def __init__(
        self, client: Client, info: models.ProcessInfo, argv: tuple[str, ...] = ()
    ) -> None:
        self._client = client
        self._info = info
        self._argv = argv
        self._state = _core.ProcessState(info.process_id, argv)
        self._resp: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """The server's process id (``prc_...``)."""
        return self._info.process_id

    @property
    def pid(self) -> int | None:
        """The process id inside the guest, when known."""
        return self._info.pid

    @property
    def session_id(self) -> str:
        """The session the process runs in."""
        return self._info.session_id

    @property
    def info(self) -> models.ProcessInfo:
        """The server's :class:`tenkibox.models.ProcessInfo` for the process."""
        return self._info

    @property
    def exit_code(self) -> int | None:
        """The exit code once the exit was read, else None."""
        return self._state.collector.exit_code

    def events(self) -> Iterator[tuple[Stream, bytes]]:
        """Yield ``(stream, data)`` as output arrives, until the process exits."""
        while True:
            with self._lock:
                item = self._state.pop()
                if item is None:
                    if self._state.exited:
                        self._close_stream()
                        return
                    self._read_more()
                    continue
            yield item

    def __iter__(self) -> Iterator[tuple[Stream, bytes]]:
        return self.events()

    def _read_more(self) -> None:
        if self._closed:
            raise errors.ConnectionError(f"the output stream of process {self.id} was closed")
        if self._chunks is None:
            self._resp = self._client._stream(_core.events_path(self.session_id, self.id))
            self._chunks = self._resp.iter_bytes()
        try:
            chunk = next(self._chunks, None)
        except httpx.HTTPError as exc:
            self._close_stream()
            raise _core.transport_error(exc, str(self._client.endpoint)) from exc
        if chunk is None:
            self._close_stream()
            self._state.end()
        else:
            self._state.feed(chunk)

    def _close_stream(self) -> None:
        if self._resp is not None:
            self._resp.close()

    def write_stdin(self, data: str | bytes) -> None:
        """Write ``data`` to the process's standard input (start it with ``stdin=True``)."""
        self._client._call(_core.write_stdin(self.session_id, self.id, _core.to_bytes(data)))

    def close_stdin(self) -> None:
        """Close the process's standard input (it reads end-of-file)."""
        self._client._call(_core.close_stdin(self.session_id, self.id))

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` (default 9, SIGKILL) to the process."""
        self._client._call(_core.kill_process(self.session_id, self.id, signal))

    def wait(self) -> ExecResult:
        """Wait for the exit and return the result, with all the output (also what iteration
        already yielded).
        """
        for _ in self.events():
            pass
        return self._state.collector.result()

    def close(self) -> None:
        """Stop reading the output stream (the process keeps running)."""
        with self._lock:
            self._closed = not self._state.exited
            self._close_stream()

    def __repr__(self) -> str:
        return f"Process(id={self.id!r}, argv={list(self._argv)!r}, exit_code={self.exit_code})"

"""``RemoteHost``: the ``HostAPI`` of a host worker, called over HTTP (``host.service``).

The control plane holds one per registered host. Asynchronous methods are one request each;
a typed error the host raised is raised again here as the same class, and a failure of the
transport (refused, reset, timed out) is ``HostUnreachableError``, chained to httpx's.

The synchronous methods (``has_vm``, ``list_vms``, ``memory_used_mib``, ``tmpfs_use``,
``running_processes``, ``referenced_locally``, ``unowned_files``, ``local_artifacts``,
``capacity``, ``network_enforced``) cannot wait for the network: they answer from a cache that
every boot, restore, terminate and recover answer refreshes, as does ``refresh()`` (the
control plane calls it each heartbeat interval) and ``watch()`` (a VM that died is gone).
``unowned_files`` answers from the last ``refresh(unowned=True)``, which ``scrub_caches`` does
(a verify scrubs the caches right before it lists what is unowned).

Timeouts by meaning: a boot, restore, capture or a deep verify may take minutes under TCG, so
those wait as long as the host works; a process's output and exit wait as long as the process
runs; quick calls give up after ``CALL_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import (
    ConflictError,
    HostUnreachableError,
    InternalError,
    NotFoundError,
    TenkiError,
)
from ..models import Image
from .api import (
    BootSpec,
    CacheScrub,
    Captured,
    CaptureSpec,
    ExecSpec,
    InUse,
    ProcessEvent,
    ProcessRef,
    Recovered,
    RestoreSpec,
    Started,
    Unowned,
    VMGone,
    VolumeMountSpec,
)
from .capacity import HostCapacity
from .tmpfs import TmpfsUse
from .wire import PREFIX, error_from_wire

log = logging.getLogger(__name__)

#: how long a connection to the host may take to open
CONNECT_TIMEOUT_S = 5.0
#: a call that does little on the host (status, volumes, stdin, kill)
CALL_TIMEOUT_S = 30.0
#: a pause in a file's body: the guest's agent gives chunks steadily
FILE_CHUNK_TIMEOUT_S = 120.0
#: the watch stream's keepalive comes every few seconds: silence this long is a dead link
WATCH_SILENCE_S = 20.0
#: how long a broken watch stream waits before it connects again
WATCH_RETRY_S = 1.0

#: how many requests later a gone session's last word is no longer needed
TOUCHED_KEEP = 10_000

#: for work that takes as long as it takes (boot, restore, capture, a process's exit)
LONG = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=None)
QUICK = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
FILE = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=FILE_CHUNK_TIMEOUT_S,
                     write=FILE_CHUNK_TIMEOUT_S)
WATCH = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=WATCH_SILENCE_S)


def _q(part: str) -> str:
    return quote(part, safe="")


class RemoteHost:
    def __init__(self, address: str, secret: str, *, host_id: str,
                 capacity: HostCapacity | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``address``: the worker's URL (``http://10.77.0.2:7070``); ``secret``: what it gave
        at registration; ``transport``: for tests (an ASGI transport)."""
        self.address = address.rstrip("/")
        self.host_id = host_id
        self._client = httpx.AsyncClient(base_url=self.address, transport=transport,
                                         headers={"Authorization": f"Bearer {secret}"},
                                         timeout=QUICK)
        # the cache the synchronous methods answer from (empty until the first answer)
        # what it registered with, until its first status answer (placement needs it at once)
        self.capacity = capacity or HostCapacity(host_id, 0, 0, 1.0, 0, "unknown")
        self._vms: set[str] = set()
        #: requests sent so far, and per session the last one whose answer spoke of it
        self._seq = 0
        self._touched: dict[str, int] = {}
        #: VMs gone for ``watch()`` to report, and the sessions reported (each once)
        self._gone: asyncio.Queue[VMGone] = asyncio.Queue()
        self._reported: set[str] = set()
        #: VMs that answers stopped listing since the last refresh, and before it
        self._vanished: set[str] = set()
        self._vanishing: set[str] = set()
        self._memory_used_mib = 0
        self._tmpfs = TmpfsUse(0, 0, 0)
        self._running: dict[str, int] = {}
        self._network_enforced = False
        self._referenced: set[str] = set()
        self._local_artifacts: list[InUse] = []
        self._unowned: list[Unowned] = []
        #: process id -> its session: the processes an events stream may be asked for
        self._procs: dict[str, str] = {}
        #: process id -> "active", "done" or "gone" (as ``ProcessHandle``'s one-reader rule)
        self._readers: dict[str, str] = {}
        self._delivered: dict[str, int] = {}
        #: when the cache was last refreshed from a full status (loop time; None: never)
        self.refreshed_at: float | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RemoteHost({self.host_id} at {self.address})"

    # -- transport ---------------------------------------------------------------------------
    def _unreachable(self, what: str, exc: Exception) -> HostUnreachableError:
        return HostUnreachableError(f"host {self.host_id} ({self.address}) did not answer "
                                    f"{what}: {type(exc).__name__}: {exc}".rstrip(": "))

    def _raise_for(self, resp: httpx.Response, body: bytes, seq: int | None = None) -> None:
        if resp.status_code < 400:
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = body[:200].decode(errors="replace")
        if seq is not None and isinstance(data, dict) and "vms" in data:
            # a failed capture or boot says which VMs remain (the one it was about may not)
            self._take_brief(data, seq)
        raise error_from_wire(resp.status_code, data)

    async def _call(self, method: str, path: str, body: Any = None, *,
                    timeout: httpx.Timeout = QUICK, params: dict[str, str] | None = None) -> Any:
        """One request; an answer (or error) that lists the host's VMs refreshes the cache."""
        what = f"{method} {path}"
        self._seq += 1
        seq = self._seq
        try:
            resp = await self._client.request(method, PREFIX + path, json=body, params=params,
                                              timeout=timeout)
        except httpx.TransportError as exc:
            raise self._unreachable(what, exc) from exc
        self._raise_for(resp, resp.content, seq)
        try:
            data = resp.json()
        except ValueError as exc:
            raise InternalError(f"host {self.host_id}: {what} answered no JSON") from exc
        if isinstance(data, dict) and "vms" in data:
            self._take_brief(data, seq)
        return data

    @asynccontextmanager
    async def _stream(self, method: str, path: str, *, timeout: httpx.Timeout,
                      params: dict[str, str] | None = None,
                      content: AsyncIterable[bytes] | None = None
                      ) -> AsyncIterator[httpx.Response]:
        what = f"{method} {path}"
        try:
            async with self._client.stream(method, PREFIX + path, params=params,
                                           content=content, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    self._raise_for(resp, await resp.aread())
                yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(what, exc) from exc

    # -- the cache ---------------------------------------------------------------------------
    def _take_brief(self, data: dict[str, Any], seq: int) -> None:
        """Take the VMs an answer lists, but only for sessions that no later-sent request
        has spoken of: answers to concurrent requests arrive in any order (a status sent
        before a boot finished must not remove the booted VM)."""
        listed = {str(s) for s in data.get("vms") or []}
        for session_id in listed | self._vms:
            if self._touched.get(session_id, 0) >= seq:
                continue
            self._touched[session_id] = seq
            if session_id in listed:
                self._vms.add(session_id)
            elif session_id in self._vms:
                # nothing sent after the answer that last listed it stopped it here: it died
                # (the watch stream says why, or the next refresh reports it: ``refresh``)
                self._forget(session_id)
                self._vanished.add(session_id)
        # what a session that is gone was last told is kept a while for the rule above
        old = self._seq - TOUCHED_KEEP
        self._touched = {s: n for s, n in self._touched.items() if n > old or s in self._vms}
        self._reported &= set(self._touched)
        self._memory_used_mib = int(data.get("memory_used_mib") or 0)
        if data.get("tmpfs"):
            self._tmpfs = TmpfsUse.from_json(data["tmpfs"])
        self._running = {str(s): int(n) for s, n in (data.get("running_processes") or {}).items()
                         if s in self._vms}
        if "processes" in data:
            procs = {str(p): str(s) for s, ps in data["processes"].items() for p in ps}
            # a process started through this object while the answer was on its way stays
            self._procs = {p: s for p, s in self._procs.items() if s in self._vms} | procs
        if "local_artifacts" in data:
            self._referenced = set(data.get("referenced_locally") or [])
            self._local_artifacts = [InUse.from_json(u) for u in data["local_artifacts"]]

    async def refresh(self, *, unowned: bool = False) -> None:
        """Refresh the cache from the host's status (``unowned``: also what it stores that
        no one owns, a listing of its whole store)."""
        data = await self._call("GET", "/status", params={"unowned": "1"} if unowned else None)
        self.capacity = HostCapacity.from_json(data["capacity"])
        self._network_enforced = bool(data.get("network_enforced"))
        if unowned:
            self._unowned = [Unowned.from_json(u) for u in data.get("unowned") or []]
        # a VM that vanished before the previous refresh and that the watch stream did not
        # report (its event lost with a broken stream, or a restarted worker did not find it)
        for session_id in self._vanishing - self._vms:
            self._report(VMGone(session_id, f"the VM is no longer on host {self.host_id}"))
        self._vanishing, self._vanished = self._vanished, set()
        self.refreshed_at = asyncio.get_running_loop().time()

    def _settle(self, session_id: str, present: bool) -> None:
        """What a boot, restore or terminate's own answer says of its session: that is final
        for every answer sent before it."""
        self._touched[session_id] = self._seq
        self._vanished.discard(session_id)
        self._vanishing.discard(session_id)
        if present:
            self._vms.add(session_id)
            self._reported.discard(session_id)
        else:
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        """A VM is gone: and the processes of its session with it (as on the host)."""
        self._vms.discard(session_id)
        self._running.pop(session_id, None)
        for process_id in [p for p, s in self._procs.items() if s == session_id]:
            del self._procs[process_id]
            self._readers.pop(process_id, None)
            self._delivered.pop(process_id, None)

    def has_vm(self, session_id: str) -> bool:
        return session_id in self._vms

    def list_vms(self) -> list[str]:
        return sorted(self._vms)

    def memory_used_mib(self) -> int:
        return self._memory_used_mib

    def tmpfs_use(self) -> TmpfsUse:
        return self._tmpfs

    @property
    def network_enforced(self) -> bool:
        return self._network_enforced

    def running_processes(self, session_id: str) -> int:
        return self._running.get(session_id, 0)

    def referenced_locally(self) -> set[str]:
        return set(self._referenced)

    def local_artifacts(self) -> list[InUse]:
        return list(self._local_artifacts)

    def unowned_files(self, referenced: set[str]) -> list[Unowned]:
        # the host listed with nothing referenced: what ``referenced`` names is owned after all
        return [u for u in self._unowned if not (u.kind == "artifact" and u.name in referenced)]

    # -- start and stop ----------------------------------------------------------------------
    async def boot(self, spec: BootSpec) -> Started:
        data = await self._call("POST", "/vms/boot", spec.to_json(), timeout=LONG)
        self._settle(spec.session_id, True)
        return Started.from_json(data["started"])

    async def restore(self, spec: RestoreSpec) -> Started:
        data = await self._call("POST", "/vms/restore", spec.to_json(), timeout=LONG)
        self._settle(spec.session_id, True)
        return Started.from_json(data["started"])

    async def prepare_spare(self, spec: RestoreSpec) -> None:
        await self._call("POST", "/spares", spec.to_json())

    async def drop_spare(self, session_id: str) -> None:
        await self._call("DELETE", f"/spares/{_q(session_id)}", timeout=LONG)

    async def capture(self, spec: CaptureSpec) -> Captured:
        data = await self._call("POST", f"/vms/{_q(spec.session_id)}/capture", spec.to_json(),
                                timeout=LONG)
        return Captured.from_json(data["captured"])

    async def terminate(self, session_id: str, volumes: list[VolumeMountSpec]) -> None:
        await self._call("POST", f"/vms/{_q(session_id)}/terminate",
                                {"volumes": [v.to_json() for v in volumes]}, timeout=LONG)
        self._settle(session_id, False)

    async def recover(self, live: dict[str, list[VolumeMountSpec]]) -> Recovered:
        body = {"live": {s: [m.to_json() for m in ms] for s, ms in live.items()}}
        data = await self._call("POST", "/recover", body, timeout=LONG)
        return Recovered.from_json(data["recovered"])

    async def watch(self) -> AsyncIterator[VMGone]:
        """The VMs that died on their own, for as long as the caller reads: the host's watch
        stream (connected again after ``WATCH_RETRY_S`` when it breaks: the host restarting,
        a partition), and VMs that a status no longer lists although nothing here stopped
        them (an event lost with a broken stream, or a VM a restarted worker did not find).
        Each session is reported once."""
        pump = asyncio.create_task(self._follow(), name=f"watch {self.host_id}")
        try:
            while True:
                yield await self._gone.get()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _follow(self) -> None:
        while True:
            try:
                async with self._stream("GET", "/watch", timeout=WATCH) as resp:
                    async for line in resp.aiter_lines():
                        data = json.loads(line) if line.strip() else {}
                        if "session_id" not in data:
                            continue  # a keepalive
                        gone = VMGone.from_json(data)
                        self._settle(gone.session_id, False)
                        self._report(gone)
            except (TenkiError, httpx.HTTPError, ValueError) as exc:
                log.warning("host %s: watch stream broke (%s); connecting again", self.host_id,
                            exc)
            await asyncio.sleep(WATCH_RETRY_S)

    def _report(self, gone: VMGone) -> None:
        if gone.session_id not in self._reported:
            self._reported.add(gone.session_id)
            self._gone.put_nowait(gone)

    # -- images and network ------------------------------------------------------------------
    async def image_digest(self, image_id: str) -> str:
        return str((await self._call("GET", f"/images/{_q(image_id)}/digest"))["digest"])

    async def list_images(self) -> list[Image]:
        data = await self._call("GET", "/images")
        return [Image.model_validate(i) for i in data["images"]]

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        data = await self._call("GET", f"/vms/{_q(session_id)}/ports/{int(port)}")
        return str(data["host"]), int(data["port"])

    # -- volumes -----------------------------------------------------------------------------
    async def create_volume(self, volume_id: str, size_bytes: int) -> None:
        await self._call("PUT", f"/volumes/{_q(volume_id)}", {"size_bytes": size_bytes},
                         timeout=LONG)

    async def delete_volume(self, volume_id: str) -> None:
        await self._call("DELETE", f"/volumes/{_q(volume_id)}", timeout=LONG)

    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        await self._call("POST", f"/vms/{_q(session_id)}/volumes/attach", mount.to_json(),
                         timeout=LONG)

    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        await self._call("POST", f"/vms/{_q(session_id)}/volumes/detach", mount.to_json(),
                         timeout=LONG)

    async def volume_files(self) -> list[str]:
        return [str(v) for v in (await self._call("GET", "/volumes"))["volumes"]]

    # -- processes ---------------------------------------------------------------------------
    def _proc(self, session_id: str, process_id: str) -> str:
        return f"/vms/{_q(session_id)}/processes/{_q(process_id)}"

    async def start_process(self, session_id: str, spec: ExecSpec) -> ProcessRef:
        data = await self._call("POST", f"/vms/{_q(session_id)}/processes", spec.to_json())
        self._running[session_id] = int(data["running_processes"])
        ref = ProcessRef.from_json(data["process"])
        self._procs[ref.process_id] = session_id
        return ref

    def process_events(self, session_id: str,
                       process_id: str) -> AsyncGenerator[ProcessEvent, None]:
        """The process's events, for the one reader there may be. As ``ProcessHandle.stream``
        (which the host applies too), an unknown process or a second reader is refused here,
        before the first iteration, so that a route can answer 404 or 409 before it starts a
        response: by what this control plane knows (the processes started through it or
        listed by the host's last status, and the readers it let in)."""
        if self._procs.get(process_id) != session_id:
            raise NotFoundError(f"process {process_id} not found in session {session_id}")
        reader = self._readers.get(process_id)
        if reader == "active":
            raise ConflictError(f"process {process_id}: its output is already being read by "
                                "another client (a process's output can be read once)")
        if reader in ("done", "gone"):
            what = ("was already read to the end" if reader == "done" else
                    f"was already partly read by another client "
                    f"({self._delivered.get(process_id, 0)} bytes)")
            raise ConflictError(f"process {process_id}: its output {what} and cannot be read "
                                "again")
        self._readers[process_id] = "active"
        return self._events(session_id, process_id)

    async def _events(self, session_id: str,
                      process_id: str) -> AsyncGenerator[ProcessEvent, None]:
        took, finished = False, False
        try:
            # a process may be silent for as long as it runs: no read timeout
            async with self._stream("GET", self._proc(session_id, process_id) + "/events",
                                    timeout=LONG) as resp:
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    if "error" in data:
                        raise error_from_wire(500, data)
                    event = ProcessEvent.from_json(data)
                    took = True
                    self._delivered[process_id] = \
                        self._delivered.get(process_id, 0) + len(event.data)
                    yield event
                    if event.type in ("exit", "error"):
                        finished = True
        finally:
            # as the host's rule: a reader that took nothing lets the next one in
            if finished:
                self._readers[process_id] = "done"
            elif took:
                self._readers[process_id] = "gone"
            else:
                self._readers.pop(process_id, None)

    async def process_stdin(self, session_id: str, process_id: str, data: bytes) -> None:
        path = PREFIX + self._proc(session_id, process_id) + "/stdin"
        try:
            resp = await self._client.post(path, content=data)
        except httpx.TransportError as exc:
            raise self._unreachable(f"POST {path}", exc) from exc
        self._raise_for(resp, resp.content)

    async def process_close_stdin(self, session_id: str, process_id: str) -> None:
        await self._call("POST", self._proc(session_id, process_id) + "/close-stdin")

    async def process_kill(self, session_id: str, process_id: str, signal: int) -> None:
        await self._call("POST", self._proc(session_id, process_id) + "/kill",
                         {"signal": int(signal)})

    async def process_exit(self, session_id: str, process_id: str) -> int | None:
        data = await self._call("POST", self._proc(session_id, process_id) + "/exit",
                                timeout=LONG)
        self._running[session_id] = int(data["running_processes"])
        code = data.get("exit_code")
        return int(code) if code is not None else None

    # -- files -------------------------------------------------------------------------------
    async def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]:
        async with self._stream("GET", f"/vms/{_q(session_id)}/files", params={"path": path},
                                timeout=FILE) as resp:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.TransportError as exc:
                # the host cannot say why mid-body (its status is sent): the read broke off
                raise self._unreachable(f"the rest of {path}", exc) from exc

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int:
        async def body() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield bytes(chunk)

        async with self._stream("PUT", f"/vms/{_q(session_id)}/files", timeout=FILE,
                                params={"path": path, "mode": str(int(mode))},
                                content=body()) as resp:
            try:
                answer = json.loads(await resp.aread())
            except httpx.TransportError as exc:
                raise self._unreachable(f"the write of {path}", exc) from exc
            except ValueError as exc:
                raise InternalError(f"host {self.host_id}: a write answered no JSON") from exc
        return int(answer["written"])

    # -- artifacts ---------------------------------------------------------------------------
    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        data = await self._call("POST", "/artifacts/collect",
                                {"referenced": sorted(referenced), "grace_s": grace_s},
                                timeout=LONG)
        return int(data["freed"])

    async def remove_unowned(self, found: list[Unowned], referenced: set[str],
                             live_sessions: set[str]) -> list[Unowned]:
        data = await self._call("POST", "/artifacts/remove-unowned",
                                {"found": [u.to_json() for u in found],
                                 "referenced": sorted(referenced),
                                 "live_sessions": sorted(live_sessions)}, timeout=LONG)
        removed = [Unowned.from_json(u) for u in data["removed"]]
        self._unowned = [u for u in self._unowned if u not in removed]
        return removed

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        data = await self._call("POST", "/artifacts/verify", {"digests": digests, "deep": deep},
                                timeout=LONG)
        return {str(k): str(v) for k, v in data["bad"].items()}

    async def cached_bytes(self, digests: list[str]) -> int:
        data = await self._call("POST", "/artifacts/cached-bytes", {"digests": list(digests)})
        return int(data["bytes"])

    async def scrub_caches(self, repair: bool) -> CacheScrub:
        data = await self._call("POST", "/caches/scrub", {"repair": repair}, timeout=LONG)
        # a verify lists what is unowned right after it scrubs: have that listing ready
        await self.refresh(unowned=True)
        return CacheScrub.from_json(data)

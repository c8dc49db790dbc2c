"""Templates: a reusable environment recipe and its builds, each ending in a golden snapshot.

A build is one job of ordered, named, timed steps, each writing to the build's log:

    boot     a build session from the base (image, another template's build, or a snapshot)
    setup    the setup script (``/bin/sh -se``, fed on stdin) as the sandbox user ``tenki``
             (passwordless sudo) in its home, with the template's env and the build-only env
             (secrets: never stored in a session record)
    start    ``start_cmd`` as the sandbox user, detached (it keeps running in the golden
             snapshot)
    ready    the ``ready_when`` check, tried until its timeout
    capture  a snapshot of the build session: the golden snapshot, owned by the template
    cleanup  the build session is terminated (always)

The build is READY only once its golden snapshot is READY. One build at a time per template;
a session created with ``template_id`` restores the latest READY build's snapshot, and the
snapshots of older builds are deleted once a newer build is READY (their artifacts stay while
a session or snapshot still needs them: the garbage collector counts references).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .. import longpoll
from ..errors import ConflictError, TemplateNotFoundError, TenkiError, ValidationError
from ..ids import new_id
from ..models import (
    DEFAULT_IMAGE_ID,
    BuildState,
    ExecRequest,
    ReadyCheck,
    SessionCreate,
    SnapshotCreate,
    Template,
    TemplateBase,
    TemplateBuild,
    TemplateCreate,
    TemplateSpec,
    TemplateUpdate,
)
from ..store.tables import BuildRow, SessionRow, SnapshotRow, TemplateRow
from .records import Records, key_of
from .sessions import SessionControl
from .snapshots import SnapshotControl
from .states import IllegalTransitionError
from .template_spec import compile_spec, failed_step, spec_hash

log = logging.getLogger(__name__)

B = BuildState
#: a build log keeps at most this much; later output is counted, not kept
LOG_MAX_CHARS = 4 << 20
LOG_TAIL_CHARS = 4096
LOG_FLUSH_S = 0.25
BOOT_TIMEOUT_S = 600.0
CAPTURE_TIMEOUT_S = 900.0
START_LOG = "/var/log/tenki-start.log"
#: builds run their setup and start command as the sandbox user (sudo allowed), as the product
SANDBOX_USER = "tenki"
SANDBOX_HOME = "/home/tenki"


def as_sandbox_user(env: dict[str, str]) -> dict[str, str]:
    return {**env, "HOME": SANDBOX_HOME, "USER": SANDBOX_USER, "LOGNAME": SANDBOX_USER}


def now() -> datetime:
    return datetime.now(UTC)


def build_model(row: BuildRow) -> TemplateBuild:
    text = row.log or ""
    return TemplateBuild(
        id=row.id, template_id=row.template_id, workspace_id=row.workspace_id,
        version=row.version, state=B(row.state), error=row.error, failed_step=row.failed_step,
        log_tail=text[-LOG_TAIL_CHARS:], log_bytes=len(text.encode()),
        snapshot_id=row.snapshot_id, created_at=row.created_at, started_at=row.started_at,
        completed_at=row.completed_at)


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class BuildLog:
    """The build's log: lines buffered and written to its record every ``LOG_FLUSH_S``."""

    def __init__(self, records: Records, build_id: str) -> None:
        self.records = records
        self.build_id = build_id
        self.text = ""
        self.dropped = 0
        self._pending = ""
        self._last = 0.0

    async def write(self, text: str, *, flush: bool = False) -> None:
        room = LOG_MAX_CHARS - len(self.text) - len(self._pending)
        if room <= 0:
            self.dropped += len(text)
        else:
            self._pending += text[:room]
            self.dropped += max(0, len(text) - room)
        if flush or time.monotonic() - self._last >= LOG_FLUSH_S:
            await self.flush()

    async def line(self, text: str) -> None:
        await self.write(f"[{now().strftime('%H:%M:%S')}] {text}\n", flush=True)

    async def flush(self) -> None:
        if not self._pending:
            return
        self.text += self._pending
        self._pending = ""
        self._last = time.monotonic()
        await self.records.update(BuildRow, self.build_id, log=self.text)


class TemplateControl:
    def __init__(self, records: Records, sessions: SessionControl,
                 snapshots: SnapshotControl) -> None:
        self.records = records
        self.sessions = sessions
        self.snapshots = snapshots
        self._jobs: dict[str, asyncio.Task[None]] = {}  # build id -> its job

    # -- reads -------------------------------------------------------------------------------
    def row(self, template_id: str, ws: str | None = None) -> TemplateRow:
        return self.records.get(TemplateRow, template_id, ws=ws)

    def latest_ready(self, template_id: str) -> BuildRow | None:
        rows = self.records.all(BuildRow, BuildRow.template_id == template_id,
                                BuildRow.state == B.READY.value)
        return max(rows, key=lambda r: r.version) if rows else None

    def to_model(self, row: TemplateRow) -> Template:
        spec = row.spec or {}
        latest = self.latest_ready(row.id)
        return Template(
            id=row.id, workspace_id=row.workspace_id, name=row.name,
            base=TemplateBase(**spec.get("base", {})), setup_script=spec.get("setup_script"),
            start_cmd=spec.get("start_cmd"),
            ready_when=ReadyCheck(**spec["ready_when"]) if spec.get("ready_when") else None,
            env=spec.get("env", {}), build_env_keys=sorted(row.build_env or {}),
            cpu=spec["cpu"], memory_mb=spec["memory_mb"], tags=spec.get("tags", []),
            latest_build=build_model(latest) if latest else None,
            spec=TemplateSpec(**spec["declared"]) if spec.get("declared") else None,
            created_at=row.created_at, updated_at=row.updated_at)

    def get(self, template_id: str, ws: str) -> Template:
        return self.to_model(self.row(template_id, ws))

    def query(self, ws: str) -> list[Template]:
        rows = self.records.all(TemplateRow, TemplateRow.workspace_id == ws)
        rows.sort(key=lambda r: r.created_at)
        return [self.to_model(r) for r in rows]

    def build_row(self, template_id: str, build_id: str, ws: str) -> BuildRow:
        self.row(template_id, ws)
        row = self.records.get(BuildRow, build_id, ws=ws)
        if row.template_id != template_id:
            raise TemplateNotFoundError(f"build {build_id} not found")
        return row

    def builds(self, template_id: str, ws: str) -> list[TemplateBuild]:
        self.row(template_id, ws)
        rows = self.records.all(BuildRow, BuildRow.template_id == template_id)
        rows.sort(key=lambda r: r.version)
        return [build_model(r) for r in rows]

    def get_build(self, template_id: str, build_id: str, ws: str) -> TemplateBuild:
        return build_model(self.build_row(template_id, build_id, ws))

    async def wait_build(self, template_id: str, build_id: str, ws: str,
                         timeout_s: float) -> TemplateBuild:
        row = await longpoll.until(
            self.records.changes, key_of(BuildRow, build_id),
            lambda: self.build_row(template_id, build_id, ws),
            lambda r: r.state in (B.READY.value, B.FAILED.value), timeout_s)
        return build_model(row)

    async def follow_log(self, template_id: str, build_id: str, ws: str,
                         offset: int = 0) -> Any:
        """The build's log from character ``offset``, as it is written, until the build
        ends (an async iterator of text)."""
        self.build_row(template_id, build_id, ws)

        async def chunks() -> Any:
            sent = offset
            while True:
                row = self.build_row(template_id, build_id, ws)
                text = row.log or ""
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if row.state in (B.READY.value, B.FAILED.value):
                    return
                await self.records.changes.wait(key_of(BuildRow, build_id), 1.0)

        return chunks()

    def golden_snapshot(self, template_id: str, ws: str) -> tuple[str, str]:
        """(template id, snapshot id) of the build a new session starts from."""
        row = self.row(template_id, ws)
        latest = self.latest_ready(row.id)
        if latest is None or latest.snapshot_id is None:
            raise ConflictError(f"template {template_id} has no READY build; build it first "
                                f"(tenki sandbox template build {template_id})")
        return row.id, latest.snapshot_id

    # -- records -----------------------------------------------------------------------------
    def _check_base(self, base: TemplateBase, ws: str, own_id: str | None = None) -> None:
        given = [k for k in ("image", "template_id", "snapshot_id") if getattr(base, k)]
        if len(given) > 1:
            raise ValidationError(f"give one of image, template_id, snapshot_id; got "
                                  f"{', '.join(given)}", field="base")
        if base.template_id:
            if base.template_id == own_id:
                raise ValidationError("a template cannot be built from itself",
                                      field="base.template_id")
            self.row(base.template_id, ws)
        if base.snapshot_id:
            self.snapshots.row(base.snapshot_id, ws)

    async def create(self, req: TemplateCreate, ws: str) -> Template:
        declared = None
        if req.spec is not None:
            extra = sorted(req.model_fields_set - {"name", "spec"})
            if extra:
                raise ValidationError(f"give a spec or the fields, not both (also given: "
                                      f"{', '.join(extra)})", field="spec")
            declared = req.spec.model_dump(mode="json", exclude_none=True)
            req = TemplateCreate(name=req.name, **compile_spec(req.spec))
        self._check_base(req.base, ws)
        t = now()
        spec = req.model_dump(mode="json", exclude={"name", "build_env", "spec"},
                              exclude_none=True)
        if declared is not None:
            spec["declared"] = declared
        row = TemplateRow(id=new_id("template"), workspace_id=ws, name=req.name, spec=spec,
                          build_env=dict(req.build_env), created_at=t, updated_at=t)
        try:
            await self.records.insert(row)
        except IntegrityError as exc:
            raise ConflictError(f"a template named {req.name!r} exists already in this "
                                "workspace", field="name") from exc
        return self.to_model(row)

    async def update(self, template_id: str, req: TemplateUpdate, ws: str) -> Template:
        # read-modify-write of the spec: written only if no one changed the template since it
        # was read (its updated_at), else read again (another request or control plane)
        for _ in range(20):
            row = self.row(template_id, ws)
            spec = dict(row.spec or {})
            values: dict[str, Any] = {"updated_at": now()}
            for name in req.model_fields_set:
                value = getattr(req, name)
                if name == "name":
                    if value is not None:
                        values["name"] = value
                elif name == "build_env":
                    values["build_env"] = dict(value or {})
                elif name == "base":
                    base = value or TemplateBase()
                    self._check_base(base, ws, own_id=template_id)
                    spec["base"] = base.model_dump(mode="json", exclude_none=True)
                elif value is None:
                    spec.pop(name, None)
                else:
                    spec[name] = value.model_dump(mode="json", exclude_none=True) \
                        if hasattr(value, "model_dump") else value
            if req.model_fields_set - {"name"}:
                spec.pop("declared", None)  # the fields rule now, not the spec they came from
            values["spec"] = spec
            try:
                if await self.records.update(TemplateRow, template_id,
                                             when={"updated_at": row.updated_at}, **values):
                    break
            except IntegrityError as exc:
                raise ConflictError(f"a template named {req.name!r} exists already in this "
                                    "workspace", field="name") from exc
        else:
            raise ConflictError(f"template {template_id} changed while being updated; retry")
        return self.get(template_id, ws)

    async def delete(self, template_id: str, ws: str, force: bool = False) -> Template:
        row = self.row(template_id, ws)
        model = self.to_model(row)
        running = [b for b in self.records.all(BuildRow, BuildRow.template_id == template_id)
                   if b.state in (B.PENDING.value, B.BUILDING.value)]
        if running and not force:
            raise ConflictError(f"template {template_id} has a build in progress "
                                f"({running[0].id}); wait for it, or delete with force")
        for b in running:
            job = self._jobs.get(b.id)
            if job is not None:
                job.cancel()
                await asyncio.wait({job})
            # one whose job was not running here ends too: a build row is deleted (below) only
            # once it ended
            with contextlib.suppress(IllegalTransitionError):
                await self.records.transition(BuildRow, b.id, B.FAILED,
                                              expected=[B.PENDING, B.BUILDING],
                                              failed_step="deleted",
                                              error="deleted: the template was deleted",
                                              completed_at=now())
        for b in self.records.all(BuildRow, BuildRow.template_id == template_id):
            await self._release(b)
        await self.records.remove(TemplateRow, template_id)
        for b in self.records.all(BuildRow, BuildRow.template_id == template_id):
            await self.records.remove(BuildRow, b.id)
        log.info("%s: template %r deleted", template_id, row.name)
        return model

    async def _release(self, build: BuildRow) -> None:
        if build.snapshot_id:
            with contextlib.suppress(TenkiError):
                await self.snapshots.delete(build.snapshot_id, owner=build.template_id)

    # -- builds ------------------------------------------------------------------------------
    async def _base_ref(self, row: TemplateRow) -> str:
        """What the base of ``row`` is now: a rebuilt image, a new build of the base template
        or another snapshot changes it."""
        base = TemplateBase(**(row.spec or {}).get("base", {}))
        if base.template_id:
            latest = self.latest_ready(base.template_id)
            return f"template:{latest.id if latest else '-'}"
        if base.snapshot_id:
            return f"snapshot:{base.snapshot_id}"
        image = base.image or DEFAULT_IMAGE_ID
        return f"image:{image}@{await self.sessions.host.image_digest(image)}"

    def _fields_hash(self, row: TemplateRow) -> str:
        fields = {k: v for k, v in (row.spec or {}).items() if k != "declared"}
        return spec_hash(fields, dict(row.build_env or {}))

    async def build(self, template_id: str, ws: str) -> TemplateBuild:
        """A new build, or the latest READY one when neither the template's fields nor its
        base changed since it was made (it is answered as it is: READY)."""
        row = self.row(template_id, ws)
        digest, base_ref = self._fields_hash(row), await self._base_ref(row)
        latest = self.latest_ready(template_id)
        if latest is not None and (latest.spec_hash, latest.base_ref) == (digest, base_ref):
            log.info("%s: unchanged since build %s; reused", template_id, latest.id)
            return build_model(latest)

        def one_at_a_time(orm: Any) -> None:
            busy = orm.execute(select(func.count()).where(
                BuildRow.template_id == template_id,
                BuildRow.state.in_([B.PENDING.value, B.BUILDING.value]))).scalar_one()
            if busy:
                raise ConflictError("template build already in progress")
            # numbered in the insert's transaction (one check at a time, see Records)
            build.version = int(orm.execute(select(func.coalesce(func.max(BuildRow.version), 0))
                                .where(BuildRow.template_id == template_id)).scalar_one()) + 1

        build = BuildRow(id=new_id("build"), template_id=row.id, workspace_id=ws,
                         version=0, state=B.PENDING.value, log="",
                         spec_hash=digest, base_ref=base_ref, created_at=now())
        await self.records.insert(build, check=one_at_a_time)
        task = asyncio.ensure_future(self._run(build.id))
        task.set_name(f"build {build.id}")
        self._jobs[build.id] = task
        task.add_done_callback(lambda _t: self._jobs.pop(build.id, None))
        return build_model(build)

    async def _run(self, build_id: str) -> None:
        build = self.records.get(BuildRow, build_id)
        tpl = self.records.get(TemplateRow, build.template_id)
        spec = tpl.spec or {}
        ws = build.workspace_id
        blog = BuildLog(self.records, build_id)
        session_id: str | None = None
        step = "boot"
        try:
            await self.records.transition(BuildRow, build_id, B.BUILDING, started_at=now())
            await blog.line(f"build {build_id}: template {tpl.name} ({tpl.id}) "
                            f"version {build.version}")

            async def timed(name: str, work: Callable[[], Awaitable[Any]]) -> Any:
                nonlocal step
                step = name
                started = time.monotonic()
                await blog.line(f"step {name}: started")
                result = await work()
                await blog.line(f"step {name}: done in {time.monotonic() - started:.1f}s")
                return result

            session_id = await timed("boot", lambda: self._boot(tpl, spec, ws, blog))
            await self.records.update(BuildRow, build_id, session_id=session_id)
            assert session_id is not None
            sid = session_id
            env = dict(spec.get("env", {}))
            if spec.get("setup_script"):
                await timed("setup", lambda: self._setup(sid, spec["setup_script"],
                                                         {**env, **(tpl.build_env or {})},
                                                         blog))
            if spec.get("start_cmd"):
                await timed("start", lambda: self._start(sid, spec["start_cmd"], env, blog))
            if spec.get("ready_when"):
                await timed("ready", lambda: self._ready(sid, ReadyCheck(**spec["ready_when"]),
                                                         blog))
            snapshot_id = await timed("capture", lambda: self._capture(
                sid, tpl, build.version, ws, blog))
            step = "cleanup"
            await self._terminate(sid, blog)
            session_id = None
            await self.records.transition(BuildRow, build_id, B.READY, expected=[B.BUILDING],
                                          snapshot_id=snapshot_id, completed_at=now())
            await blog.line(f"build {build_id}: READY (golden snapshot {snapshot_id})")
            await blog.flush()
            for old in self.records.all(BuildRow, BuildRow.template_id == tpl.id):
                if old.id != build_id and old.state == B.READY.value:
                    await self._release(old)
        except asyncio.CancelledError:
            await self._fail(build_id, step, "the build was cancelled", blog)
            raise
        except Exception as exc:
            reason = exc.reason if isinstance(exc, StepFailed) else (
                exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}")
            log.warning("build %s failed at %s: %s", build_id, step, reason)
            await self._fail(build_id, step, reason, blog)
        finally:
            if session_id is not None:
                with contextlib.suppress(Exception):
                    await self._terminate(session_id, blog)

    async def _fail(self, build_id: str, step: str, reason: str, blog: BuildLog) -> None:
        with contextlib.suppress(Exception):
            await blog.line(f"step {step}: FAILED: {reason}")
            await blog.flush()
        with contextlib.suppress(IllegalTransitionError):
            await self.records.transition(BuildRow, build_id, B.FAILED,
                                          expected=[B.PENDING, B.BUILDING], failed_step=step,
                                          error=f"{step}: {reason}", completed_at=now())

    async def _boot(self, tpl: TemplateRow, spec: dict[str, Any], ws: str,
                    blog: BuildLog) -> str:
        base = TemplateBase(**spec.get("base", {}))
        req = SessionCreate(name=f"build-{tpl.name}"[:64], cpu=spec["cpu"],
                            memory_mb=spec["memory_mb"], env=spec.get("env", {}),
                            base_image_id=base.image)
        template_id = None
        if base.template_id:
            template_id, snap = self.golden_snapshot(base.template_id, ws)
            req = req.model_copy(update={"snapshot_id": snap})
        elif base.snapshot_id:
            req = req.model_copy(update={"snapshot_id": base.snapshot_id})
        if req.snapshot_id:
            # a restore keeps the snapshot's shape
            req = SessionCreate(name=req.name, env=req.env, snapshot_id=req.snapshot_id)
        session = await self.sessions.create(req, ws, template_id=template_id)
        await blog.line(f"build session {session.id} "
                        f"({'restoring ' + req.snapshot_id if req.snapshot_id else 'booting'})")
        row = await self.records.settled(SessionRow, session.id, BOOT_TIMEOUT_S)
        if row.state not in ("READY", "RUNNING"):
            raise StepFailed("boot", f"build session {session.id} is {row.state}"
                             + (f": {row.state_reason}" if row.state_reason else ""))
        return session.id

    async def _exec(self, session_id: str, req: ExecRequest, blog: BuildLog | None,
                    stdin: bytes | None = None) -> tuple[int | None, str]:
        """Run a process to its end; its exit code and (when ``blog`` is None) its output."""
        ref = await self.sessions.start_process(session_id, req)
        if stdin is not None:
            await self.sessions.process_stdin(session_id, ref.process_id, stdin)
            await self.sessions.process_close_stdin(session_id, ref.process_id)
        out: list[str] = []
        code: int | None = None
        events = self.sessions.process_events(session_id, ref.process_id)
        try:
            async for ev in events:
                if ev.type in ("stdout", "stderr"):
                    text = ev.data.decode(errors="replace")
                    if blog is not None:
                        await blog.write(text)
                    elif sum(map(len, out)) < 64 * 1024:
                        out.append(text)
                elif ev.type == "exit":
                    code = None if ev.timed_out else ev.exit_code
                elif ev.type == "error":
                    raise StepFailed("exec", str(ev.message))
        finally:
            await events.aclose()
        if blog is not None:
            await blog.flush()
        return code, "".join(out)

    async def _setup(self, session_id: str, script: str, env: dict[str, str],
                     blog: BuildLog) -> None:
        code, _ = await self._exec(session_id, ExecRequest(
            argv=["runuser", "-u", SANDBOX_USER, "--", "/bin/sh", "-se"],
            env=as_sandbox_user(env), cwd=SANDBOX_HOME, stdin=True), blog, stdin=script.encode())
        if code != 0:
            where = failed_step(blog.text)
            raise StepFailed("setup", f"the setup script exited with {code}"
                             + (f" at step {where}" if where else ""))

    async def _start(self, session_id: str, command: str, env: dict[str, str],
                     blog: BuildLog) -> None:
        # the log file is opened here, as root; the command runs as the sandbox user
        detached = (f"runuser -u {SANDBOX_USER} -- setsid -f /bin/sh -c "
                    f"{shlex.quote(command)} >>{START_LOG} 2>&1 </dev/null")
        code, _ = await self._exec(session_id, ExecRequest(
            argv=["/bin/sh", "-c", detached], env=as_sandbox_user(env), cwd=SANDBOX_HOME), blog)
        if code != 0:
            raise StepFailed("start", f"could not start {command!r} (exit {code})")
        await blog.line(f"started {command!r} (output in {START_LOG} in the guest)")

    async def _ready(self, session_id: str, check: ReadyCheck, blog: BuildLog) -> None:
        if check.port is not None:
            probe = ("import socket,sys; socket.create_connection(('127.0.0.1', "
                     f"{check.port}), 1).close()")
            argv, what = ["python3", "-c", probe], f"port {check.port} accepts"
        elif check.http_url is not None:
            probe = ("import sys,urllib.request,urllib.error\n"
                     "try: s = urllib.request.urlopen(sys.argv[1], timeout=2).status\n"
                     "except urllib.error.HTTPError as e: s = e.code\n"
                     "sys.exit(0 if s == int(sys.argv[2]) else 1)")
            argv = ["python3", "-c", probe, check.http_url, str(check.http_status)]
            what = f"{check.http_url} answers {check.http_status}"
        elif check.command is not None:
            argv, what = ["/bin/sh", "-c", check.command], f"{check.command!r} exits 0"
        else:
            return
        deadline = time.monotonic() + check.timeout_s
        tries = 0
        while True:
            tries += 1
            code, _ = await self._exec(session_id, ExecRequest(argv=argv, timeout_s=10), None)
            if code == 0:
                await blog.line(f"ready: {what} (after {tries} tries)")
                return
            if time.monotonic() >= deadline:
                raise StepFailed("ready", f"not ready after {check.timeout_s:g}s: {what} "
                                 f"never held ({tries} tries)")
            await asyncio.sleep(0.5)

    async def _capture(self, session_id: str, tpl: TemplateRow, version: int, ws: str,
                       blog: BuildLog) -> str:
        snap = await self.snapshots.create(
            SnapshotCreate(session_id=session_id, name=f"{tpl.name} v{version}"[:64]), ws,
            template_id=tpl.id)
        srow = await self.records.settled(SnapshotRow, snap.id, CAPTURE_TIMEOUT_S)
        if srow.state != "READY":
            raise StepFailed("capture", f"snapshot {snap.id} is {srow.state}"
                             + (f": {srow.state_reason}" if srow.state_reason else ""))
        await blog.line(f"golden snapshot {snap.id}: {srow.compressed_bytes} bytes stored")
        return snap.id

    async def _terminate(self, session_id: str, blog: BuildLog) -> None:
        await self.sessions.terminate(session_id, "template build finished")
        await blog.line(f"build session {session_id} terminated")

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a (re)start: builds in progress failed with the server; their sessions go."""
        for b in self.records.all(BuildRow):
            if b.state in (B.PENDING.value, B.BUILDING.value):
                with contextlib.suppress(IllegalTransitionError):
                    await self.records.transition(
                        BuildRow, b.id, B.FAILED, failed_step="server",
                        error="server: the server stopped during the build",
                        completed_at=now())
                if b.session_id:
                    srow = self.records.find(SessionRow, b.session_id)
                    if srow is not None and srow.state not in ("TERMINATED", "FAILED"):
                        with contextlib.suppress(TenkiError):
                            await self.sessions.terminate(b.session_id,
                                                          "its template build ended")

    async def shutdown(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        for job in list(self._jobs.values()):
            with contextlib.suppress(BaseException):
                await job


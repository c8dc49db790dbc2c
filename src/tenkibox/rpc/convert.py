"""Our records as Tenki's wire messages, and the wire's requests as our models.

The wire differs from our REST models in a few places, each decided here once:
- Session states: ``READY`` and ``RUNNING`` are both RUNNING on the wire (a usable session; the
  SDKs wait for exactly that word), ``FAILED`` is TERMINATED with ``terminal_error`` set. State
  value 2 does not exist on the wire and is never sent.
- Tags: the wire's session tags are kept in the session's metadata under ``tags`` (comma
  separated), which our REST surface shows as they are.
- Disk: every session has the image's disk (``DISK_SIZE_GB``); a request for another size is
  answered with the size it really has, never silently pretended.
- Network: ``inbound_enabled`` and ``outbound_enabled`` are the session's policy; ``egress``
  is set only when the session has an allow-list (unset: no list).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..models import Session, Snapshot, Volume
from . import proto

DISK_SIZE_GB = 4
TAGS_KEY = "tags"

_SESSION_STATES = {
    "CREATING": "CREATING", "READY": "RUNNING", "RUNNING": "RUNNING", "PAUSING": "PAUSING",
    "PAUSED": "PAUSED", "RESUMING": "RESUMING", "TERMINATING": "TERMINATING",
    "TERMINATED": "TERMINATED", "FAILED": "TERMINATED",
}
_SNAPSHOT_TYPES = {"USER": 1, "PAUSE": 2, "TEMPLATE": 3}


def session_state(state: str) -> int:
    wire = _SESSION_STATES.get(state, "UNSPECIFIED")
    return proto.enum_value("SessionState", f"SESSION_STATE_{wire}")


def session_states_of(wire: int) -> set[str]:
    """Our states that show as the wire's state number ``wire``."""
    name = proto.pool().FindEnumTypeByName(f"{proto.PACKAGE}.SessionState") \
        .values_by_number[wire].name.removeprefix("SESSION_STATE_")
    return {ours for ours, theirs in _SESSION_STATES.items() if theirs == name}


def stamp(msg: Any, field: str, when: datetime | None) -> None:
    if when is not None:
        getattr(msg, field).FromDatetime(when.astimezone(UTC))


def tags_of(metadata: dict[str, str]) -> list[str]:
    raw = metadata.get(TAGS_KEY, "")
    return [t for t in raw.split(",") if t]


def session(s: Session) -> Any:
    msg = proto.message("SandboxSession")()
    msg.id = s.id
    msg.state = session_state(s.state.value)
    msg.owner_type = "SERVICE"
    msg.owner_id = s.workspace_id
    msg.workspace_id = s.workspace_id
    msg.name = s.name or ""
    msg.cpu_cores = s.cpu
    msg.memory_mb = s.memory_mb
    msg.disk_size_gb = DISK_SIZE_GB
    msg.inbound_enabled = s.allow_inbound
    msg.outbound_enabled = s.egress.outbound
    if s.egress.allow_domains or s.egress.allow_cidrs:  # else unset: no allow-list
        msg.egress.allow_domains.extend(s.egress.allow_domains)
        msg.egress.allow_cidrs.extend(s.egress.allow_cidrs)
    meta = dict(s.metadata)
    msg.tags.extend(tags_of(meta))
    meta.pop(TAGS_KEY, None)
    msg.metadata.update(meta)
    stamp(msg, "created_at", s.created_at)
    stamp(msg, "ready_at", s.ready_at)
    stamp(msg, "terminated_at", s.terminated_at)
    stamp(msg, "timeout_at", s.expires_at)
    if s.snapshot_id:
        msg.snapshot_id = s.snapshot_id
        msg.source_snapshot_id = s.snapshot_id
    if s.template_id:
        msg.source_template_id = s.template_id
    if s.state.value == "FAILED":
        msg.terminal_error = s.state_reason or "the session failed"
    for v in s.volumes:
        a = msg.volume_attachments.add()
        a.id = f"{s.id}:{v.volume_id}"
        a.volume_id = v.volume_id
        a.session_id = s.id
        a.mount_path = v.path
        a.readonly = v.read_only
        a.state = "ATTACHED"
    return msg


def snapshot(s: Snapshot) -> Any:
    msg = proto.message("Snapshot")()
    msg.id = s.id
    msg.session_id = s.session_id
    if s.workspace_id:
        msg.workspace_id = s.workspace_id
    if s.name:
        msg.name = s.name
    msg.state = proto.enum_value("SnapshotState", f"SNAPSHOT_STATE_{s.state.value}")
    msg.size_bytes = s.size_bytes
    msg.compressed_bytes = s.compressed_bytes
    msg.memory_bytes = s.memory_bytes
    msg.base_image_id = s.base_image_id
    msg.cpu_cores = s.cpu
    msg.memory_mb = s.memory_mb
    msg.disk_size_gb = DISK_SIZE_GB
    msg.type = _SNAPSHOT_TYPES[s.type.value]
    stamp(msg, "created_at", s.created_at)
    stamp(msg, "expires_at", s.expires_at)
    if s.state.value == "READY":
        # stored on this host's disk and verified: as durable as this installation gets
        msg.durability_state = proto.enum_value(
            "SnapshotDurabilityState", "SNAPSHOT_DURABILITY_STATE_LOCAL_READY")
        stamp(msg, "local_ready_at", s.ready_at)
    if s.state.value == "FAILED":
        msg.failure_reason = s.state_reason or "the capture failed"
    msg.restore_mode = "memory"
    return msg


def volume(v: Volume) -> Any:
    msg = proto.message("Volume")()
    msg.id = v.id
    msg.workspace_id = v.workspace_id
    msg.name = v.name
    msg.size_bytes = v.size_bytes
    msg.state = proto.enum_value("VolumeState", f"VOLUME_STATE_{v.state.value}")
    msg.created_at = v.created_at.astimezone(UTC).isoformat()
    msg.updated_at = msg.created_at
    return msg


def attachment(v: Volume) -> Any:
    msg = proto.message("VolumeAttachment")()
    msg.id = f"{v.session_id}:{v.id}" if v.session_id else v.id
    msg.volume_id = v.id
    msg.session_id = v.session_id or ""
    msg.mount_path = v.path or ""
    msg.readonly = v.read_only
    msg.state = "ATTACHED" if v.session_id else "DETACHED"
    return msg

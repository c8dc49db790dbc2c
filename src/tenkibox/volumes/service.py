"""Volumes: durable block storage, attached explicitly, never part of a snapshot."""

from __future__ import annotations

from ..config import Layout
from ..errors import ConflictError, VolumeNotFoundError
from ..models import Session, Volume, VolumeAttach, VolumeCreate
from ..sessions.service import SessionService
from ..store.db import Store


class VolumeService:
    def __init__(self, layout: Layout, store: Store, sessions: SessionService) -> None:
        self.layout = layout
        self.store = store
        self.sessions = sessions

    async def create(self, req: VolumeCreate) -> Volume:
        raise ConflictError("volumes are not available yet")

    def list(self) -> list[Volume]:
        return []

    def get(self, volume_id: str) -> Volume:
        raise VolumeNotFoundError(f"volume {volume_id} not found")

    async def delete(self, volume_id: str) -> Volume:
        raise VolumeNotFoundError(f"volume {volume_id} not found")

    async def attach(self, session_id: str, req: VolumeAttach) -> Session:
        raise VolumeNotFoundError(f"volume {req.volume_id} not found")

    async def detach(self, session_id: str, volume_id: str) -> Session:
        raise VolumeNotFoundError(f"volume {volume_id} not found")

    async def recover(self) -> None:
        return None

"""What every host operation needs: paths, the artifact store, the RAM cache, the accelerator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts.store import ArtifactStore
from ..engine.machine import MachineConfig
from .api import MachineShape
from .network import HostNetwork
from .ramcache import RamCache
from .vm import HostLayout


@dataclass
class HostContext:
    layout: HostLayout
    store: ArtifactStore
    ram_cache: RamCache
    accel: str
    network: HostNetwork
    #: digests of the current images' files: never collected, the next boot uses them
    image_digests: set[str] = field(default_factory=set)

    def machine_config(self, shape: MachineShape, ram_base: Path | None) -> MachineConfig:
        return MachineConfig(cpu=shape.cpu, memory_mb=shape.memory_mb, accel=self.accel,
                             kernel=str(self.store.local_path(shape.kernel)),
                             initrd=str(self.store.local_path(shape.initrd)),
                             cmdline=shape.cmdline, hotplug_ports=shape.hotplug_ports,
                             ram_base=str(ram_base) if ram_base else None)

    def image_artifacts(self, image_id: str) -> tuple[str, str, str, str]:
        """(disk, kernel, initrd) digests of an image, stored (built if missing), + cmdline.

        The image's files are hashed once per change (``ArtifactStore.ingest``) and linked into
        the store, so a rebuilt image never breaks a VM or snapshot that uses the old one."""
        from ..images import builder

        builder.ensure_image(self.layout.layout, image_id)
        paths = builder.image_paths(self.layout.layout, image_id)
        out = [self.store.ingest(src) for src in (paths.disk, paths.kernel, paths.initrd)]
        self.image_digests.update(out)
        return out[0], out[1], out[2], builder.BOOT_CMDLINE

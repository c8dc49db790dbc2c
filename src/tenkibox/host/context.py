"""What every host operation needs: paths, the artifact store, the RAM cache, the accelerator."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts.digests import sha256_file
from ..artifacts.store import ArtifactError, ArtifactStore
from ..engine.machine import MachineConfig
from ..engine.writetrack import Library
from ..errors import InternalError
from .api import ImageDamagedError, MachineShape
from .network import HostNetwork
from .ramcache import RamCache
from .vm import HostLayout

log = logging.getLogger(__name__)


@dataclass
class HostContext:
    layout: HostLayout
    store: ArtifactStore
    ram_cache: RamCache
    accel: str
    network: HostNetwork
    #: digests of the current images' files: never collected, the next boot uses them
    image_digests: set[str] = field(default_factory=set)
    #: the library a VM's QEMU loads for its writes to be tracked
    #: (``engine/writetrack.py``); None where they cannot be
    write_tracking: Library | None = None

    def __post_init__(self) -> None:
        # from the start: a collection before the first boot would otherwise remove them, and
        # that boot would read every file in full again to store it
        self.image_digests.update(self.built_images())

    def tracking(self) -> Path | None:
        """The write-tracking library for a QEMU about to start, checked
        (``engine/writetrack.py``); None where there is none, or it cannot be built again (the
        VM then runs untracked)."""
        if self.write_tracking is None:
            return None
        try:
            return self.write_tracking.path()
        except OSError as exc:
            log.warning("write tracking: %s; the VM runs untracked", exc)
            return None

    def built_images(self) -> dict[str, tuple[str, str]]:
        """digest -> (image id, kind) of every file of every built image, as its build
        recorded them."""
        from ..images import builder

        out: dict[str, tuple[str, str]] = {}
        for image in builder.list_images(self.layout.layout):
            for kind, digest in (builder.recorded_digests(self.layout.layout, image.id)
                                 or {}).items():
                out.setdefault(digest, (image.id, kind))
        return out

    def machine_config(self, shape: MachineShape, ram_base: Path | None,
                       ram_shared: bool = False) -> MachineConfig:
        return MachineConfig(cpu=shape.cpu, memory_mb=shape.memory_mb, accel=self.accel,
                             kernel=str(self.store.local_path(shape.kernel)),
                             initrd=str(self.store.local_path(shape.initrd)),
                             cmdline=shape.cmdline, hotplug_ports=shape.hotplug_ports,
                             cpu_model=shape.cpu_model, ram_pad=shape.ram_pad,
                             ram_base=str(ram_base) if ram_base else None,
                             ram_shared=ram_shared)

    def image_artifacts(self, image_id: str) -> tuple[str, str, str, str]:
        """(disk, kernel, initrd) digests of an image, stored and verified, + cmdline.

        The digests are the ones its build recorded (``image.json``), never the files' current
        content: a file damaged since is refused (``ImageDamagedError`` naming it by its path in
        the data directory), whatever it now hashes to. A VM uses the stored copies, which the
        store verifies as for a restore (re-read when their stat changed; the scrub re-reads
        them in full). A file not stored yet is read in full once, when it is stored. The store
        hard-links it, so a rebuilt image never breaks a VM or snapshot that uses the old one."""
        from ..images import builder

        builder.ensure_image(self.layout.layout, image_id)
        paths = builder.image_paths(self.layout.layout, image_id)
        files = {"disk": paths.disk, "kernel": paths.kernel, "initrd": paths.initrd}

        def recorded() -> dict[str, str]:
            got = builder.recorded_digests(self.layout.layout, image_id)
            if got is None:
                raise InternalError(f"image {image_id} records no digests of its files")
            return got

        digests = recorded()
        try:
            for kind, src in files.items():
                self._store_image_file(image_id, kind, src, digests[kind])
        except ImageDamagedError:
            # read again once if a rebuild swapped the image in between (its record and files
            # go together); a file that does not match the record it is read with is damaged
            if recorded() == digests:
                raise
            digests = recorded()
            for kind, src in files.items():
                self._store_image_file(image_id, kind, src, digests[kind])
        out = [digests[kind] for kind in files]
        self.image_digests.update(out)
        return out[0], out[1], out[2], builder.BOOT_CMDLINE

    def _store_image_file(self, image_id: str, kind: str, src: Path, digest: str) -> None:
        home = self.layout.layout.home
        # named by its path in the data directory: the message reaches API clients
        name = src.relative_to(home) if src.is_relative_to(home) else src.name

        def damaged(why: str) -> ImageDamagedError:
            return ImageDamagedError(f"image {image_id} cannot be booted: its {kind} {name} "
                                     f"is damaged: {why}; rebuild it (tenki image build --force)")

        if not self.store.has(digest):
            try:
                got = sha256_file(src)
            except OSError as exc:
                raise damaged(f"unreadable ({exc.strerror})") from exc
            if got != digest:
                raise damaged(f"its content hashes to {got[:12]}, its build recorded "
                              f"{digest[:12]}")
            self.store.put(src, digest=digest)
        try:
            self.store.verify(digest, "stored copy")
        except ArtifactError as exc:
            raise damaged(exc.message) from exc

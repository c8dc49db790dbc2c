"""The guest image: a Debian bookworm root filesystem, its kernel and a tiny initrd.

Built from Debian packages with mmdebstrap (``--variant=minbase``), with the guest agent at
``/usr/lib/tenki/agentd`` (compiled from ``guest/agentd``: ``images/agentd.py``) and
``tenki-init`` as PID 1. The result, in
``layout.image_dir(image_id)``:

    base.qcow2   the root filesystem (ext4 on the whole disk, no partition table), read-only:
                 sessions run on qcow2 overlays on top of it
    vmlinuz      the kernel (Debian's linux-image-cloud-amd64)
    initrd.img   busybox + the modules needed to mount /dev/vda, then switch_root (~1 MB; a
                 Debian initramfs boots ~4 s slower under TCG)
    image.json   the ``Image`` record, plus the hash of the guest sources it was built from and
                 the sha256 of the disk, kernel and initrd as the build wrote them (``sha256``):
                 a boot refuses a file whose stored copy no longer matches it

Everything is built in a temporary directory next to it and swapped in atomically, so a reader
sees the old image or the new one, never half of one. ``ensure_image`` rebuilds when the guest
sources (agent, init, initrd, package list) no longer match the hash, so that a change to the
agent reaches new sessions. An image whose ``image.json`` has no ``sha256`` (built by an older
tenki) is rebuilt the same way; one that cannot be rebuilt here has the digests of its current
files recorded once, under the build lock (``_record_digests``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..artifacts.digests import sha256_file
from ..config import Layout
from ..errors import InternalError, ValidationError
from ..fsync import fsync_path
from ..models import Image
from . import agentd

log = logging.getLogger(__name__)

Progress = Callable[[str, float | None], None]

SUITE = "bookworm"
DEFAULT_MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
PACKAGES = [
    "python3",
    "linux-image-cloud-amd64",
    "iproute2",
    "kmod",
    "procps",
    "e2fsprogs",
    "util-linux",
    "ca-certificates",
    "netbase",  # /etc/services and /etc/protocols: getservbyname() and many tools need them
    # what users expect in a sandbox (the product's base ships Python, Node, git and curl)
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "git",
    "curl",
    "build-essential",
    "sudo",  # the sandbox user ``tenki`` may do anything, as in the product
]
DEFAULT_DISK_SIZE = 4 << 30  # room for installs: the packages take ~0.9 GiB of it
# Bump when the recipe changes in a way the hashed sources below do not show.
BUILD_REVISION = "3"  # 2: the sandbox user tenki; 3: a 4 GiB disk

SANDBOX_USER = "tenki"
SANDBOX_UID = 1000
SANDBOX_HOME = f"/home/{SANDBOX_USER}"

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
INIT_SOURCE = GUEST_DIR / "init"
#: files of /etc that are links into /run/tenki (tmpfs), written at each boot and restore
IDENTITY_FILES = ("machine-id", "hostname", "hosts")
AGENT_PATH = "/usr/lib/tenki/agentd"
INIT_PATH = "/usr/sbin/tenki-init"

DISK_FILE, KERNEL_FILE, INITRD_FILE, META_FILE = "base.qcow2", "vmlinuz", "initrd.img", "image.json"
#: the files a boot uses, by the kind its errors name them with
BOOT_FILES = {"disk": DISK_FILE, "kernel": KERNEL_FILE, "initrd": INITRD_FILE}

#: The kernel command line for the image; the engine appends ``tenki.hostname=...`` (and may
#: append ``tenki.net=IP/PREFIX,GATEWAY,DNS``, see guest/init).
BOOT_CMDLINE = (
    f"console=ttyS0 root=/dev/vda rootfstype=ext4 rw init={INIT_PATH} quiet "
    "net.ifnames=0 mitigations=off tsc=reliable no_timer_check panic=-1 "
    # Under TCG every boot-time self test and probe is slow, and none of them helps a sandbox.
    "cryptomgr.notests 8250.nr_uarts=1 i8042.noaux i8042.nopnp "
    # No address space randomization. QEMU 7.2 finds translated x86 code by its virtual address
    # too: with randomization each process has its loader and libraries elsewhere, so every
    # program start under TCG translated them again. Without it, in a guest: 50 runs of
    # /bin/true 1.36-1.55 s -> 0.27-0.34 s, 5 of `python3 -c pass` 0.89 -> 0.61 s, an exec
    # through the SDK 44-49 -> 29-33 ms (the same session, the sysctl switched); a restored
    # clone's first exec finds what its warm-up translated. Inside the guest it protects
    # nothing here: its user may do anything (sudo), like mitigations=off above.
    "norandmaps "
    # ext4 reads every group's block bitmap in the background after the mount; a snapshot
    # taken soon after boot left that pending, so each clone went on with it (its kernel
    # thread and disk reads among the first blocks it translated). It reads one when needed.
    "rootflags=no_prefetch_block_bitmaps"
)

# Modules the initrd loads (with their dependencies, from modules.dep; built-in ones skipped):
# first the root disk's, then, while the root is mounted, the ones tenki-init needs (busybox's
# static insmod here is much cheaper under TCG than Debian's modprobe later, and the RNG gets
# seeded sooner).
INITRD_ROOT_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
INITRD_MODULES = ["virtio_rng", "virtio_console", "virtio_net"]

# The initrd also mounts what tenki-init would (it checks and skips what is there): each exec of
# the static busybox costs a fraction of one of Debian's dynamically linked tools.
INITRD_INIT = r"""#!/bin/sh
# tenki initrd: load modules, mount the root disk and the kernel filesystems, hand over to init.
export PATH=/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
for m in $(cat /modules.root); do
    insmod "/modules/$m" || echo "tenki-initrd: insmod $m failed"
done
(
    for m in $(cat /modules.rest); do
        insmod "/modules/$m" || echo "tenki-initrd: insmod $m failed"
    done
) &
root=/dev/vda fstype=ext4 flags= mode=rw init=/sbin/init
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        root=/dev/*) root=${arg#root=} ;;
        rootfstype=?*) fstype=${arg#rootfstype=} ;;
        rootflags=?*) flags=,${arg#rootflags=} ;;
        init=/*) init=${arg#init=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
    esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if ! mount -t "$fstype" -o "$mode$flags" "$root" /newroot; then
    # Powering off makes QEMU exit, which the host sees at once (with this on the console).
    echo "tenki-initrd: cannot mount $root ($fstype) as the root filesystem; powering off"
    sleep 1
    poweroff -f
fi
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -o move /dev /newroot/dev
mount -o move /proc /newroot/proc
mount -o move /sys /newroot/sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup
mount -t tmpfs -o nosuid,nodev,mode=0755 run /newroot/run
mkdir -p /newroot/run/lock
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /newroot/tmp
wait
exec switch_root /newroot "$init"
"""
BUSYBOX_APPLETS = ["sh", "mount", "insmod", "mkdir", "ln", "sleep", "cat", "echo", "poweroff",
                   "switch_root"]
BUSYBOX_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox"]

STEPS = {  # the overall fraction done when each step starts
    "agent": 0.0,
    "bootstrap": 0.02,
    "customize": 0.76,
    "kernel": 0.78,
    "initrd": 0.79,
    "filesystem": 0.8,
    "qcow2": 0.88,
    "publish": 0.97,
}
_BOOTSTRAP_STAGES = [  # mmdebstrap's own "I: ..." lines, mapped into the bootstrap step
    ("downloading", 0.05),
    ("extracting", 0.2),
    ("installing essential", 0.3),
    ("installing remaining", 0.45),
    ("cleaning", 0.72),
]


class ImageBuildError(InternalError):
    """A build step failed; the message names the command and ends with its stderr."""


@dataclass(frozen=True)
class ImagePaths:
    disk: Path
    kernel: Path
    initrd: Path


def image_paths(layout: Layout, image_id: str) -> ImagePaths:
    d = layout.image_dir(_check_id(image_id))
    return ImagePaths(disk=d / DISK_FILE, kernel=d / KERNEL_FILE, initrd=d / INITRD_FILE)


def recorded_digests(layout: Layout, image_id: str) -> dict[str, str] | None:
    """kind ("disk", "kernel", "initrd") -> the sha256 its file had when the image was built,
    or None when the image is missing or its ``image.json`` records none."""
    return _digests_of(_read_meta(layout, _check_id(image_id)))


def _digests_of(meta: dict[str, object] | None) -> dict[str, str] | None:
    got = meta.get("sha256") if meta is not None else None
    if not isinstance(got, dict) or set(got) != set(BOOT_FILES):
        return None
    if not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in got.values()):
        return None
    return {str(k): str(v) for k, v in got.items()}


def _file_digests(d: Path) -> dict[str, str]:
    return {kind: sha256_file(d / name) for kind, name in BOOT_FILES.items()}


def source_hash() -> str:
    """What the guest is built from, as far as tenki's own code decides it."""
    h = hashlib.sha256()
    for part in (
        BUILD_REVISION.encode(),
        BOOT_CMDLINE.encode(),
        agentd.source_digest(),
        INIT_SOURCE.read_bytes(),
        INITRD_INIT.encode(),
        " ".join(PACKAGES).encode(),
        " ".join(INITRD_ROOT_MODULES + INITRD_MODULES).encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _check_id(image_id: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", image_id):
        raise ValidationError(
            f"invalid image id {image_id!r} (lowercase letters, digits, '_', '.', '-')",
            field="image_id")
    return image_id


def _read_meta(layout: Layout, image_id: str) -> dict[str, object] | None:
    d = layout.image_dir(image_id)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if not all((d / name).is_file() for name in (DISK_FILE, KERNEL_FILE, INITRD_FILE)):
        return None
    return meta


def _image_from_meta(meta: dict[str, object]) -> Image | None:
    try:
        return Image.model_validate({k: v for k, v in meta.items() if k in Image.model_fields})
    except ValueError:
        return None


def get_image(layout: Layout, image_id: str) -> Image | None:
    """The built image, or None if there is none (or only a broken one)."""
    meta = _read_meta(layout, _check_id(image_id))
    return _image_from_meta(meta) if meta is not None else None


def list_images(layout: Layout) -> list[Image]:
    try:
        entries = sorted(p.name for p in layout.images.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    images = []
    for name in entries:
        if name.startswith(".") or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", name):
            continue
        image = get_image(layout, name)
        if image is not None:
            images.append(image)
    return images


def ensure_image(layout: Layout, image_id: str = "sandbox",
                 progress: Progress | None = None) -> Image:
    """The image, built first if it is missing or was built from other guest sources.

    Concurrent callers (threads or processes) wait for one build instead of building twice.
    """
    return build_image(layout, image_id, force=False, progress=progress)


def build_image(layout: Layout, image_id: str = "sandbox", *, force: bool = False,
                progress: Progress | None = None,
                disk_size: int = DEFAULT_DISK_SIZE) -> Image:
    """Build the image (~70 s, mostly mmdebstrap). Without ``force``, an up-to-date image is
    returned as it is. Needs root, mmdebstrap, mkfs.ext4, qemu-img and busybox-static."""
    _check_id(image_id)
    if disk_size < (512 << 20):
        raise ValidationError("the guest disk needs at least 512 MiB", field="disk_size")
    wanted = source_hash()
    if not force:
        current = _up_to_date(layout, image_id, wanted)
        if current is not None:
            return current
    layout.images.mkdir(parents=True, exist_ok=True)
    with _lock(layout.images / f".{image_id}.lock"):
        if not force:
            # Another process may have finished the build while we waited for the lock.
            current = _up_to_date(layout, image_id, wanted)
            if current is not None:
                return current
            stale = get_image(layout, image_id)
            if stale is not None:
                try:
                    _check_prerequisites()
                except ImageBuildError as exc:
                    # Booting the previous agent beats failing every session on this host.
                    log.warning("image %s was built from other guest sources or by an older "
                                "tenki but cannot be rebuilt here (%s); using it as it is",
                                image_id, exc)
                    if recorded_digests(layout, image_id) is None:
                        _record_digests(layout, image_id)
                    return stale
                log.info("image %s was built from other guest sources or by an older tenki: "
                         "rebuilding", image_id)
        return _build_locked(layout, image_id, wanted, progress or _no_progress, disk_size)


def _up_to_date(layout: Layout, image_id: str, wanted: str) -> Image | None:
    meta = _read_meta(layout, image_id)
    # without the digests of its files a boot could not tell a damaged image from a good one
    if meta is None or meta.get("source_hash") != wanted or _digests_of(meta) is None:
        return None
    return _image_from_meta(meta)


def _record_digests(layout: Layout, image_id: str) -> None:
    """Record the digests of an image built before they were recorded (called under the build
    lock, when it cannot be rebuilt). They are trusted on first use: a file damaged before this
    goes unnoticed, one damaged after is refused."""
    d = layout.image_dir(image_id)
    meta = _read_meta(layout, image_id)
    if meta is None:
        return
    meta["sha256"] = _file_digests(d)
    meta["sha256_recorded"] = "at first use (built by an older tenki)"
    _write_meta(d, meta)
    log.warning("image %s: recorded the sha256 of its files as they are now (it was built "
                "before they were recorded); rebuild it to be sure of them", image_id)


def _write_meta(d: Path, meta: dict[str, object]) -> None:
    """Replace ``d/image.json`` atomically (a reader sees the old record or the new one)."""
    tmp = d / f".{META_FILE}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o444)
        fsync_path(tmp)
        os.replace(tmp, d / META_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(d)


def _no_progress(step: str, fraction: float | None) -> None:
    pass


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The build


def _build_locked(layout: Layout, image_id: str, wanted_hash: str, progress: Progress,
                  disk_size: int) -> Image:
    _check_prerequisites()
    _remove_leftovers(layout, image_id)
    started = time.monotonic()
    log.info("building image %s in %s", image_id, layout.images)
    work = layout.images / f".build-{image_id}-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        out = work / "out"
        out.mkdir()
        rootfs = work / "rootfs"

        progress("agent", STEPS["agent"])
        # first: a toolchain that fails should fail the build before the minute of bootstrap
        try:
            agent = agentd.build(work / "agentd", cache_dir=layout.images / ".go-cache")
        except agentd.AgentBuildError as e:
            raise ImageBuildError(str(e)) from e

        progress("bootstrap", STEPS["bootstrap"])
        _bootstrap(rootfs, progress)

        progress("customize", STEPS["customize"])
        _customize(rootfs, agent)
        packages = _installed_packages(rootfs)

        progress("kernel", STEPS["kernel"])
        kernel_version, vmlinuz = _find_kernel(rootfs)
        shutil.copyfile(vmlinuz, out / KERNEL_FILE)

        progress("initrd", STEPS["initrd"])
        (out / INITRD_FILE).write_bytes(_build_initrd(rootfs, kernel_version))
        # Sessions boot the kernel from the host side: the guest's copy would only take space.
        for p in (rootfs / "boot").glob("vmlinuz*"):
            p.unlink()
        for p in (rootfs / "boot").glob("initrd.img*"):
            p.unlink()

        progress("filesystem", STEPS["filesystem"])
        raw = work / "disk.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "tenki-root", "-m", "0", "-d", str(rootfs),
              # Initialized now, once, rather than by ext4lazyinit in every session (which
              # would write the inode tables into each session's overlay). A new sparse file
              # reads as zeros already: discarding it only costs time (~4 s here).
              "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
              str(raw), str(disk_size // 1024) + "k"])
        _rmtree(rootfs)

        progress("qcow2", STEPS["qcow2"])
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
              str(out / DISK_FILE)])
        raw.unlink()

        progress("publish", STEPS["publish"])
        size = sum((out / n).stat().st_size for n in (DISK_FILE, KERNEL_FILE, INITRD_FILE))
        wanted = {name: version for name, version in packages if name in PACKAGES}
        image = Image(
            id=image_id,
            size_bytes=size,
            created_at=datetime.now(UTC),
            kernel=kernel_version,
            packages=[f"{name}={wanted[name]}" for name in PACKAGES if name in wanted],
        )
        meta = json.loads(image.model_dump_json())
        meta.update(
            source_hash=wanted_hash,
            boot_cmdline=BOOT_CMDLINE,
            disk_virtual_size=disk_size,
            build_seconds=round(time.monotonic() - started, 1),
            suite=SUITE,
            # what a boot compares the stored copies with (``host.context.image_artifacts``)
            sha256=_file_digests(out),
        )
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (out / "packages.txt").write_text("".join(f"{n}={v}\n" for n, v in packages))
        for p in out.iterdir():
            os.chmod(p, 0o444)
            fsync_path(p)
        fsync_path(out)
        _publish(out, layout.image_dir(image_id))
        log.info("built image %s (kernel %s, %d bytes) in %.0f s", image_id, kernel_version,
                 size, time.monotonic() - started)
        progress("done", 1.0)
        return image
    finally:
        _rmtree(work)
        old = layout.images / f".old-{image_id}"
        if old.exists():
            _rmtree(old)


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the guest image needs root (mmdebstrap creates device nodes and files "
            "owned by other users, and mkfs.ext4 -d copies that ownership)")
    missing = [t for t in ("mmdebstrap", "mkfs.ext4", "qemu-img") if shutil.which(t) is None]
    if missing:
        raise ImageBuildError(
            f"missing tools: {', '.join(missing)} "
            "(apt-get install mmdebstrap e2fsprogs qemu-utils busybox-static)")
    _busybox()
    try:
        agentd.find_go()
    except agentd.AgentBuildError as e:
        raise ImageBuildError(str(e)) from e


def _remove_leftovers(layout: Layout, image_id: str) -> None:
    """Work directories of builds that died (we hold the lock: nobody else is building)."""
    stale = [*layout.images.glob(f".build-{image_id}-*"), layout.images / f".old-{image_id}"]
    for p in stale:
        if p.exists():
            _rmtree(p)


def _rmtree(path: Path) -> None:
    # A build killed inside mmdebstrap can leave /proc, /sys or /dev bind mounts in its rootfs:
    # deleting through them would delete the host's files.
    _umount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def _umount_below(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/self/mounts") as f:
            targets = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        return
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], capture_output=True)


def _run(argv: list[str], *, timeout: float = 1800) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        raise ImageBuildError(_failure(argv, e.returncode, e.stderr or e.stdout or "")) from e
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(f"`{_cmd(argv)}` did not finish within {timeout:g}s") from e
    except OSError as e:
        raise ImageBuildError(f"cannot run `{_cmd(argv)}`: {e}") from e
    return str(r.stdout)


def _cmd(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) < 300 else text[:300] + " ..."


def _failure(argv: list[str], status: int, stderr: str) -> str:
    tail = "\n".join(stderr.strip().splitlines()[-25:])
    return f"`{_cmd(argv)}` failed with status {status}:\n{tail}"


# -- bootstrap ---------------------------------------------------------------------------------


def host_mirrors(apt: Path = Path("/etc/apt")) -> list[str]:
    """The host's apt sources for the suite, as one-line entries (Debian's defaults if none).

    The guest keeps them in its apt configuration, so apt inside a session uses the same mirror
    (or snapshot) as the host that built it.
    """
    entries: list[str] = []
    suites = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    listd = apt / "sources.list.d"
    files = [apt / "sources.list", *sorted(listd.glob("*.list")), *sorted(listd.glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                    elif ":" in line:
                        key, value = line.split(":", 1)
                        key = key.strip().lower()
                        fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                comps = fields.get("components", "").split()
                opts = f"[signed-by={fields['signed-by']}] " if fields.get(
                    "signed-by", "").startswith("/") else ""
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        if suite in suites and "main" in comps:
                            entries.append(f"deb {opts}{uri} {suite} {' '.join(comps)}")
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                m = re.match(r"^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
                if m and m.group(3) in suites and "main" in m.group(4).split():
                    entries.append(f"deb {m.group(1) or ''}{m.group(2)} {m.group(3)} {m.group(4)}")
    return list(dict.fromkeys(entries)) or list(DEFAULT_MIRRORS)


def _bootstrap(rootfs: Path, progress: Progress) -> None:
    stub = "/usr/sbin/update-initramfs"
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(PACKAGES),
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--aptopt=Acquire::Retries \"3\"",
        # Keep the package lists: apt-get install works in a fresh session without an update.
        "--skip=cleanup/apt/lists",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        # Sessions boot tenki's initrd: Debian's would cost ~10 s to generate, here and at
        # every package install in the guest that triggers it.
        f"--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add {stub}"
        f" && printf '#!/bin/sh\\nexit 0\\n' > \"$1{stub}\" && chmod 0755 \"$1{stub}\"",
        SUITE,
        str(rootfs),
        *host_mirrors(),
    ]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        raise ImageBuildError(f"cannot run mmdebstrap: {e}") from e
    assert proc.stderr is not None
    span = STEPS["customize"] - STEPS["bootstrap"]
    for line in proc.stderr:
        tail.append(line.rstrip())
        if line.startswith("I: "):
            for key, frac in _BOOTSTRAP_STAGES:
                if line[3:].startswith(key):
                    progress(f"bootstrap: {line[3:].strip().rstrip('.')}",
                             STEPS["bootstrap"] + span * frac)
                    break
    status = proc.wait()
    if status != 0:
        raise ImageBuildError(_failure(argv, status, "\n".join(tail))) from (
            subprocess.CalledProcessError(status, argv, stderr="\n".join(tail)))


def _customize(rootfs: Path, agent: Path) -> None:
    installed = rootfs / AGENT_PATH.lstrip("/")
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(agent, installed)
    os.chmod(installed, 0o755)
    init = rootfs / INIT_PATH.lstrip("/")
    shutil.copyfile(INIT_SOURCE, init)
    os.chmod(init, 0o755)
    etc = rootfs / "etc"
    # Empty: each boot makes one (tenki-init), each restored clone gets one (reidentify).
    (etc / "machine-id").write_text("")
    (etc / "hostname").write_text("tenki\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "fstab").write_text("# tenki: / is mounted by the initrd; nothing else is.\n")
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("nameserver 10.0.2.3\n")
    mtab = etc / "mtab"
    if not (mtab.exists() or mtab.is_symlink()):
        mtab.symlink_to("../proc/self/mounts")
    # the sandbox user, as in the product: HOME /home/tenki, passwordless sudo (template builds
    # run their setup as it)
    _run(["chroot", str(rootfs), "useradd", "--create-home", "--shell", "/bin/bash",
          "--uid", str(SANDBOX_UID), "--user-group", SANDBOX_USER])
    sudoers = etc / "sudoers.d" / SANDBOX_USER
    sudoers.write_text(f"{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    os.chmod(sudoers, 0o440)
    # The identity files are each boot's (tenki-init writes them) and each restored clone's
    # (the agent's ``settle``): on tmpfs, where a clone rewrites them without a write to ext4
    # (the first one after a restore took 43-50 ms of the guest's 78-93 ms of ``settle``).
    # Relative, so that a path under another root resolves inside it.
    for name in IDENTITY_FILES:
        (etc / name).unlink(missing_ok=True)
        (etc / name).symlink_to(f"../run/tenki/{name}")


def _installed_packages(rootfs: Path) -> list[tuple[str, str]]:
    out = _run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                "-f=${Package}\t${Version}\n"])
    return sorted(tuple(line.split("\t", 1)) for line in out.splitlines()  # type: ignore[misc]
                  if "\t" in line)


def _find_kernel(rootfs: Path) -> tuple[str, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError(f"no kernel in {rootfs / 'boot'} (is linux-image-* installed?)")
    vmlinuz = kernels[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return version, vmlinuz


# -- initrd ------------------------------------------------------------------------------------


def _modules_dir(rootfs: Path, version: str) -> Path:
    for base in ("usr/lib/modules", "lib/modules"):
        d = rootfs / base / version
        if (d / "modules.dep").exists():
            return d
    raise ImageBuildError(f"no modules.dep for kernel {version} in {rootfs}")


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)
    return name.replace("-", "_")


def resolve_modules(modules_dir: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` and their dependencies, dependencies
    first; built-in modules are left out."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        builtin = {_module_name(x) for x in (modules_dir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(mod: str, chain: tuple[str, ...]) -> None:
        if mod in order or mod in chain:
            return
        for dep in deps.get(mod, []):
            visit(dep, (*chain, mod))
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key not in builtin:
            raise ImageBuildError(f"kernel module {name} is neither built in nor in modules.dep")
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return data


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        p = Path(candidate)
        if p.is_file() and _is_static_elf(p):
            return p
    raise ImageBuildError(
        "no statically linked busybox found (apt-get install busybox-static): the initrd has "
        "no C library to load a dynamic one")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only (the guest is x86_64)
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


class _Cpio:
    """A cpio archive in the kernel's "newc" format, built in memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08x" % v for v in fields))
        self.buf.write(encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _build_initrd(rootfs: Path, kernel_version: str) -> bytes:
    mdir = _modules_dir(rootfs, kernel_version)
    root = resolve_modules(mdir, INITRD_ROOT_MODULES)
    rest = [m for m in resolve_modules(mdir, INITRD_MODULES) if m not in root]
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    for listing, modules in (("modules.root", root), ("modules.rest", rest)):
        names = []
        for rel in modules:
            name = _module_name(rel) + ".ko"
            cpio.file(f"modules/{name}", _module_bytes(mdir / rel))
            names.append(name)
        cpio.file(listing, "".join(f"{n}\n" for n in names).encode())
    cpio.file("init", INITRD_INIT.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


# -- publishing --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _publish(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest``: one atomic exchange when ``dest`` exists, else one rename."""
    if not dest.exists():
        os.rename(new, dest)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        swapped = False
        if renameat2 is not None:
            rc = renameat2(_AT_FDCWD, str(new).encode(), _AT_FDCWD, str(dest).encode(),
                           _RENAME_EXCHANGE)
            if rc == 0:
                swapped = True
            elif ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL):
                code = ctypes.get_errno()
                raise ImageBuildError(f"cannot swap {new} into {dest}: {os.strerror(code)}")
        if not swapped:
            old = dest.parent / f".old-{dest.name}"
            os.rename(dest, old)
            os.rename(new, dest)
            new = old
        # ``new`` now holds the previous image. Sessions hard-link the files they use, so
        # removing it cannot pull a disk from under a running VM.
        _rmtree(new)
    fsync_path(dest.parent)


"""How much guest memory this host may promise, and how much its guests really hold.

A session is admitted only while the sum of the live guests' memory stays within

    capacity = (RAM - reserve) * overcommit

so that the kernel's OOM killer never has to choose a victim. ``overcommit`` is the ratio of
promised to touched memory this product counts on: an idle guest touches far less than its
size (a restored clone shares its RAM image copy-on-write), but any guest may touch all of it,
so the default stays conservative (``DEFAULT_OVERCOMMIT``, measured and explained in
``docs/access.md``). All three are configurable:

- ``TENKI_HOST_MEMORY_MIB``: the RAM to count with (default: ``MemTotal`` of /proc/meminfo);
- ``TENKI_MEMORY_RESERVE_MIB``: kept for the host (default: 10% of RAM, at least 1 GiB, at
  most 4 GiB);
- ``TENKI_MEMORY_OVERCOMMIT``: the ratio (default ``DEFAULT_OVERCOMMIT``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ValidationError

DEFAULT_OVERCOMMIT = 2.0
RESERVE_MIN_MIB = 1024
RESERVE_MAX_MIB = 4096


@dataclass(frozen=True)
class HostCapacity:
    host_id: str
    memory_total_mib: int
    memory_reserve_mib: int
    overcommit: float
    cpus: int
    accelerator: str

    @property
    def memory_capacity_mib(self) -> int:
        return max(0, int((self.memory_total_mib - self.memory_reserve_mib) * self.overcommit))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostCapacity:
        return cls(str(data["host_id"]), int(data["memory_total_mib"]),
                   int(data["memory_reserve_mib"]), float(data["overcommit"]), int(data["cpus"]),
                   str(data["accelerator"]))


def _env_number(name: str, kind: type[float] | type[int]) -> float | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a number, got {raw!r}", field=name) from None
    if value <= 0:
        raise ValidationError(f"{name} must be positive, got {raw!r}", field=name)
    return value


def meminfo_mib(field: str = "MemTotal") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    raise OSError(f"/proc/meminfo has no {field}")


def configured(host_id: str, accelerator: str) -> HostCapacity:
    total = _env_number("TENKI_HOST_MEMORY_MIB", int)
    total_mib = int(total) if total is not None else meminfo_mib()
    reserve = _env_number("TENKI_MEMORY_RESERVE_MIB", int)
    reserve_mib = int(reserve) if reserve is not None else min(
        RESERVE_MAX_MIB, max(RESERVE_MIN_MIB, total_mib // 10))
    ratio = _env_number("TENKI_MEMORY_OVERCOMMIT", float)
    return HostCapacity(host_id=host_id, memory_total_mib=total_mib,
                        memory_reserve_mib=min(reserve_mib, total_mib),
                        overcommit=float(ratio) if ratio is not None else DEFAULT_OVERCOMMIT,
                        cpus=os.cpu_count() or 1, accelerator=accelerator)


def pss_mib(pids: Iterable[int]) -> int:
    """Proportional set size of ``pids`` in MiB (pages shared by clones counted once, split
    among them); processes that are gone count nothing."""
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total_kib // 1024

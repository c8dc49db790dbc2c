"""``SandboxSystem``: the guest agent's ``System`` with nothing of the real machine touched, for
tests that run the real agent in-process."""

from __future__ import annotations

from support import pyagent as guest


class SandboxSystem(guest.System):
    """Writes /etc below a temp root and records what would change the real machine."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.clock: list[int] = []
        self.hostnames: list[str] = []
        self.entropy: list[bytes] = []

    def set_clock(self, epoch_ns: int) -> None:
        self.clock.append(epoch_ns)

    def set_hostname(self, name: str) -> None:
        self.hostnames.append(name)

    def mix_entropy(self, data: bytes) -> None:
        self.entropy.append(data)

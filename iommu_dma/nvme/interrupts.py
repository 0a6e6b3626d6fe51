"""How a queue waits for its completions: polled, interrupt-driven, or hybrid.

An interrupt-driven I/O CQ is created with IEN set and its own MSI-X vector (NVMe Base 2.0
§5.4, Create I/O Completion Queue CDW11 IEN, IV); VFIO signals the vector through an eventfd
(VFIO_DEVICE_SET_IRQS), which a waiting thread sleeps on, or an asyncio loop watches.
"""

from __future__ import annotations

import os
import threading
from typing import Literal, get_args

from iommu_dma.errors import ClosedError
from iommu_dma.native import lib

WaitMode = Literal["poll", "interrupt", "hybrid"]
WAIT_MODES: tuple[str, ...] = get_args(WaitMode)
HYBRID_SPIN = 0.00005      # hybrid: seconds spent polling before sleeping on the interrupt


def check_mode(mode: str, spin: float | None) -> float:
    """Validate a wait mode; the spin time it uses (0 for poll and interrupt)."""
    if mode not in WAIT_MODES:
        raise ValueError(f"wait mode {mode!r} is not one of {', '.join(WAIT_MODES)} (poll: "
                         "spin on the CQ; interrupt: sleep on the MSI-X vector; hybrid: spin "
                         "a while, then sleep)")
    if mode != "hybrid":
        if spin not in (None, 0):
            raise ValueError(f"spin= applies to the hybrid wait mode only, not {mode!r}")
        return 0.0
    spin = HYBRID_SPIN if spin is None else spin
    if not 0 < spin <= 1:
        raise ValueError(f"hybrid spin must be within (0, 1] seconds, not {spin}")
    return spin


class QueueInterrupt:
    """A queue's MSI-X vector: its own duplicate of the vector's eventfd (so the descriptor
    stays valid while a waiter sleeps on it, whatever happens to the controller's), the wait
    mode and the hybrid spin. Closed when the queue is; close() is idempotent."""

    def __init__(self, vector: int, eventfd: int, mode: WaitMode, spin: float = 0.0) -> None:
        self.vector = vector
        self.mode = mode
        self.spin = spin
        self.fd = os.dup(eventfd)
        self._closed = False
        self._fd_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait(self, timeout: float) -> int:
        """Sleep until the vector fires (or timeout seconds); the interrupts counted (0 on
        timeout). The GIL is released while sleeping."""
        if self._closed:
            raise ClosedError(f"MSI-X vector {self.vector}")
        n = int(lib.idma_eventfd_wait(self.fd, max(0, int(timeout * 1e9))))
        if n < 0:
            raise OSError(-n, f"waiting on MSI-X vector {self.vector}: {os.strerror(-n)}")
        return n

    def clear(self) -> int:
        """Read and clear the counter without waiting (the asyncio reader does this)."""
        return self.wait(0) if not self._closed else 0

    def wake(self) -> None:
        """Make a sleeping waiter return (as if the vector fired)."""
        if not self._closed:
            lib.idma_eventfd_signal(self.fd)

    def close(self) -> None:
        """Close the descriptor; only when no thread sleeps on it (the queue ensures that)."""
        with self._fd_lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def __repr__(self) -> str:
        return f"<QueueInterrupt vector {self.vector} {self.mode}>"

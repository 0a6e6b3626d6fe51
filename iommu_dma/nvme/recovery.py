"""What the driver does when commands fail or hang: retries, timeouts, Abort and reset.

A `RecoveryPolicy` belongs to one controller and is shared by its queues; change its fields at
any time (they are read at each submission and completion):

    ctrl.recovery.retries = 0          # see every status (validation), no retries
    ctrl.recovery.io_timeout = 5.0     # seconds a command may take before it is recovered

Retries follow the Linux driver's rule: a failed command whose status has DNR clear is sent
again, up to `retries` times, after the Command Retry Delay its CRD field selects (NVMe Base
2.0 §4.6.1.2.1: CRD 1..3 name Identify Controller CRDT1..3, in 100 ms units; 0 = at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from iommu_dma.nvme.status import Status, is_retryable

DEFAULT_RETRIES = 5           # as the Linux driver's nvme_core.max_retries
DEFAULT_IO_TIMEOUT = 30.0     # as the Linux driver's nvme_core.io_timeout
DEFAULT_ADMIN_TIMEOUT = 60.0  # as the Linux driver's nvme_core.admin_timeout
DEFAULT_ABORT_TIMEOUT = 5.0   # how long an aborted command may take to come back

def should_retry(status: Status, retries_done: int, limit: int) -> bool:
    """True when a command that ended with `status` is to be sent again."""
    return is_retryable(status) and retries_done < max(0, limit)


def retry_delay(status: Status, crdt: tuple[int, int, int]) -> float:
    """Seconds to wait before the retry: CRDT[CRD-1] x 100 ms, 0 for CRD 0 (§4.6.1.2.1)."""
    if not 1 <= status.crd <= 3:
        return 0.0
    units = crdt[status.crd - 1] if len(crdt) == 3 else 0
    return min(max(0, int(units)), 0xFFFF) / 10


@dataclass
class RecoveryPolicy:
    """Retries and timeouts of one controller's commands (see the module text).

    retries: sends after the first, for a status with DNR clear (0: none);
    io_timeout: seconds an I/O command may be outstanding before it is aborted (None: never);
    admin_timeout: the same for admin commands;
    abort_timeout: after the Abort, seconds to wait for the command before resetting;
    crdt: Identify Controller CRDT1..3 (100 ms units), filled in by the controller.
    """

    retries: int = DEFAULT_RETRIES
    io_timeout: float | None = DEFAULT_IO_TIMEOUT
    admin_timeout: float | None = DEFAULT_ADMIN_TIMEOUT
    abort_timeout: float = DEFAULT_ABORT_TIMEOUT
    crdt: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, not {self.retries}")
        for name in ("io_timeout", "admin_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive seconds or None, not {value}")
        if not self.abort_timeout > 0:
            raise ValueError(f"abort_timeout must be positive seconds, not {self.abort_timeout}")

    def timeout_for(self, qid: int) -> float | None:
        return self.admin_timeout if qid == 0 else self.io_timeout

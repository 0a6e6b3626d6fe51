"""RLIMIT_MEMLOCK accounting: how much this process has pinned and whether more fits.

VFIO type1 charges pinned DMA pages to mm->locked_vm and refuses more than RLIMIT_MEMLOCK with a
bare ENOMEM, unless the process has CAP_IPC_LOCK. These helpers apply the same rule beforehand,
so the failure can say what limit was hit and how to raise it.
"""

from __future__ import annotations

import resource

from iommu_dma.errors import MemlockError

CAP_IPC_LOCK = 14                    # capabilities(7): exempt from RLIMIT_MEMLOCK


def _status_field(name: str) -> str:
    """A field of /proc/self/status (proc(5)), '' when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (resource.RLIM_INFINITY when unlimited)."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


def locked_bytes() -> int:
    """mm->locked_vm (VmLck): where VFIO type1 accounts pinned pages."""
    text = _status_field("VmLck")
    return int(text.split()[0]) * 1024 if text else 0


def has_ipc_lock() -> bool:
    """CAP_IPC_LOCK in the effective set: the kernel then skips the memlock limit."""
    eff = _status_field("CapEff")
    return bool(eff) and bool(int(eff, 16) >> CAP_IPC_LOCK & 1)


def check_memlock(extra: int) -> None:
    """MemlockError when pinning `extra` more bytes would exceed RLIMIT_MEMLOCK (the same rule
    the kernel's vfio_iommu_type1 applies; it answers only ENOMEM)."""
    if extra <= 0 or has_ipc_lock():
        return
    limit = memlock_limit()
    if limit == resource.RLIM_INFINITY:
        return
    locked = locked_bytes()
    if locked + extra > limit:
        raise MemlockError(limit, locked, extra)


def memlock_error(err: int | None = None, op: str = "VFIO_IOMMU_MAP_DMA") -> MemlockError:
    """The MemlockError for a kernel ENOMEM on pinning, with the current limit and usage."""
    return MemlockError(memlock_limit(), locked_bytes(), None, err, op)

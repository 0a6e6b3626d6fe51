"""Exceptions of iommu_dma: every failure says what failed, why, and what to do about it.

`IommuDmaError` is the root; NVMe-level errors (defined elsewhere) derive from it too.
`VfioError` carries the VFIO operation (`.op`), the errno (`.errno`, None when the problem was
found before calling the kernel) and a hint for the user (`.hint`).
"""

from __future__ import annotations

import errno as _errno
import os
import re
from collections.abc import Iterable, Sequence

CLI = "iommu-dma"
SETUP_SCRIPT = "scripts/setup_vfio.sh"


def bind_hint(args: str, then: str = "") -> str:
    """The command that binds to vfio-pci: the CLI first, the script it wraps as the fallback,
    e.g. "`iommu-dma bind BDF` first (or `scripts/setup_vfio.sh bind BDF`)" for then="first"."""
    cli = f"`{CLI} bind {args}` {then}".rstrip()
    return f"{cli} (or `{SETUP_SCRIPT} bind {args}`)"


_SCRIPT_FALLBACK = re.compile(r" \(or `" + re.escape(SETUP_SCRIPT) + r" [^`]*`\)")


def without_script_fallback(text: str) -> str:
    """text with the "(or `scripts/setup_vfio.sh ...`)" alternatives removed (for the CLI,
    whose own command is already named first)."""
    return _SCRIPT_FALLBACK.sub("", text)


class IommuDmaError(Exception):
    """Base of every error raised by iommu_dma."""


def errno_text(err: int) -> str:
    """'EINVAL (Invalid argument)' for errno 22."""
    name = _errno.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err)})"


class VfioError(IommuDmaError):
    """A VFIO operation failed (`op`, `errno`, `hint`)."""

    def __init__(self, op: str, errno: int | None = None, hint: str = "") -> None:
        self.op = op
        self.errno = errno
        self.hint = hint
        why = f"{op} failed: {errno_text(errno)}" if errno is not None else f"{op} failed"
        super().__init__(f"{why}: {hint}" if hint else why)


class NoIommuError(VfioError):
    """No usable IOMMU: VFIO type1 is missing or the device has no IOMMU group."""

    def __init__(self, op: str, detail: str, errno: int | None = None) -> None:
        super().__init__(op, errno, f"{detail}; boot with intel_iommu=on (or amd_iommu=on) and "
                                    "load vfio-pci and vfio_iommu_type1")


class NotBoundError(VfioError):
    """The device is not bound to vfio-pci (it is on another driver, or on none)."""

    def __init__(self, bdf: str, driver: str | None, op: str = "open VFIO device") -> None:
        self.bdf = bdf
        self.driver = driver
        current = f"bound to {driver!r}" if driver else "not bound to any driver"
        super().__init__(op, None, f"{bdf} is {current}, not vfio-pci; "
                                   f"run {bind_hint(bdf, 'first')}")


class GroupNotViableError(VfioError):
    """Some device of the IOMMU group is bound to a non-VFIO driver."""

    def __init__(self, group: int, members: Sequence[tuple[str, str | None]]) -> None:
        self.group = group
        self.members = list(members)
        listed = ", ".join(f"{bdf} ({drv or 'no driver'})" for bdf, drv in members) or "none"
        super().__init__("VFIO_GROUP_GET_STATUS", None,
                         f"IOMMU group {group} is not viable: every device in it must be bound to "
                         f"vfio-pci or to no driver; members: {listed}; bind them with "
                         f"{bind_hint('BDF')} or unbind them")


class PermissionDeniedError(VfioError):
    """The /dev/vfio/N node is not accessible to this user."""

    def __init__(self, path: str, op: str = "open") -> None:
        self.path = path
        super().__init__(op, _errno.EACCES,
                         f"{path} is not accessible to this user; give it to your user with "
                         f"{bind_hint('--user NAME BDF')} or run as root")


class DeviceBusyError(VfioError):
    """Another process (or another container of this one) holds the group or device."""

    def __init__(self, path: str | None, op: str = "open") -> None:
        self.path = path
        what = path or "the group or device"
        find = f"`fuser -v {path}`" if path else "`fuser -v /dev/vfio/*`"
        super().__init__(op, _errno.EBUSY,
                         f"{what} is in use by another process or container (VFIO allows one "
                         f"user of a group at a time); find it with {find} and stop it")


class OutsideApertureError(VfioError):
    """An address range lies (partly) outside the IOVA ranges the IOMMU reports."""

    def __init__(self, start: int, length: int, ranges: Iterable[tuple[int, int]],
                 op: str = "VFIO_IOMMU_MAP_DMA") -> None:
        self.start = start
        self.length = length
        self.ranges = list(ranges)
        shown = ", ".join(f"[{s:#x}, {e:#x}]" for s, e in self.ranges) or "none"
        super().__init__(op, None,
                         f"range [{start:#x}, {start + length - 1:#x}] is outside the usable IOVA "
                         f"ranges {shown}; with IOVA = VA the buffer must lie inside them: "
                         f"allocate it with iommu_dma.memory.DmaAllocator")


class AlignmentError(VfioError, ValueError):
    """An address or length is not aligned as VFIO/the allocator requires."""

    def __init__(self, what: str, value: int, align: int, op: str = "VFIO_IOMMU_MAP_DMA") -> None:
        self.value = value
        self.align = align
        super().__init__(op, None, f"{what} {value:#x} is not a multiple of {align:#x}")


class MemlockError(VfioError):
    """Pinning more memory would exceed RLIMIT_MEMLOCK."""

    def __init__(self, limit: int, locked: int, needed: int | None, errno: int | None = None,
                 op: str = "VFIO_IOMMU_MAP_DMA") -> None:
        self.limit = limit
        self.locked = locked
        self.needed = needed
        more = f"{_size(needed)} more" if needed else "more memory"
        super().__init__(op, errno,
                         f"pinning {more} would exceed RLIMIT_MEMLOCK: limit "
                         f"{_size(limit)}, already locked {_size(locked)}; raise the limit with "
                         "`ulimit -l unlimited` (as root, before starting), a `memlock` line in "
                         "/etc/security/limits.conf (e.g. `NAME - memlock unlimited`), or "
                         "LimitMEMLOCK=infinity in the systemd unit")


class ClosedError(IommuDmaError, ValueError):
    """Use of an object after its close()."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is closed")


class UnknownDeviceError(IommuDmaError, LookupError):
    """No PCI device at this address."""

    def __init__(self, bdf: str, known: Sequence[str] = ()) -> None:
        self.bdf = bdf
        hint = f"; NVMe controllers present: {', '.join(known)}" if known else \
            "; no NVMe controller is present"
        super().__init__(f"no PCI device {bdf}{hint}")


class NotNvmeError(IommuDmaError, ValueError):
    """The PCI device exists but is not an NVMe controller (class 0x0108xx)."""

    def __init__(self, bdf: str, class_code: int) -> None:
        self.bdf = bdf
        self.class_code = class_code
        super().__init__(f"{bdf} is not an NVMe controller (class {class_code:#08x}, "
                         "expected 0x0108xx)")


def _size(n: int) -> str:
    if n >= 1 << 62:
        return "unlimited"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"

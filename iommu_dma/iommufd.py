"""The iommufd uapi (include/uapi/linux/iommufd.h) and the VFIO device cdev ioctls
(include/uapi/linux/vfio.h, Linux 6.6+), in ctypes.

Thin wrappers: one function per ioctl, each raising a typed VfioError (op, errno, hint) on
failure. With iommufd, /dev/iommu holds IO address spaces (IOAS); a VFIO device is opened
through its cdev /dev/vfio/devices/vfioN, bound to an iommufd (VFIO_DEVICE_BIND_IOMMUFD, which
yields a dev_id) and attached to an IOAS (VFIO_DEVICE_ATTACH_IOMMUFD_PT, which yields the hwpt
the kernel made for it). Policy (which backend, refcounts) lives in iommu_dma.backends and
iommu_dma.container.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

from iommu_dma import libc
from iommu_dma.errors import DeviceBusyError, NoIommuError, PermissionDeniedError, VfioError
from iommu_dma.memlock import memlock_error

if TYPE_CHECKING:
    IoctlArg = Union[int, ctypes.Structure]

IOMMUFD_PATH = "/dev/iommu"
VFIO_CDEV_DIR = "/dev/vfio/devices"
PCI_DEVICES = Path("/sys/bus/pci/devices")

# iommufd.h: IOMMUFD_TYPE (';'), commands from IOMMUFD_CMD_BASE 0x80; _IO(type, nr)
IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86


def _io(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


IOMMU_DESTROY = _io(IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_IOVA_RANGES = _io(IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _io(IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_CMD_IOAS_UNMAP)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# vfio.h: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n); only valid on cdev device fds
VFIO_DEVICE_BIND_IOMMUFD = (ord(";") << 8) | (100 + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = (ord(";") << 8) | (100 + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = (ord(";") << 8) | (100 + 20)

U64_MAX = (1 << 64) - 1
MAX_IOVA_RANGES = 64     # bound on num_iovas: the kernel's count is not trusted blindly

u32, u64, s32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


# ---- structs (field order and types exactly as in iommufd.h / vfio.h) ------------------------

class iommu_destroy(ctypes.Structure):
    _fields_ = [("size", u32), ("id", u32)]


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [("size", u32), ("flags", u32), ("out_ioas_id", u32)]


class iommu_iova_range(ctypes.Structure):
    _fields_ = [("start", u64), ("last", u64)]       # inclusive last


class iommu_ioas_iova_ranges(ctypes.Structure):
    _fields_ = [("size", u32), ("ioas_id", u32), ("num_iovas", u32), ("__reserved", u32),
                ("allowed_iovas", u64), ("out_iova_alignment", u64)]


class iommu_ioas_map(ctypes.Structure):
    _fields_ = [("size", u32), ("flags", u32), ("ioas_id", u32), ("__reserved", u32),
                ("user_va", u64), ("length", u64), ("iova", u64)]


class iommu_ioas_unmap(ctypes.Structure):
    _fields_ = [("size", u32), ("ioas_id", u32), ("iova", u64), ("length", u64)]


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iommufd", s32), ("out_devid", u32)]


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("pt_id", u32)]


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


# Every struct bound above, by its header name (the layout test compares these with gcc's).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    cls.__name__: cls for cls in (
        iommu_destroy, iommu_ioas_alloc, iommu_iova_range, iommu_ioas_iova_ranges,
        iommu_ioas_map, iommu_ioas_unmap, vfio_device_bind_iommufd,
        vfio_device_attach_iommufd_pt, vfio_device_detach_iommufd_pt,
    )
}
# Every ioctl number and flag above, by its header name (the layout test checks them too).
CONSTANTS: dict[str, int] = {
    name: value for name, value in globals().items()
    if name.startswith(("IOMMU_", "VFIO_DEVICE_")) and isinstance(value, int)
}

_UNSAFE = ("interrupt remapping is missing (virtio-iommu, or an IOMMU without intremap): "
           "boot the guest kernel with iommufd.allow_unsafe_interrupts=1 (test benches only) "
           "or use an IOMMU with interrupt remapping")

# Hints per (operation, errno): what the failure usually means and what to do.
_HINTS: dict[tuple[str, int], str] = {
    ("VFIO_DEVICE_BIND_IOMMUFD", errno.EPERM): _UNSAFE,
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno.EPERM): _UNSAFE,
    ("VFIO_DEVICE_BIND_IOMMUFD", errno.EINVAL): "the device is already bound (opened through "
                                                 "its cdev in this or another process)",
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno.EINVAL): "the IOAS does not exist or the device is "
                                                      "not bound to this iommufd",
    ("IOMMU_IOAS_MAP", errno.EINVAL): "user_va/iova/length not aligned to the IOAS alignment, "
                                      "or iova outside the allowed IOVA ranges",
    ("IOMMU_IOAS_MAP", errno.EEXIST): "the IOVA range overlaps an existing mapping",
    ("IOMMU_IOAS_MAP", errno.EFAULT): "user_va is not mapped in this process",
    ("IOMMU_IOAS_MAP", errno.ENOENT): "the IOAS does not exist (was it destroyed?)",
    ("IOMMU_IOAS_UNMAP", errno.ENOENT): "nothing is mapped there",
    ("IOMMU_IOAS_UNMAP", errno.EINVAL): "the range splits an existing mapping (unmap whole "
                                        "mappings) or is not aligned",
}


def ioctl(fd: int, request: int, arg: IoctlArg, op: str) -> int:
    """ioctl(fd, request, arg) -> its non-negative return value; VfioError naming iommufd."""
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    try:
        return libc.ioctl(fd, request, value)
    except OSError as e:
        raise _error(op, e.errno or errno.EIO) from None


def _error(op: str, err: int) -> VfioError:
    if err == errno.ENOMEM and op == "IOMMU_IOAS_MAP":
        return memlock_error(err, op)
    if err == errno.EBUSY and op == "VFIO_DEVICE_BIND_IOMMUFD":
        return DeviceBusyError(None, op)
    return VfioError(op, err, "iommufd: " + _HINTS.get((op, err), "see dmesg for the reason"))


# ---- /dev/iommu --------------------------------------------------------------------------------

def open_iommufd(path: str = IOMMUFD_PATH) -> int:
    """Open /dev/iommu; a missing node means a kernel built without CONFIG_IOMMUFD."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoIommuError(f"open {path}", no_iommufd_text(path), errno.ENOENT) from None
    except PermissionError:
        raise PermissionDeniedError(path, f"open {path}") from None


def no_iommufd_text(path: str = IOMMUFD_PATH) -> str:
    return (f"{path} does not exist: the kernel has no iommufd (CONFIG_IOMMUFD); use "
            "IOMMU_DMA_BACKEND=container")


def ioas_alloc(iommufd: int) -> int:
    """A new, empty IOAS; returns its id."""
    a = iommu_ioas_alloc(ctypes.sizeof(iommu_ioas_alloc), 0, 0)
    ioctl(iommufd, IOMMU_IOAS_ALLOC, a, "IOMMU_IOAS_ALLOC")
    return int(a.out_ioas_id)


def destroy(iommufd: int, object_id: int) -> None:
    d = iommu_destroy(ctypes.sizeof(iommu_destroy), object_id)
    ioctl(iommufd, IOMMU_DESTROY, d, "IOMMU_DESTROY")


def ioas_iova_ranges(iommufd: int, ioas_id: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """(allowed inclusive [start, last] ranges, out_iova_alignment) of an IOAS.

    iommufd.h: num_iovas is the array's length on input; EMSGSIZE with num_iovas raised to the
    count when it is too small. The count is bounded (MAX_IOVA_RANGES), and the ranges read
    back are checked (ordered, start <= last, disjoint)."""
    count = 8
    for _ in range(3):
        ranges = (iommu_iova_range * count)()
        q = iommu_ioas_iova_ranges(ctypes.sizeof(iommu_ioas_iova_ranges), ioas_id, count, 0,
                                   ctypes.addressof(ranges), 0)
        try:
            ioctl(iommufd, IOMMU_IOAS_IOVA_RANGES, q, "IOMMU_IOAS_IOVA_RANGES")
        except VfioError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            if not count < q.num_iovas <= MAX_IOVA_RANGES:
                raise VfioError("IOMMU_IOAS_IOVA_RANGES", errno.EOVERFLOW,
                                f"iommufd: the kernel asks room for {q.num_iovas} ranges "
                                f"(had {count}, at most {MAX_IOVA_RANGES} accepted)") from None
            count = int(q.num_iovas)
            continue
        return _checked_ranges(ranges, int(q.num_iovas), count), int(q.out_iova_alignment)
    raise VfioError("IOMMU_IOAS_IOVA_RANGES", errno.EOVERFLOW,
                    "iommufd: the kernel kept raising num_iovas")


def _checked_ranges(ranges: ctypes.Array[iommu_iova_range], num: int,
                    room: int) -> tuple[tuple[int, int], ...]:
    if num > room:
        raise VfioError("IOMMU_IOAS_IOVA_RANGES", errno.EOVERFLOW,
                        f"iommufd: num_iovas {num} exceeds the {room} entries given")
    out = tuple((int(r.start), int(r.last)) for r in ranges[:num])
    return check_ranges(out)


def check_ranges(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The ranges unchanged when each has start <= last and they ascend without overlap."""
    prev = -1
    for start, last in ranges:
        if start > last or start <= prev:
            raise VfioError("IOMMU_IOAS_IOVA_RANGES", errno.EPROTO,
                            f"iommufd: the kernel returned IOVA ranges out of order or "
                            f"inverted: {[(hex(s), hex(e)) for s, e in ranges]}")
        prev = last
    return ranges


def ioas_map_fixed(iommufd: int, ioas_id: int, user_va: int, iova: int, length: int) -> None:
    """Map [user_va, +length) at exactly iova (IOMMU_IOAS_MAP_FIXED_IOVA), readable and
    writeable by the device."""
    flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
    m = iommu_ioas_map(ctypes.sizeof(iommu_ioas_map), flags, ioas_id, 0, user_va, length, iova)
    ioctl(iommufd, IOMMU_IOAS_MAP, m, "IOMMU_IOAS_MAP")
    if m.iova != iova:
        raise VfioError("IOMMU_IOAS_MAP", errno.EPROTO,
                        f"iommufd: asked for fixed IOVA {iova:#x}, the kernel placed it at "
                        f"{m.iova:#x}")


def ioas_unmap(iommufd: int, ioas_id: int, iova: int, length: int) -> int:
    """Unmap whole mappings inside [iova, +length); returns the bytes unmapped.
    iova 0 with length U64_MAX unmaps everything (iommufd.h)."""
    u = iommu_ioas_unmap(ctypes.sizeof(iommu_ioas_unmap), ioas_id, iova, length)
    ioctl(iommufd, IOMMU_IOAS_UNMAP, u, "IOMMU_IOAS_UNMAP")
    return int(u.length)


def ioas_unmap_all(iommufd: int, ioas_id: int) -> int:
    return ioas_unmap(iommufd, ioas_id, 0, U64_MAX)


# ---- VFIO device cdev --------------------------------------------------------------------------

def cdev_name(bdf: str) -> str | None:
    """'vfioN' of a device bound to vfio-pci with VFIO_DEVICE_CDEV (sysfs
    /sys/bus/pci/devices/BDF/vfio-dev/vfioN), else None."""
    folder = PCI_DEVICES / bdf / "vfio-dev"
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("vfio"))
    except OSError:
        return None
    return names[0] if names else None


def cdev_path(bdf: str) -> str | None:
    """/dev/vfio/devices/vfioN of the device when sysfs names one and the node exists."""
    name = cdev_name(bdf)
    if name is None:
        return None
    path = f"{VFIO_CDEV_DIR}/{name}"
    return path if os.path.exists(path) else None


def device_bind_iommufd(device_fd: int, iommufd: int) -> int:
    """Bind a cdev device fd to an iommufd; returns the dev_id. Closing the fd unbinds."""
    b = vfio_device_bind_iommufd(ctypes.sizeof(vfio_device_bind_iommufd), 0, iommufd, 0)
    ioctl(device_fd, VFIO_DEVICE_BIND_IOMMUFD, b, "VFIO_DEVICE_BIND_IOMMUFD")
    return int(b.out_devid)


def device_attach_pt(device_fd: int, pt_id: int) -> int:
    """Attach the bound device to an IOAS (or hwpt) id; returns the hwpt id the kernel
    wrote back (for an IOAS: the automatic domain it made or reused)."""
    a = vfio_device_attach_iommufd_pt(ctypes.sizeof(vfio_device_attach_iommufd_pt), 0, pt_id)
    ioctl(device_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, a, "VFIO_DEVICE_ATTACH_IOMMUFD_PT")
    return int(a.pt_id)


def device_detach_pt(device_fd: int) -> None:
    d = vfio_device_detach_iommufd_pt(ctypes.sizeof(vfio_device_detach_iommufd_pt), 0)
    ioctl(device_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, d, "VFIO_DEVICE_DETACH_IOMMUFD_PT")

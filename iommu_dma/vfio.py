"""The VFIO uapi (include/uapi/linux/vfio.h), legacy container API, in ctypes.

Thin wrappers: one function per ioctl, each raising a typed VfioError (op, errno, hint) on
failure. Policy (which IOMMU, which ranges, refcounts) lives in iommu_dma.container.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, Union

from iommu_dma import libc
from iommu_dma.errors import DeviceBusyError, NoIommuError, PermissionDeniedError, VfioError
from iommu_dma.memlock import memlock_error

if TYPE_CHECKING:
    CBytes = ctypes.Array[ctypes.c_ubyte]       # a raw ioctl buffer (struct + trailing data)
    # What an ioctl argument may be: a value, or a ctypes object passed by address.
    IoctlArg = Union[int, ctypes.Structure, ctypes.c_int32, CBytes, ctypes.Array[ctypes.c_char]]

# vfio.h: all ioctls are _IO(VFIO_TYPE=';', VFIO_BASE=100 + n); arguments travel by pointer.
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(n: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_API_VERSION = 0
# CHECK_EXTENSION / SET_IOMMU arguments
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# vfio-pci's fixed region and IRQ indexes
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4       # the kernel asks for the device back (unbind, hot removal)

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

u16, u32, u64, s32 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


# ---- structs (field order and types exactly as in vfio.h) ------------------------------------

class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("num_regions", u32), ("num_irqs", u32),
                ("cap_offset", u32)]


class vfio_region_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("cap_offset", u32),
                ("size", u64), ("offset", u64)]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", u64), ("size", u64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    # followed by nr_areas vfio_region_sparse_mmap_area (flexible array areas[])
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", u32), ("reserved", u32)]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class vfio_irq_set(ctypes.Structure):
    # followed by data[] (u8 bools or s32 eventfds)
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32), ("count", u32)]


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova_pgsizes", u64), ("cap_offset", u32)]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", u64), ("end", u64)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    # followed by nr_iovas vfio_iova_range (flexible array iova_ranges[])
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", u32), ("reserved", u32)]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("avail", u32)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    # followed by data[] (dirty bitmap; unused here)
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64)]


# Every struct bound above, by its vfio.h name (the layout test compares these with gcc's).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    cls.__name__: cls for cls in (
        vfio_info_cap_header, vfio_group_status, vfio_device_info, vfio_region_info,
        vfio_region_sparse_mmap_area, vfio_region_info_cap_sparse_mmap, vfio_irq_info,
        vfio_irq_set, vfio_iommu_type1_info, vfio_iova_range,
        vfio_iommu_type1_info_cap_iova_range, vfio_iommu_type1_info_dma_avail,
        vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    )
}

_S = TypeVar("_S", bound=ctypes.Structure)

# ---- the ioctl call ------------------------------------------------------------------------

# Hints per (operation, errno): what the failure usually means and what to do.
_HINTS: dict[tuple[str, int], str] = {
    ("VFIO_SET_IOMMU", errno.EINVAL): "IOMMU type not supported (is vfio_iommu_type1 loaded?)",
    ("VFIO_SET_IOMMU", errno.EPERM): "interrupt remapping missing; boot with intremap or set "
                                     "vfio_iommu_type1.allow_unsafe_interrupts=1",
    ("VFIO_GROUP_SET_CONTAINER", errno.EBUSY): "the group already belongs to a container",
    ("VFIO_GROUP_SET_CONTAINER", errno.EINVAL): "the group is not viable or the container's "
                                                "IOMMU model cannot take it",
    ("VFIO_GROUP_SET_CONTAINER", errno.EPERM): "interrupt remapping missing; set "
                                               "vfio_iommu_type1.allow_unsafe_interrupts=1",
    ("VFIO_GROUP_GET_DEVICE_FD", errno.EBUSY): "the device is already open (in this or another "
                                               "process)",
    ("VFIO_GROUP_GET_DEVICE_FD", errno.EINVAL): "no such device in this group, or the group has "
                                                "no container/IOMMU set",
    ("VFIO_GROUP_GET_DEVICE_FD", errno.ENODEV): "no such device in this group",
    ("VFIO_DEVICE_RESET", errno.EINVAL): "the device supports no reset method",
    ("VFIO_DEVICE_RESET", errno.EAGAIN): "reset is blocked by another device in the slot/bus",
    ("VFIO_IOMMU_MAP_DMA", errno.EINVAL): "vaddr/iova/size not aligned to the IOMMU page size, "
                                          "or iova outside the usable IOVA ranges",
    ("VFIO_IOMMU_MAP_DMA", errno.EEXIST): "the IOVA range overlaps an existing mapping",
    ("VFIO_IOMMU_MAP_DMA", errno.ENOSPC): "the container's mapping budget is spent "
                                          "(vfio_iommu_type1.dma_entry_limit); map larger chunks",
    ("VFIO_IOMMU_MAP_DMA", errno.EFAULT): "vaddr is not mapped in this process",
    ("VFIO_IOMMU_UNMAP_DMA", errno.EINVAL): "the range splits an existing mapping (unmap whole "
                                            "mappings) or is not aligned",
}


def ioctl(fd: int, request: int, arg: IoctlArg, op: str) -> int:
    """ioctl(fd, request, arg) -> its non-negative return value; VfioError on failure.

    arg is an int (passed by value) or a ctypes object/buffer (passed by address).
    """
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    try:
        return libc.ioctl(fd, request, value)
    except OSError as e:
        raise _error(op, e.errno or errno.EIO) from None


def _error(op: str, err: int) -> VfioError:
    if err == errno.EBUSY and op in ("VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD"):
        return DeviceBusyError(None, op)
    if err == errno.ENOMEM and op == "VFIO_IOMMU_MAP_DMA":
        return memlock_error(err, op)
    if err == errno.ENODEV and op in ("VFIO_SET_IOMMU", "VFIO_CHECK_EXTENSION"):
        return NoIommuError(op, "no VFIO IOMMU driver", err)
    return VfioError(op, err, _HINTS.get((op, err), ""))


def _buffer(size: int) -> CBytes:
    return (ctypes.c_ubyte * size)()


def _struct_at(buf: CBytes, offset: int, cls: type[_S]) -> _S:
    if offset + ctypes.sizeof(cls) > len(buf):
        raise VfioError("parse capability chain", errno.EOVERFLOW,
                        f"capability at {offset} runs past the {len(buf)}-byte buffer")
    return cls.from_buffer(buf, offset)


def capabilities(buf: CBytes, first: int) -> dict[int, int]:
    """Walk a capability chain ({u16 id, u16 version, u32 next}, offsets from the struct start):
    {cap id: offset}."""
    caps: dict[int, int] = {}
    offset, seen = first, 0
    while offset and seen < 64:      # bounded: a corrupt chain must not loop forever
        hdr = _struct_at(buf, offset, vfio_info_cap_header)
        caps.setdefault(hdr.id, offset)
        offset, seen = hdr.next, seen + 1
    return caps


def _info_with_caps(fd: int, request: int, cls: type[ctypes.Structure], op: str,
                    **fields: int) -> CBytes:
    """GET_INFO-style call: once with the bare struct, again with argsz as the kernel raised it
    (vfio.h: an undersized buffer gets argsz updated and no error)."""
    size = ctypes.sizeof(cls)
    for _ in range(3):
        buf = _buffer(size)
        info = cls.from_buffer(buf)
        info.argsz = size
        for name, value in fields.items():
            setattr(info, name, value)
        ioctl(fd, request, buf, op)
        if info.argsz <= size:
            return buf
        size = info.argsz
    raise VfioError(op, errno.EOVERFLOW, "the kernel kept raising argsz")


# ---- container (/dev/vfio/vfio) --------------------------------------------------------------

def get_api_version(container_fd: int) -> int:
    return ioctl(container_fd, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")


def check_extension(container_fd: int, extension: int) -> bool:
    return ioctl(container_fd, VFIO_CHECK_EXTENSION, extension, "VFIO_CHECK_EXTENSION") > 0


def set_iommu(container_fd: int, iommu_type: int) -> None:
    """Only valid once a group is attached (vfio.h)."""
    ioctl(container_fd, VFIO_SET_IOMMU, iommu_type, "VFIO_SET_IOMMU")


@dataclass(frozen=True)
class IommuInfo:
    flags: int
    page_sizes: int
    iova_ranges: tuple[tuple[int, int], ...]    # inclusive [start, end] pairs
    dma_avail: int | None                        # None: kernel reports no DMA-available cap


def iommu_get_info(container_fd: int) -> IommuInfo:
    buf = _info_with_caps(container_fd, VFIO_IOMMU_GET_INFO, vfio_iommu_type1_info,
                          "VFIO_IOMMU_GET_INFO")
    info = vfio_iommu_type1_info.from_buffer(buf)
    caps = capabilities(buf, info.cap_offset) if info.flags & VFIO_IOMMU_INFO_CAPS else {}
    return IommuInfo(info.flags, info.iova_pgsizes if info.flags & VFIO_IOMMU_INFO_PGSIZES else 0,
                     _iova_ranges(buf, caps), _dma_avail(buf, caps))


def _iova_ranges(buf: CBytes, caps: dict[int, int]) -> tuple[tuple[int, int], ...]:
    off = caps.get(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
    if off is None:
        return ()
    cap = _struct_at(buf, off, vfio_iommu_type1_info_cap_iova_range)
    first = off + ctypes.sizeof(vfio_iommu_type1_info_cap_iova_range)
    step = ctypes.sizeof(vfio_iova_range)
    out = []
    for i in range(cap.nr_iovas):
        r = _struct_at(buf, first + i * step, vfio_iova_range)
        out.append((int(r.start), int(r.end)))
    return tuple(out)


def _dma_avail(buf: CBytes, caps: dict[int, int]) -> int | None:
    off = caps.get(VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL)
    if off is None:
        return None
    return int(_struct_at(buf, off, vfio_iommu_type1_info_dma_avail).avail)


def iommu_map_dma(container_fd: int, vaddr: int, iova: int, size: int,
                  flags: int = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) -> None:
    m = vfio_iommu_type1_dma_map(ctypes.sizeof(vfio_iommu_type1_dma_map), flags, vaddr, iova,
                                 size)
    ioctl(container_fd, VFIO_IOMMU_MAP_DMA, m, "VFIO_IOMMU_MAP_DMA")


def iommu_unmap_dma(container_fd: int, iova: int, size: int, flags: int = 0) -> int:
    """Unmap; returns the number of bytes the kernel unmapped."""
    u = vfio_iommu_type1_dma_unmap(ctypes.sizeof(vfio_iommu_type1_dma_unmap), flags, iova, size)
    ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, u, "VFIO_IOMMU_UNMAP_DMA")
    return int(u.size)


def iommu_unmap_all(container_fd: int) -> int:
    """VFIO_DMA_UNMAP_FLAG_ALL: iova and size must be 0 (only if CHECK_EXTENSION(UNMAP_ALL))."""
    return iommu_unmap_dma(container_fd, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL)


# ---- group (/dev/vfio/N) -----------------------------------------------------------------------

def group_get_status(group_fd: int) -> int:
    st = vfio_group_status(ctypes.sizeof(vfio_group_status), 0)
    ioctl(group_fd, VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS")
    return int(st.flags)


def group_set_container(group_fd: int, container_fd: int) -> None:
    ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, s32(container_fd), "VFIO_GROUP_SET_CONTAINER")


def group_unset_container(group_fd: int) -> None:
    ioctl(group_fd, VFIO_GROUP_UNSET_CONTAINER, 0, "VFIO_GROUP_UNSET_CONTAINER")


def group_get_device_fd(group_fd: int, bdf: str) -> int:
    name = ctypes.create_string_buffer(bdf.encode())
    return ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")


# ---- device --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int                      # offset of the region within the device fd
    sparse_areas: tuple[tuple[int, int], ...] = ()   # (offset, size) mmap-able parts, if sparse
    msix_mappable: bool = False
    cap_ids: tuple[int, ...] = field(default=())

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)

    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """The parts that may be mmap'd: the sparse areas if reported, else the whole region."""
        if self.sparse_areas and not self.msix_mappable:
            return self.sparse_areas
        return ((0, self.size),) if self.mmappable else ()


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int


def device_get_info(device_fd: int) -> DeviceInfo:
    buf = _info_with_caps(device_fd, VFIO_DEVICE_GET_INFO, vfio_device_info,
                          "VFIO_DEVICE_GET_INFO")
    info = vfio_device_info.from_buffer(buf)
    return DeviceInfo(info.flags, info.num_regions, info.num_irqs)


def device_get_region_info(device_fd: int, index: int) -> RegionInfo:
    buf = _info_with_caps(device_fd, VFIO_DEVICE_GET_REGION_INFO, vfio_region_info,
                          "VFIO_DEVICE_GET_REGION_INFO", index=index)
    info = vfio_region_info.from_buffer(buf)
    caps = capabilities(buf, info.cap_offset) if info.flags & VFIO_REGION_INFO_FLAG_CAPS else {}
    return RegionInfo(index, info.flags, int(info.size), int(info.offset),
                      _sparse_areas(buf, caps), VFIO_REGION_INFO_CAP_MSIX_MAPPABLE in caps,
                      tuple(sorted(caps)))


def _sparse_areas(buf: CBytes, caps: dict[int, int]) -> tuple[tuple[int, int], ...]:
    off = caps.get(VFIO_REGION_INFO_CAP_SPARSE_MMAP)
    if off is None:
        return ()
    cap = _struct_at(buf, off, vfio_region_info_cap_sparse_mmap)
    first = off + ctypes.sizeof(vfio_region_info_cap_sparse_mmap)
    step = ctypes.sizeof(vfio_region_sparse_mmap_area)
    areas = [_struct_at(buf, first + i * step, vfio_region_sparse_mmap_area)
             for i in range(cap.nr_areas)]
    return tuple((int(a.offset), int(a.size)) for a in areas)


def device_get_irq_info(device_fd: int, index: int) -> IrqInfo:
    info = vfio_irq_info(ctypes.sizeof(vfio_irq_info), 0, index, 0)
    ioctl(device_fd, VFIO_DEVICE_GET_IRQ_INFO, info, "VFIO_DEVICE_GET_IRQ_INFO")
    return IrqInfo(index, int(info.flags), int(info.count))


def device_set_irqs(device_fd: int, index: int, start: int, count: int, flags: int,
                    data: bytes = b"") -> None:
    """VFIO_DEVICE_SET_IRQS with a raw data[] payload."""
    head = ctypes.sizeof(vfio_irq_set)
    buf = _buffer(head + len(data))
    s = vfio_irq_set.from_buffer(buf)
    s.argsz, s.flags, s.index, s.start, s.count = head + len(data), flags, index, start, count
    ctypes.memmove(ctypes.addressof(buf) + head, data, len(data))
    ioctl(device_fd, VFIO_DEVICE_SET_IRQS, buf, "VFIO_DEVICE_SET_IRQS")


def set_irq_eventfds(device_fd: int, index: int, start: int, fds: Sequence[int]) -> None:
    """Signal vectors start.. through these eventfds (-1 de-assigns one)."""
    data = (s32 * len(fds))(*fds)
    device_set_irqs(device_fd, index, start, len(fds),
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, bytes(data))


def disable_irqs(device_fd: int, index: int) -> None:
    """vfio.h: DATA_NONE|ACTION_TRIGGER with count 0 disables the whole index."""
    device_set_irqs(device_fd, index, 0, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER)


def trigger_irqs(device_fd: int, index: int, start: int, count: int = 1) -> None:
    """Loopback: the kernel signals the vectors' eventfds as if the device had."""
    device_set_irqs(device_fd, index, start, count,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER)


def mask_irqs(device_fd: int, index: int, start: int, count: int = 1) -> None:
    device_set_irqs(device_fd, index, start, count,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK)


def unmask_irqs(device_fd: int, index: int, start: int, count: int = 1) -> None:
    device_set_irqs(device_fd, index, start, count,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK)


def device_reset(device_fd: int) -> None:
    ioctl(device_fd, VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")


def open_node(path: str) -> int:
    """Open a VFIO character device (a group /dev/vfio/N or a cdev /dev/vfio/devices/vfioN)
    read-write; FileNotFoundError passes through for the caller to explain."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except PermissionError:
        raise PermissionDeniedError(path, f"open {path}") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusyError(path, f"open {path}") from None
        raise VfioError(f"open {path}", e.errno, "") from None

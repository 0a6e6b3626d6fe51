"""A VFIO container: one IOMMU address space shared by one or more IOMMU groups.

Mappings use IOVA = VA: the device sees a buffer at the same address the process does, so the
queue engine never translates. VFIO refuses overlapping mappings (EEXIST), so overlapping
requests share the underlying mappings through reference counts; `maptable` (a native table,
native/maptable.h) answers "is every byte of this buffer mapped?" per command.
"""

from __future__ import annotations

import errno
import os
import threading
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from iommu_dma import vfio
from iommu_dma.discovery import VFIO_DRIVER, find, group_devices
from iommu_dma.errors import (
    AlignmentError,
    ClosedError,
    DeviceBusyError,
    GroupNotViableError,
    IommuDmaError,
    NoIommuError,
    NotBoundError,
    OutsideApertureError,
    PermissionDeniedError,
    VfioError,
)
from iommu_dma.memlock import check_memlock
from iommu_dma.native import ffi, lib

CONTAINER_PATH = "/dev/vfio/vfio"
DEFAULT_PAGE = 4096


class _Closable(Protocol):
    def close(self) -> None: ...


def within_ranges(ranges: Sequence[tuple[int, int]], start: int, length: int) -> bool:
    """True when [start, start+length) lies inside ONE inclusive [s, e] range (the ranges are
    disjoint with holes between them, so a span crossing two ranges covers a hole)."""
    end = start + length - 1
    return length > 0 and any(s <= start and end <= e for s, e in ranges)


def parse_group(target: int | str) -> int | None:
    """A group number from 9, '9' or '/dev/vfio/9'; None when target looks like a BDF."""
    if isinstance(target, int):
        return target
    name = target.rsplit("/", 1)[-1] if target.startswith("/dev/vfio/") else target
    return int(name) if name.isdigit() else None


class Container:
    """/dev/vfio/vfio with groups attached, the TYPE1v2 IOMMU and IOVA = VA mappings.

    Threads: the native engine releases the GIL, so threads may map, unmap and allocate at the
    same time. One re-entrant lock guards the groups, the mapping refcounts, the native maptable
    and the IOMMU info; these are safe to call from several threads: attach, group_fd, groups,
    refresh_info, check_range, map, unmap, is_mapped, mapping_count, mapped_bytes, dma_avail,
    page_size, add_dependent, remove_dependent and close (after close, the others raise
    ClosedError). The queue engine's lookups in `maptable` do not take this lock: the native
    table has its own reader/writer lock (native/maptable.c). Refcounts say who mapped what,
    not whether the device still uses it: unmapping memory of a command in flight is the
    caller's error to avoid (the allocator quarantines such buffers).
    """

    def __init__(self, path: str = CONTAINER_PATH) -> None:
        self._lock = threading.RLock()
        self.fd = self._open(path)
        self._groups: dict[int, int] = {}                 # group number -> group fd
        self._maps: dict[int, list[int]] = {}             # start -> [length, refcount]
        self._starts: list[int] = []                      # sorted mapping starts
        self._requests: dict[tuple[int, int], list[list[int]]] = {}
        self._dependents: list[_Closable] = []
        self.iova_ranges: tuple[tuple[int, int], ...] = ()
        self.page_sizes = 0
        self.unmap_all_supported = False
        self._avail_base: int | None = None
        self._maps_at_base = 0
        self.maptable: Any = lib.idma_maptable_new()
        if self.maptable == ffi.NULL:
            os.close(self.fd)
            raise MemoryError("idma_maptable_new failed")
        self._closing = False
        self.closed = False

    @staticmethod
    def _open(path: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoIommuError(f"open {path}", f"{path} does not exist (modprobe vfio-pci)",
                               errno.ENOENT) from None
        except PermissionError:
            raise PermissionDeniedError(path) from None
        try:
            version = vfio.get_api_version(fd)
            if version != vfio.VFIO_API_VERSION:
                raise VfioError("VFIO_GET_API_VERSION", None,
                                f"kernel speaks VFIO API {version}, expected "
                                f"{vfio.VFIO_API_VERSION}")
            if not vfio.check_extension(fd, vfio.VFIO_TYPE1v2_IOMMU):
                raise NoIommuError("VFIO_CHECK_EXTENSION", "the kernel offers no VFIO TYPE1v2 "
                                   "IOMMU (modprobe vfio_iommu_type1)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("Container")

    def add_dependent(self, obj: _Closable) -> None:
        """obj (a device, an allocator) is closed before the container releases groups."""
        with self._lock:
            self._dependents.append(obj)

    def remove_dependent(self, obj: _Closable) -> None:
        with self._lock:
            if obj in self._dependents:
                self._dependents.remove(obj)

    def close(self) -> None:
        """Close dependents, release every mapping, detach every group, close every fd.

        Dependents are closed without holding the lock (they take their own locks and call
        back into unmap/remove_dependent), so no lock-order inversion can deadlock."""
        with self._lock:
            if self.closed or self._closing:
                return
            self._closing = True
            dependents = list(reversed(self._dependents))
        first = _close_all(dependents)
        with self._lock:
            self._dependents.clear()
            self._release(first)

    def _release(self, first: BaseException | None) -> None:
        try:
            self._unmap_everything()
        except VfioError as e:
            first = first or e
        for gfd in self._groups.values():
            try:
                vfio.group_unset_container(gfd)
            except VfioError as e:
                first = first or e
            os.close(gfd)
        self._groups.clear()
        lib.idma_maptable_free(self.maptable)
        self.maptable = ffi.NULL
        os.close(self.fd)
        self.closed = True
        if first is not None:
            raise first

    def _unmap_everything(self) -> None:
        if self._maps and self.unmap_all_supported:
            vfio.iommu_unmap_all(self.fd)
        else:
            for start, (length, _) in self._maps.items():
                vfio.iommu_unmap_dma(self.fd, start, length)
        self._maps.clear()
        self._starts.clear()
        self._requests.clear()

    # ---- groups ----------------------------------------------------------------------------

    @property
    def groups(self) -> list[int]:
        with self._lock:
            return sorted(self._groups)

    def group_fd(self, group: int) -> int:
        with self._lock:
            self._check_open()
            if group not in self._groups:
                raise IommuDmaError(f"IOMMU group {group} is not attached to this container")
            return self._groups[group]

    def attach(self, *targets: int | str) -> list[int]:
        """Attach groups, given as numbers, '/dev/vfio/N' or device BDFs; returns the groups.
        A group already attached is not attached again."""
        self._check_open()
        groups = [self._group_of(target) for target in targets]   # sysfs only: no lock needed
        with self._lock:
            self._check_open()
            for group in groups:
                if group not in self._groups:
                    self._attach_group(group)
        return groups

    @classmethod
    def _group_of(cls, target: int | str) -> int:
        group = parse_group(target)
        return cls._group_of_bdf(str(target)) if group is None else group

    @staticmethod
    def _group_of_bdf(bdf: str) -> int:
        info = find(bdf, nvme=False)
        if info.iommu_group is None:
            raise NoIommuError("attach", f"{info.bdf} has no IOMMU group (IOMMU off? boot "
                                         "with intel_iommu=on)")
        if info.driver != VFIO_DRIVER:
            raise NotBoundError(info.bdf, info.driver, "attach")
        return info.iommu_group

    def _attach_group(self, group: int) -> None:
        path = f"/dev/vfio/{group}"
        gfd = _open_group(path, group)
        try:
            if not vfio.group_get_status(gfd) & vfio.VFIO_GROUP_FLAGS_VIABLE:
                raise GroupNotViableError(group, group_devices(group))
            vfio.group_set_container(gfd, self.fd)
            try:
                if not self._groups:
                    # vfio.h: SET_IOMMU is only valid once a group is in the container
                    vfio.set_iommu(self.fd, vfio.VFIO_TYPE1v2_IOMMU)
                    self.unmap_all_supported = vfio.check_extension(self.fd, vfio.VFIO_UNMAP_ALL)
            except BaseException:
                vfio.group_unset_container(gfd)
                raise
        except BaseException:
            os.close(gfd)
            raise
        self._groups[group] = gfd
        self.refresh_info()

    def refresh_info(self) -> vfio.IommuInfo:
        """Re-read page sizes, IOVA ranges and the mapping budget (they change per group)."""
        with self._lock:
            self._check_open()
            info = vfio.iommu_get_info(self.fd)
            self.page_sizes = info.page_sizes
            self.iova_ranges = info.iova_ranges or ((0, (1 << 64) - 1),)
            self._avail_base, self._maps_at_base = info.dma_avail, len(self._maps)
            return info

    # ---- mappings ----------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        """Smallest IOMMU page: VFIO needs vaddr, iova and size aligned to it."""
        return self.page_sizes & -self.page_sizes if self.page_sizes else DEFAULT_PAGE

    @property
    def mapping_count(self) -> int:
        with self._lock:
            return len(self._maps)

    @property
    def mapped_bytes(self) -> int:
        with self._lock:
            return sum(length for length, _ in self._maps.values())

    @property
    def dma_avail(self) -> int | None:
        """How many more mappings the kernel allows (dma_entry_limit budget), if reported."""
        with self._lock:
            if self._avail_base is None:
                return None
            return self._avail_base - (len(self._maps) - self._maps_at_base)

    def check_range(self, va: int, length: int, op: str = "VFIO_IOMMU_MAP_DMA") -> None:
        """Alignment and aperture checks of a would-be IOVA = VA mapping."""
        with self._lock:
            page = self.page_size
            if va % page:
                raise AlignmentError("address", va, page, op)
            if length <= 0 or length % page:
                raise AlignmentError("length", length, page, op)
            if not self._groups:
                raise IommuDmaError("attach a group before mapping (the IOMMU is set on attach)")
            if not within_ranges(self.iova_ranges, va, length):
                raise OutsideApertureError(va, length, self.iova_ranges, op)

    def map(self, va: int, length: int) -> None:
        """Map [va, va+length) at IOVA = va for device read and write. Parts already mapped
        are shared (refcounted); each map() needs one unmap() with the same arguments."""
        with self._lock:
            self._check_open()
            self.check_range(va, length)
            self._map(va, length)

    def _map(self, va: int, length: int) -> None:
        covered = self._overlapping(va, va + length)
        gaps = self._gaps(va, va + length, covered)
        self._check_budget(len(gaps))
        check_memlock(sum(n for _, n in gaps))
        done: list[int] = []
        try:
            for start, n in gaps:
                vfio.iommu_map_dma(self.fd, start, start, n)
                done.append(start)
                self._record(start, n)
        except BaseException:
            for start in done:
                self._drop(start)
            raise
        keys = sorted(covered + done)
        for k in keys:
            self._maps[k][1] += 1
        self._requests.setdefault((va, length), []).append(keys)

    def unmap(self, va: int, length: int) -> None:
        """Undo one map(va, length); mappings nobody else uses are unmapped."""
        with self._lock:
            self._check_open()
            self._unmap(va, length)

    def _unmap(self, va: int, length: int) -> None:
        stack = self._requests.get((va, length))
        if not stack:
            raise IommuDmaError(f"[{va:#x}, +{length:#x}) was not mapped by map()")
        keys = stack.pop()
        if not stack:
            del self._requests[(va, length)]
        for k in keys:
            self._maps[k][1] -= 1
            if self._maps[k][1] == 0:
                self._drop(k)

    def is_mapped(self, va: int, length: int) -> bool:
        """Every byte of [va, va+length) is mapped (native lookup, cheap)."""
        with self._lock:
            self._check_open()
            return bool(lib.idma_maptable_contains(self.maptable, va, length))

    def _record(self, start: int, length: int) -> None:
        if lib.idma_maptable_add(self.maptable, start, length) != 0:
            vfio.iommu_unmap_dma(self.fd, start, length)
            raise IommuDmaError(f"maptable refused [{start:#x}, +{length:#x})")
        self._maps[start] = [length, 0]
        insort(self._starts, start)

    def _drop(self, start: int) -> None:
        length = self._maps.pop(start)[0]
        self._starts.remove(start)
        lib.idma_maptable_remove(self.maptable, start, length)
        vfio.iommu_unmap_dma(self.fd, start, length)

    def _overlapping(self, start: int, end: int) -> list[int]:
        i = max(bisect_right(self._starts, start) - 1, 0)
        out = []
        while i < len(self._starts) and self._starts[i] < end:
            s = self._starts[i]
            if s + self._maps[s][0] > start:
                out.append(s)
            i += 1
        return out

    def _gaps(self, start: int, end: int, covered: Iterable[int]) -> list[tuple[int, int]]:
        gaps, cursor = [], start
        for s in covered:
            if s > cursor:
                gaps.append((cursor, s - cursor))
            cursor = max(cursor, s + self._maps[s][0])
        if cursor < end:
            gaps.append((cursor, end - cursor))
        return gaps

    def _check_budget(self, new: int) -> None:
        avail = self.dma_avail
        if avail is not None and new > avail:
            raise VfioError("VFIO_IOMMU_MAP_DMA", errno.ENOSPC,
                            f"{new} more mappings needed but only {avail} are left "
                            "(vfio_iommu_type1.dma_entry_limit); map larger chunks")


def _close_all(objs: Iterable[_Closable]) -> BaseException | None:
    """Close each; keep going past failures and return the first one."""
    first: BaseException | None = None
    for obj in objs:
        try:
            obj.close()
        except Exception as e:
            first = first or e
    return first


def _open_group(path: str, group: int) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        members = group_devices(group)
        if not members:
            raise NoIommuError(f"open {path}", f"IOMMU group {group} does not exist",
                               errno.ENOENT) from None
        bdf, driver = members[0]
        raise NotBoundError(bdf, driver, f"open {path}") from None
    except PermissionError:
        raise PermissionDeniedError(path, f"open {path}") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusyError(path, f"open {path}") from None
        raise VfioError(f"open {path}", e.errno, "") from None

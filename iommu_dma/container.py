"""A Container: one IOMMU address space shared by one or more devices, over an IOMMU backend
(the legacy VFIO type1 container or iommufd, see iommu_dma.backends).

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

from iommu_dma.backends import (
    CONTAINER,
    CONTAINER_PATH,
    IOMMUFD,
    BackendInfo,
    IommuBackend,
    IommufdBackend,
    Type1Backend,
    auto_backend,
    bdfs_of,
    open_container,
    requested_backend,
)
from iommu_dma.errors import (
    AlignmentError,
    ClosedError,
    IommuDmaError,
    OutsideApertureError,
    VfioError,
)
from iommu_dma.iommufd import IOMMUFD_PATH
from iommu_dma.memlock import check_memlock
from iommu_dma.native import ffi, lib

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
    """One IOMMU address space shared by one or more devices, with IOVA = VA mappings.

    Under it sits an IOMMU backend (iommu_dma.backends): the legacy VFIO type1 container
    (/dev/vfio/vfio + /dev/vfio/N groups) or iommufd (/dev/iommu with one IOAS, devices through
    their cdevs). `backend` ("container", "iommufd" or None) forces one, else
    $IOMMU_DMA_BACKEND does, else it is chosen on the first attach: iommufd when /dev/iommu and
    the device's cdev exist, else the container. `backend_name` says which one is in use.

    Threads: the native engine releases the GIL, so threads may map, unmap and allocate at the
    same time. One re-entrant lock guards the backend, the mapping refcounts, the native
    maptable and the IOMMU info; these are safe to call from several threads: attach, group_fd,
    device_fd, groups, refresh_info, check_range, map, unmap, is_mapped, mapping_count,
    mapped_bytes, dma_avail, page_size, add_dependent, remove_dependent and close (after close,
    the others raise ClosedError). The queue engine's lookups in `maptable` do not take this
    lock: the native table has its own reader/writer lock (native/maptable.c). Refcounts say
    who mapped what, not whether the device still uses it: unmapping memory of a command in
    flight is the caller's error to avoid (the allocator quarantines such buffers).
    """

    def __init__(self, path: str = CONTAINER_PATH, *, backend: str | None = None) -> None:
        self._lock = threading.RLock()
        forced = requested_backend(backend)
        if path != CONTAINER_PATH:
            forced = forced or CONTAINER
        self._backend: IommuBackend | None = None
        if forced == IOMMUFD:
            self._backend = IommufdBackend()
        elif forced == CONTAINER or not os.path.exists(IOMMUFD_PATH):
            self._backend = Type1Backend(self._open(path))   # decided now, as it always was
        self._maps: dict[int, list[int]] = {}             # start -> [length, refcount]
        self._starts: list[int] = []                      # sorted mapping starts
        self._requests: dict[tuple[int, int], list[list[int]]] = {}
        self._dependents: list[_Closable] = []
        self.iova_ranges: tuple[tuple[int, int], ...] = ()
        self.page_sizes = 0
        self._avail_base: int | None = None
        self._maps_at_base = 0
        self.maptable: Any = lib.idma_maptable_new()
        if self.maptable == ffi.NULL:
            if self._backend is not None:
                self._backend.close()
            raise MemoryError("idma_maptable_new failed")
        self._closing = False
        self.closed = False

    @staticmethod
    def _open(path: str) -> int:
        """The legacy container fd (/dev/vfio/vfio, API version and TYPE1v2 checked)."""
        return open_container(path)

    @property
    def backend_name(self) -> str | None:
        """"container" or "iommufd"; None while automatic and nothing is attached yet."""
        return self._backend.name if self._backend is not None else None

    @property
    def fd(self) -> int:
        """The backend's fd: the container fd (/dev/vfio/vfio) or the iommufd (/dev/iommu)."""
        return self._need_backend("fd").fd

    @property
    def ioas_id(self) -> int | None:
        """The IOAS id (iommufd backend), None on the legacy container."""
        return self._backend.ioas_id if isinstance(self._backend, IommufdBackend) else None

    @property
    def unmap_all_supported(self) -> bool:
        b = self._backend
        return isinstance(b, IommufdBackend) or (isinstance(b, Type1Backend)
                                                 and b.unmap_all_supported)

    @property
    def _groups(self) -> dict[int, int]:
        """Attached groups -> group fd (legacy) or -1 (iommufd: devices, not groups, attach)."""
        b = self._backend
        if isinstance(b, Type1Backend):
            return b.group_fds
        return {g: -1 for g in b.groups} if b is not None else {}

    def _need_backend(self, what: str) -> IommuBackend:
        if self._backend is None:
            raise IommuDmaError(f"{what}: no IOMMU backend chosen yet (automatic); attach a "
                                "device first or pass backend='container'/'iommufd'")
        return self._backend

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
        if self._backend is not None:
            first = first or self._backend.close()
        lib.idma_maptable_free(self.maptable)
        self.maptable = ffi.NULL
        self.closed = True
        if first is not None:
            raise first

    def _unmap_everything(self) -> None:
        b = self._backend
        if b is not None and self._maps:
            if self.unmap_all_supported:
                b.unmap_all()
            else:
                for start, (length, _) in self._maps.items():
                    b.unmap(start, length)
        self._maps.clear()
        self._starts.clear()
        self._requests.clear()

    # ---- groups and devices ----------------------------------------------------------------

    @property
    def groups(self) -> list[int]:
        with self._lock:
            return self._backend.groups if self._backend is not None else []

    def group_fd(self, group: int) -> int:
        """The /dev/vfio/N fd of an attached group (legacy container backend only)."""
        with self._lock:
            self._check_open()
            b = self._backend
            if not isinstance(b, Type1Backend):
                raise IommuDmaError(f"IOMMU group {group}: group fds exist only on the legacy "
                                    f"container backend; this Container uses "
                                    f"{self.backend_name or 'no backend yet'} (use device_fd)")
            return b.group_fd(group)

    def attach(self, *targets: int | str) -> list[int]:
        """Attach groups or devices, given as group numbers, '/dev/vfio/N' or device BDFs;
        returns the groups. Legacy: the group joins the container; iommufd: the device (every
        vfio-pci device of a group given by number) is bound and attached to the IOAS. What is
        already attached is not attached again."""
        self._check_open()
        with self._lock:
            self._check_open()
            self._choose(targets)
            b = self._need_backend("attach")
            groups = [b.attach(t) for t in targets]
            self.refresh_info()
        return groups

    def device_fd(self, bdf: str) -> int:
        """A VFIO device fd for bdf, owned by the caller (legacy: VFIO_GROUP_GET_DEVICE_FD;
        iommufd: a duplicate of the cdev fd bound to the IOAS). Attaches first if needed."""
        with self._lock:
            self._check_open()
            self._choose((bdf,))
            fd = self._need_backend("device_fd").device_fd(bdf)
            self.refresh_info()
            return fd

    def _choose(self, targets: Sequence[int | str]) -> None:
        """Automatic selection, on the first attach: iommufd when /dev/iommu and the devices'
        cdevs exist and are usable, else the legacy container."""
        if self._backend is not None or not targets:
            return
        bdfs = [bdf for t in targets for bdf in bdfs_of(t)]
        if auto_backend(bdfs) == IOMMUFD:
            self._backend = IommufdBackend()
        else:
            self._backend = Type1Backend(self._open(CONTAINER_PATH))

    def refresh_info(self) -> BackendInfo:
        """Re-read page sizes, IOVA ranges and the mapping budget (they change per attach)."""
        with self._lock:
            self._check_open()
            info = self._need_backend("refresh_info").info()
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
                self._backend_map(start, n)
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
            self._need_backend("unmap").unmap(start, length)
            raise IommuDmaError(f"maptable refused [{start:#x}, +{length:#x})")
        self._maps[start] = [length, 0]
        insort(self._starts, start)

    def _drop(self, start: int) -> None:
        length = self._maps.pop(start)[0]
        self._starts.remove(start)
        lib.idma_maptable_remove(self.maptable, start, length)
        self._need_backend("unmap").unmap(start, length)

    def _backend_map(self, start: int, length: int) -> None:
        self._need_backend("map").map(start, length)

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

"""DMA memory whose virtual addresses lie inside the IOMMU aperture, so IOVA = VA holds.

An ordinary mmap address (~0x7fxx_xxxx_xxxx, 47 bits) is outside a 39-bit IOMMU's aperture
(QEMU's default aw-bits=39 and many client platforms top out at 0x7fffffffff). The allocator
therefore reserves a PROT_NONE virtual window at an address chosen inside the container's usable
IOVA ranges (MAP_FIXED_NOREPLACE, clear of the MSI window and of existing mappings), backs it
in 2 MiB chunks (hugepages when the pool has them) and maps each backed run into the container
as ONE VFIO mapping, far below the 65535-mapping budget (vfio_iommu_type1.dma_entry_limit).
Buffers are carved from the window; `buf.view` is a zero-copy memoryview of one.

Ownership: memory a submitted command points at belongs to the device until the command's
completion is reaped, its queue is deleted or the controller disabled. The queues tell the
allocator (device_acquire); a buffer freed meanwhile is quarantined, not reused.
"""

from __future__ import annotations

import ctypes
import errno
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from iommu_dma.errors import (
    AlignmentError,
    ClosedError,
    IommuDmaError,
    OutsideApertureError,
    VfioError,
)
from iommu_dma.libc import (
    MADV_DONTFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    madvise,
    mmap_at,
    munmap,
)
from iommu_dma.memlock import check_memlock

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from iommu_dma.container import Container

PAGE = 4096
CHUNK = 2 << 20                      # backing/mapping granule: one 2 MiB hugepage
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # x86 interrupt-message window, never DMA-mappable
USER_VA_END = (1 << 47) - PAGE       # x86-64 4-level paging: top of user space
PREFERRED_CEILING = 1 << 39          # inside every IOMMU of >= 39 address bits
DEFAULT_FLOOR = 1 << 32              # keep clear of the program, its heap and low mmaps
GUARD = 1 << 30                      # distance kept from existing mappings (heap/stack growth)
DEFAULT_WINDOW = 16 << 30            # virtual only (PROT_NONE) until backed

# ---- window placement (pure logic) -------------------------------------------------------

def process_mappings() -> list[tuple[int, int]]:
    """[start, end) of every mapping of this process (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = line.split(None, 1)[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _subtract(free: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in free:
        if cut[1] <= lo or cut[0] >= hi:
            out.append((lo, hi))
            continue
        if lo < cut[0]:
            out.append((lo, cut[0]))
        if cut[1] < hi:
            out.append((cut[1], hi))
    return out


def free_intervals(ranges: Sequence[tuple[int, int]], taken: Sequence[tuple[int, int]],
                   floor: int, ceiling: int, guard: int = GUARD) -> list[tuple[int, int]]:
    """[lo, hi) intervals inside the inclusive IOVA `ranges`, within [floor, ceiling), clear of
    `taken` [start, end) (widened by guard) and of the MSI window."""
    free = [(max(s, floor), min(e + 1, ceiling)) for s, e in ranges]
    free = [(lo, hi) for lo, hi in free if lo < hi]
    free = _subtract(free, (MSI_WINDOW[0], MSI_WINDOW[1] + 1))
    for start, end in taken:
        free = _subtract(free, (max(start - guard, 0), end + guard))
    return free


def place_window(ranges: Sequence[tuple[int, int]], size: int, align: int,
                 taken: Sequence[tuple[int, int]], floor: int = DEFAULT_FLOOR,
                 ceiling: int = PREFERRED_CEILING) -> int | None:
    """The highest `align`-aligned start of a `size`-byte window that fits; preferring below
    `ceiling` (2^39, valid on every IOMMU), then anywhere in user space, then lower floors."""
    for lo_bound, hi_bound in ((floor, ceiling), (floor, USER_VA_END), (16 << 20, USER_VA_END)):
        best = None
        for lo, hi in free_intervals(ranges, taken, lo_bound, hi_bound):
            start = (hi - size) & ~(align - 1)
            if start >= lo and (best is None or start > best):
                best = start
        if best is not None:
            return best
    return None


# ---- the allocator -------------------------------------------------------------------------

class BufferFreedError(IommuDmaError, ValueError):
    """A freed DmaBuffer was used (for I/O, or its view asked for)."""


class DmaBuffer:
    """A DMA buffer: `size` bytes at `addr`, with `iova == addr` (IOVA = VA).

    `view` is a zero-copy memoryview of it; `bytes(buf)` copies it. Give it back with free()
    or use it as a context manager. A buffer that a submitted command points at belongs to
    the device: freeing it then only quarantines its range, which goes back to the pool when
    the command's completion is reaped (or its queue is deleted / the controller disabled).
    """

    __slots__ = ("_addr", "_size", "_span", "_window", "_allocator", "_mem", "_freed",
                 "_leases", "__weakref__")

    def __init__(self, allocator: DmaAllocator, window: _Window, addr: int, size: int,
                 span: int) -> None:
        self._allocator = allocator
        self._window = window
        self._addr = addr
        self._size = size
        self._span = span
        self._mem = (ctypes.c_ubyte * size).from_address(addr)
        # views of _mem lead back here (owning_buffer)
        setattr(self._mem, "_dma_buffer", weakref.ref(self))  # noqa: B010 - ctypes array
        self._freed = False
        # weak references to the queues' leases: commands submitted pointing here and not
        # yet done (see DmaAllocator.device_acquire)
        self._leases: list[weakref.ref[object]] = []

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def iova(self) -> int:
        return self._addr             # IOVA = VA by construction

    @property
    def size(self) -> int:
        return self._size

    @property
    def freed(self) -> bool:
        return self._freed

    @property
    def device_owned(self) -> bool:
        """True while a submitted command that points at this buffer has not completed."""
        return any(r() is not None for r in self._leases)

    def check_usable(self) -> None:
        """BufferFreedError after free(); ClosedError once its allocator is closed."""
        if self._freed:
            raise BufferFreedError(f"{self!r} was freed; allocate a new buffer")
        if self._allocator.closed:
            raise ClosedError(f"the DmaAllocator of {self!r}")

    @property
    def view(self) -> memoryview:
        """Zero-copy byte view (format 'B': item and slice assignment work)."""
        self.check_usable()
        return memoryview(self._mem).cast("B")

    def __buffer__(self, flags: int) -> memoryview:   # PEP 688 (Python 3.12+): memoryview(buf)
        return self.view

    def __bytes__(self) -> bytes:
        self.check_usable()
        return bytes(self._mem)

    def __len__(self) -> int:
        return self._size

    def free(self) -> None:
        self._allocator.free(self)

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._freed:
            self.free()

    def __repr__(self) -> str:
        return f"<DmaBuffer addr={self._addr:#x} size={self._size:#x}>"


def owning_buffer(obj: object) -> DmaBuffer | None:
    """The DmaBuffer obj is, or that obj (a memoryview, e.g. a slice of buf.view) views."""
    if isinstance(obj, DmaBuffer):
        return obj
    if isinstance(obj, memoryview):
        ref = getattr(obj.obj, "_dma_buffer", None)
        return ref() if ref is not None else None
    return None


class _Window:
    """A reserved virtual window; munmapped once the allocator and every buffer let go."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.free: list[tuple[int, int]] = [(base, size)]    # (start, length), sorted
        self.backed: set[int] = set()                          # indexes of backed CHUNKs
        weakref.finalize(self, munmap, base, size)

    def take(self, size: int, align: int) -> int | None:
        """First fit of `size` bytes at `align`: the start, or None."""
        for i, (start, length) in enumerate(self.free):
            at = -(-start // align) * align
            if at + size > start + length:
                continue
            rest = [(start, at - start), (at + size, start + length - at - size)]
            self.free[i:i + 1] = [r for r in rest if r[1] > 0]
            return at
        return None

    def give(self, start: int, size: int) -> None:
        """Return [start, start+size) and coalesce with its neighbours."""
        merged = sorted([*self.free, (start, size)])
        out: list[tuple[int, int]] = []
        for s, n in merged:
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((s, n))
        self.free = out


class Registration:
    """External memory mapped into the container at IOVA = its address."""

    def __init__(self, obj: object, export: ctypes.Array[ctypes.c_ubyte], addr: int,
                 size: int) -> None:
        self.obj, self._export, self.addr, self.size = obj, export, addr, size

    @property
    def iova(self) -> int:
        return self.addr

    def __repr__(self) -> str:
        return f"<Registration addr={self.addr:#x} size={self.size:#x}>"


class DmaAllocator:
    """DMA buffers inside the IOMMU aperture of `container` (which must have a group attached).

    Backed memory stays backed and mapped for reuse until close(); close() unmaps it from the
    IOMMU, and the memory itself goes when the last buffer object is gone.
    """

    def __init__(self, container: Container, *, window_size: int = DEFAULT_WINDOW,
                 hugepages: bool = True) -> None:
        container._check_open()
        if not container.groups:
            raise IommuDmaError("attach a group to the container before allocating DMA memory "
                                "(the usable IOVA ranges are known only then)")
        self.container = container
        self.window_size = window_size
        self.use_hugepages = hugepages
        self.hugepage_bytes = 0
        self.windows: list[_Window] = []
        self._chunk_maps: list[tuple[int, int]] = []
        self._registrations: list[Registration] = []
        self._quarantine: set[DmaBuffer] = set()
        # One lock for windows, backing, quarantine and registrations: the engine releases the
        # GIL, and several threads may allocate, free and register at once.
        self._lock = threading.RLock()
        self.closed = False
        container.add_dependent(self)

    # -- lifetime --

    def __enter__(self) -> DmaAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("DmaAllocator")
        self.container._check_open()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not self.container.closed:
                for reg in list(self._registrations):
                    self.container.unmap(reg.addr, reg.size)
                for start, length in self._chunk_maps:
                    self.container.unmap(start, length)
                self.container.remove_dependent(self)
            self._registrations.clear()
            self._quarantine.clear()  # unmapped from the IOMMU above: the device cannot reach it
            self._chunk_maps.clear()
            self.windows.clear()

    # -- buffers --

    @property
    def backed_bytes(self) -> int:
        return sum(n for _, n in self._chunk_maps)

    def alloc(self, size: int, align: int = PAGE) -> DmaBuffer:
        """A zeroed-on-first-use buffer of `size` bytes at an `align`-aligned address (any power
        of two); its pages are pinned and mapped before it is returned. Thread-safe."""
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align:#x} is not a power of two")
        span = -(-size // PAGE) * PAGE
        with self._lock:
            self._check_open()
            if self._quarantine:
                self._sweep()
            window, start = self._carve(span, max(align, PAGE))
            try:
                self._back(window, start, span)
            except BaseException:
                window.give(start, span)
                raise
        return DmaBuffer(self, window, start, size, span)

    def free(self, buf: DmaBuffer) -> None:
        """Give buf's range back for reuse (it stays backed and mapped until close()). While a
        submitted command still points at buf, the range is quarantined instead and comes back
        when that command's completion is reaped. Thread-safe."""
        if buf._allocator is not self:
            raise IommuDmaError(f"{buf!r} belongs to another allocator")
        with self._lock:
            if buf._freed:
                raise BufferFreedError(f"{buf!r} was already freed")
            buf._freed = True
            if buf.device_owned:
                self._quarantine.add(buf)
            else:
                self._give_back(buf)

    def _give_back(self, buf: DmaBuffer) -> None:
        """A freed buffer's range returns to its window for reuse (lock held)."""
        if not self.closed:
            buf._window.give(buf._addr, buf._span)

    # -- device ownership (used by the queues: NVMe commands in flight) --

    def device_acquire(self, buf: DmaBuffer, lease: object) -> None:
        """Commands pointing at buf are about to be submitted: buf belongs to the device for
        as long as `lease` (an object the queue keeps with those commands) is alive. Nothing
        is counted: ownership is derived from live leases, so no interruption can end it early
        (a lease dies only when the queue drops its last command)."""
        with self._lock:
            buf.check_usable()
            buf._leases = [r for r in buf._leases if r() is not None]
            buf._leases.append(weakref.ref(lease))

    def _sweep(self) -> None:
        """Give back quarantined buffers the device no longer owns (lock held)."""
        for buf in [b for b in self._quarantine if not b.device_owned]:
            self._quarantine.discard(buf)
            self._give_back(buf)

    @property
    def quarantined_bytes(self) -> int:
        """Bytes of freed buffers still owned by the device (not reusable yet)."""
        with self._lock:
            self._sweep()
            return sum(b._span for b in self._quarantine)

    def _carve(self, span: int, align: int) -> tuple[_Window, int]:
        for w in self.windows:
            at = w.take(span, align)
            if at is not None:
                return w, at
        size = max(self.window_size, -(-(span + align) // (1 << 30)) * (1 << 30))
        w = self._reserve(size)
        at = w.take(span, align)
        assert at is not None
        return w, at

    def _reserve(self, size: int) -> _Window:
        """Reserve PROT_NONE address space at a chosen place inside the usable IOVA ranges."""
        ranges = self.container.iova_ranges
        for _ in range(8):   # another thread may take the spot between reading maps and mmap
            base = place_window(ranges, size, 1 << 30, process_mappings())
            if base is None:
                raise OutsideApertureError(0, size, ranges, "reserve DMA window")
            try:
                mmap_at(base, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
                        | MAP_FIXED_NOREPLACE)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    continue
                raise VfioError("mmap DMA window", e.errno, str(e)) from None
            w = _Window(base, size)
            self.windows.append(w)
            return w
        raise VfioError("mmap DMA window", errno.EEXIST, "no free spot inside the IOVA ranges")

    def _back(self, w: _Window, start: int, span: int) -> None:
        """Back and map every not-yet-backed CHUNK of [start, start+span), run by run."""
        first = (start - w.base) // CHUNK
        last = (start + span - 1 - w.base) // CHUNK
        run: list[int] = []
        for i in range(first, last + 2):
            if i <= last and i not in w.backed:
                run.append(i)
                continue
            if run:
                self._back_run(w, run[0], len(run))
                run = []

    def _back_run(self, w: _Window, index: int, count: int) -> None:
        addr, length = w.base + index * CHUNK, count * CHUNK
        self.container.check_range(addr, length)
        check_memlock(length)
        huge = self._populate(addr, length)
        try:
            self.container.map(addr, length)
        except BaseException:
            self._unpopulate(addr, length)
            raise
        w.backed.update(range(index, index + count))
        self._chunk_maps.append((addr, length))
        self.hugepage_bytes += length if huge else 0

    def _populate(self, addr: int, length: int) -> bool:
        """Replace the PROT_NONE reservation with memory; True when hugepages back it."""
        rw = PROT_READ | PROT_WRITE
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE
        if self.use_hugepages:
            try:
                mmap_at(addr, length, rw, flags | MAP_HUGETLB)
                madvise(addr, length, MADV_DONTFORK)
                return True
            except OSError:
                self.use_hugepages = False       # pool empty or absent: stop asking
        try:
            mmap_at(addr, length, rw, flags)
        except OSError as e:
            raise VfioError("mmap DMA memory", e.errno, f"cannot back {length:#x} bytes") from None
        madvise(addr, length, MADV_DONTFORK)
        return False

    @staticmethod
    def _unpopulate(addr: int, length: int) -> None:
        mmap_at(addr, length, PROT_NONE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED)

    # -- external memory --

    def register(self, obj: WriteableBuffer) -> Registration:
        """Map a writable, page-aligned buffer-protocol object (mmap, numpy array, ...) at
        IOVA = its address. While registered, the object cannot be resized or closed.
        Unregister it only when no command in flight points at it. Thread-safe."""
        with self._lock:
            return self._register(obj)

    def _register(self, obj: WriteableBuffer) -> Registration:
        self._check_open()
        with memoryview(obj) as mv:
            if mv.readonly:
                raise IommuDmaError("register() needs a writable buffer: the device may write")
            if not mv.c_contiguous:
                raise IommuDmaError("register() needs a contiguous buffer")
            size = mv.nbytes
        export = (ctypes.c_ubyte * size).from_buffer(obj)   # pins obj's buffer export
        addr = ctypes.addressof(export)
        page = self.container.page_size
        if addr % page:
            raise AlignmentError("buffer address", addr, page, "register")
        if size == 0 or size % page:
            raise AlignmentError("buffer length", size, page, "register")
        self.container.check_range(addr, size, "register")
        self.container.map(addr, size)
        reg = Registration(obj, export, addr, size)
        self._registrations.append(reg)
        return reg

    def unregister(self, reg: Registration) -> None:
        with self._lock:
            self._unregister(reg)

    def _unregister(self, reg: Registration) -> None:
        self._check_open()
        if reg not in self._registrations:
            raise IommuDmaError(f"{reg!r} is not registered with this allocator")
        self._registrations.remove(reg)
        self.container.unmap(reg.addr, reg.size)
        reg._export = None  # type: ignore[assignment]   # release the buffer export

"""The libc calls Python's standard library does not offer, through one ctypes handle.

mmap with a chosen address (Python's mmap module cannot place a mapping), munmap, madvise,
eventfd and ioctl. Each raises OSError (errno set) on failure, except munmap, which is called
from finalizers and ignores errors. Nothing here knows about VFIO or NVMe.
"""

from __future__ import annotations

import ctypes
import errno
import os

# The only ctypes.CDLL of the package: the C library of this process, errno kept per call.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.eventfd.argtypes = [ctypes.c_uint, ctypes.c_int]
_libc.eventfd.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# <sys/mman.h> on Linux x86-64 (mmap(2), madvise(2))
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_POPULATE, MAP_HUGETLB = 0x4000, 0x8000, 0x40000
MAP_FIXED_NOREPLACE = 0x100000       # Linux 4.17+: fail with EEXIST instead of replacing
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTFORK = 10                   # a fork must not turn pinned DMA pages copy-on-write

# <sys/eventfd.h> (eventfd(2))
EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000


def _raise(call: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


def mmap_at(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); OSError on failure. With MAP_FIXED_NOREPLACE, a kernel that ignores the flag
    (< 4.17, treated as a hint) and places elsewhere also counts as EEXIST."""
    got = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if got is None or got == MAP_FAILED:
        _raise(f"mmap({addr:#x}, {length:#x})")
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) and got != addr:
        _libc.munmap(got, length)
        raise OSError(errno.EEXIST, f"mmap placed {length:#x} bytes at {got:#x}, not {addr:#x}")
    return int(got)


def munmap(addr: int, length: int) -> None:
    """munmap(2), errors ignored (it runs from finalizers and close paths)."""
    _libc.munmap(addr, length)


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2); OSError on failure."""
    if _libc.madvise(addr, length, advice) != 0:
        _raise(f"madvise({addr:#x}, {length:#x}, {advice})")


def eventfd(nonblocking: bool = False) -> int:
    """A new close-on-exec eventfd(2) with counter 0."""
    fd = int(_libc.eventfd(0, EFD_CLOEXEC | (EFD_NONBLOCK if nonblocking else 0)))
    if fd < 0:
        _raise("eventfd")
    return fd


def ioctl(fd: int, request: int, arg: int | None) -> int:
    """ioctl(2) with an integer argument (a value or an address): its non-negative return
    value; OSError on failure."""
    ret = int(_libc.ioctl(fd, request, arg))
    if ret < 0:
        _raise(f"ioctl({fd}, {request:#x})")
    return ret

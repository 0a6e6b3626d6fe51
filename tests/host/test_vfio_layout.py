"""ctypes bindings of <linux/vfio.h> match gcc's layout; pure logic of placement and errors."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommu_dma import container as container_module
from iommu_dma import libc, memlock, vfio
from iommu_dma.container import Container, parse_group, within_ranges
from iommu_dma.discovery import BadAddressError, normalize_bdf
from iommu_dma.errors import (
    AlignmentError,
    ClosedError,
    DeviceBusyError,
    GroupNotViableError,
    IommuDmaError,
    MemlockError,
    NotBoundError,
    NotNvmeError,
    OutsideApertureError,
    PermissionDeniedError,
    UnknownDeviceError,
    VfioError,
    without_script_fallback,
)
from iommu_dma.memory import MSI_WINDOW, free_intervals, place_window
from iommu_dma.pci import mapped_prefix

AW48 = [(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)]   # bench-facts.md
AW39 = [(0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)]
GiB = 1 << 30

# ---- struct layout against the kernel header ------------------------------------------------


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>",
             "int main(void) {"]
    for name, cls in vfio.STRUCTS.items():
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof(struct {name}, {field}));')
    consts = [c for c in dir(vfio) if c.startswith("VFIO_") and isinstance(getattr(vfio, c), int)]
    for c in consts:
        if c not in ("VFIO_TYPE", "VFIO_BASE"):
            lines.append(f'printf("const {c} %llu\\n", (unsigned long long)({c}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def gcc_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/vfio.h").exists():
        pytest.skip("needs gcc and /usr/include/linux/vfio.h")
    d = tmp_path_factory.mktemp("vfio_layout")
    (d / "layout.c").write_text(_c_program())
    subprocess.run(["gcc", "-Wall", "-o", str(d / "layout"), str(d / "layout.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(vfio.STRUCTS))
def test_struct_size_and_offsets_match_header(name: str, gcc_layout: dict[str, int]) -> None:
    cls = vfio.STRUCTS[name]
    assert ctypes.sizeof(cls) == gcc_layout[f"{name} sizeof"]
    for field, *_ in cls._fields_:
        assert getattr(cls, field).offset == gcc_layout[f"{name} {field}"], field


def test_constants_match_header(gcc_layout: dict[str, int]) -> None:
    consts = {k.split()[1]: v for k, v in gcc_layout.items() if k.startswith("const ")}
    assert len(consts) > 40
    for name, value in consts.items():
        assert getattr(vfio, name) == value, name
    assert vfio.VFIO_GET_API_VERSION == 0x3B64 and vfio.VFIO_IOMMU_UNMAP_DMA == 0x3B72


# ---- capability chain parsing -----------------------------------------------------------------


def test_capability_chain_walk_and_bounds() -> None:
    buf = (ctypes.c_ubyte * 64)()
    hdr = vfio.vfio_info_cap_header.from_buffer(buf, 24)
    hdr.id, hdr.version, hdr.next = 3, 1, 40
    hdr2 = vfio.vfio_info_cap_header.from_buffer(buf, 40)
    hdr2.id, hdr2.version, hdr2.next = 1, 1, 0
    assert vfio.capabilities(buf, 24) == {3: 24, 1: 40}
    hdr2.next = 60                       # runs past the buffer
    with pytest.raises(VfioError, match="runs past"):
        vfio.capabilities(buf, 24)
    hdr2.next = 24                       # a loop ends after a bounded walk
    assert vfio.capabilities(buf, 24) == {3: 24, 1: 40}


def test_sparse_region_areas() -> None:
    sparse = vfio.RegionInfo(0, vfio.VFIO_REGION_INFO_FLAG_MMAP, 0x4000, 0,
                             ((0, 0x2000), (0x3000, 0x1000)))
    assert sparse.mmap_areas() == ((0, 0x2000), (0x3000, 0x1000))
    whole = vfio.RegionInfo(0, vfio.VFIO_REGION_INFO_FLAG_MMAP, 0x4000, 0,
                            ((0, 0x2000),), msix_mappable=True)
    assert whole.mmap_areas() == ((0, 0x4000),)
    assert vfio.RegionInfo(7, 3, 256, 0).mmap_areas() == ()


# ---- window placement --------------------------------------------------------------------------


@pytest.mark.parametrize("ranges", [AW39, AW48])
def test_window_inside_ranges_below_2_39(ranges: list[tuple[int, int]]) -> None:
    taken = [(0x400000, 0x2000000), (0x7F0000000000, 0x7FFFFFFFF000)]
    base = place_window(ranges, 16 * GiB, GiB, taken)
    assert base is not None and base % GiB == 0
    assert within_ranges(ranges, base, 16 * GiB)
    assert base + 16 * GiB <= 1 << 39
    assert base == (1 << 39) - 16 * GiB


def test_window_avoids_taken_and_msi() -> None:
    # only the first 4 GiB are usable: the window must dodge the MSI window and a mapping
    ranges = [(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)]
    taken = [(0xC0000000, 0xC0001000)]
    base = place_window(ranges, 256 << 20, 2 << 20, taken, floor=16 << 20)
    assert base is not None
    end = base + (256 << 20)
    assert end <= MSI_WINDOW[0] or base > MSI_WINDOW[1]
    assert end <= 0xC0000000 - (1 << 30) or base >= 0xC0001000 + (1 << 30)
    assert within_ranges(ranges, base, 256 << 20)


def test_window_none_when_nothing_fits() -> None:
    assert place_window([(0, 0xFFFFF)], GiB, GiB, []) is None


def test_free_intervals_cut_guard() -> None:
    free = free_intervals(AW39, [(100 * GiB, 101 * GiB)], 4 * GiB, 1 << 39, guard=GiB)
    assert free == [(4 * GiB, 99 * GiB), (102 * GiB, 1 << 39)]


def test_within_ranges_refuses_holes_and_edges() -> None:
    assert within_ranges(AW39, 0x1000, 0x1000)
    assert not within_ranges(AW39, 0xFED00000, 0x200000)          # crosses the MSI hole
    assert within_ranges(AW39, 0x7FFFFFF000, 0x1000)
    assert not within_ranges(AW39, 0x7FFFFFF000, 0x2000)           # past 2^39
    assert not within_ranges(AW39, 0x7F0000000000, 0x1000)         # ordinary mmap address
    assert not within_ranges(AW39, 0x1000, 0)


def test_parse_group_and_bdf() -> None:
    assert parse_group(9) == 9 and parse_group("9") == 9 and parse_group("/dev/vfio/12") == 12
    assert parse_group("0000:00:09.0") is None
    assert normalize_bdf("00:0A.0") == "0000:00:0a.0"
    with pytest.raises(BadAddressError, match="'banana' is not a PCI address"):
        normalize_bdf("banana")


# ---- error messages --------------------------------------------------------------------------


def test_vfio_error_message_and_fields() -> None:
    e = VfioError("VFIO_IOMMU_MAP_DMA", errno.EINVAL, "iova outside the ranges")
    assert str(e) == ("VFIO_IOMMU_MAP_DMA failed: EINVAL (Invalid argument): "
                      "iova outside the ranges")
    assert (e.op, e.errno, e.hint) == ("VFIO_IOMMU_MAP_DMA", errno.EINVAL,
                                       "iova outside the ranges")
    assert isinstance(e, IommuDmaError)


def test_specific_error_messages() -> None:
    unbound = str(NotBoundError("0000:00:09.0", "nvme"))
    assert ("run `iommu-dma bind 0000:00:09.0` first (or `scripts/setup_vfio.sh bind "
            "0000:00:09.0`)") in unbound
    assert without_script_fallback(unbound).endswith("run `iommu-dma bind 0000:00:09.0` first")
    assert "bound to 'nvme'" in str(NotBoundError("0000:00:09.0", "nvme"))
    msg = str(GroupNotViableError(5, [("0000:00:09.0", "vfio-pci"), ("0000:00:09.1", "ahci")]))
    assert "0000:00:09.1 (ahci)" in msg and "group 5" in msg and "`iommu-dma bind BDF`" in msg
    denied = str(PermissionDeniedError("/dev/vfio/9"))
    assert "`iommu-dma bind --user NAME BDF`" in denied
    assert "setup_vfio.sh bind --user NAME" in denied
    assert "setup_vfio" not in without_script_fallback(denied)
    assert "setup_vfio" not in without_script_fallback(msg)
    busy = DeviceBusyError("/dev/vfio/9")
    assert busy.errno == errno.EBUSY and "another process" in str(busy)
    out = OutsideApertureError(0x7F0000000000, 0x1000, AW39)
    assert "[0xfef00000, 0x7fffffffff]" in str(out) and "0x7f0000000000" in str(out)
    assert "is not a multiple of 0x1000" in str(AlignmentError("address", 0x1234, 0x1000))
    mem = str(MemlockError(64 << 10, 0, 2 << 20))
    for part in ("RLIMIT_MEMLOCK", "64 KiB", "2 MiB", "ulimit -l", "/etc/security/limits.conf",
                 "LimitMEMLOCK"):
        assert part in mem
    assert str(ClosedError("Container")) == "Container is closed"
    assert "no PCI device 0000:00:1d.7" in str(UnknownDeviceError("0000:00:1d.7"))
    assert "class 0x010601" in str(NotNvmeError("0000:00:1f.2", 0x010601))


# ---- libc, memlock, BAR0 bounds ----------------------------------------------------------------


def test_mmap_at_places_and_refuses_overlap() -> None:
    size = 4 * libc.PAGE_SIZE
    anon = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
    base = libc.mmap_at(0, size, libc.PROT_NONE, anon | libc.MAP_NORESERVE)
    try:
        got = libc.mmap_at(base, libc.PAGE_SIZE, libc.PROT_READ | libc.PROT_WRITE,
                           anon | libc.MAP_FIXED)
        assert got == base
        ctypes.c_uint64.from_address(base).value = 0x1122334455667788
        libc.madvise(base, libc.PAGE_SIZE, libc.MADV_DONTFORK)
        with pytest.raises(OSError) as e:
            libc.mmap_at(base, libc.PAGE_SIZE, libc.PROT_NONE, anon | libc.MAP_FIXED_NOREPLACE)
        assert e.value.errno == errno.EEXIST
    finally:
        libc.munmap(base, size)
    with pytest.raises(OSError) as e:
        libc.madvise(base, libc.PAGE_SIZE, libc.MADV_DONTFORK)     # no longer mapped
    assert e.value.errno == errno.ENOMEM


def test_eventfd_counts() -> None:
    fd = libc.eventfd(nonblocking=True)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 8)
        os.write(fd, (3).to_bytes(8, "little"))
        assert int.from_bytes(os.read(fd, 8), "little") == 3
        assert os.get_inheritable(fd) is False                      # EFD_CLOEXEC
    finally:
        os.close(fd)


def test_ioctl_errors_are_typed() -> None:
    with pytest.raises(OSError) as e:
        libc.ioctl(-1, vfio.VFIO_GET_API_VERSION, 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(VfioError) as v:
        vfio.get_api_version(-1)
    assert (v.value.op, v.value.errno) == ("VFIO_GET_API_VERSION", errno.EBADF)
    assert isinstance(vfio._error("VFIO_IOMMU_MAP_DMA", errno.ENOMEM), MemlockError)
    assert isinstance(vfio._error("VFIO_GROUP_GET_DEVICE_FD", errno.EBUSY), DeviceBusyError)
    assert "dma_entry_limit" in vfio._error("VFIO_IOMMU_MAP_DMA", errno.ENOSPC).hint


def test_check_memlock(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memlock.locked_bytes() >= 0
    memlock.check_memlock(0)                       # nothing to pin: never an error
    monkeypatch.setattr(memlock, "has_ipc_lock", lambda: False)
    monkeypatch.setattr(memlock, "memlock_limit", lambda: 64 << 10)
    with pytest.raises(MemlockError) as e:
        memlock.check_memlock(2 << 20)
    assert (e.value.limit, e.value.needed) == (64 << 10, 2 << 20)
    monkeypatch.setattr(memlock, "memlock_limit", lambda: resource.RLIM_INFINITY)
    memlock.check_memlock(1 << 40)
    monkeypatch.setattr(memlock, "has_ipc_lock", lambda: True)
    monkeypatch.setattr(memlock, "memlock_limit", lambda: 0)
    memlock.check_memlock(1 << 40)


def test_bar0_mapped_prefix() -> None:
    assert mapped_prefix(((0, 0x4000),), 0x4000) == 0x4000
    assert mapped_prefix(((0, 0x2000), (0x3000, 0x1000)), 0x4000) == 0x2000   # hole at 0x2000
    assert mapped_prefix(((0x2000, 0x2000), (0, 0x2000)), 0x4000) == 0x4000   # any order
    assert mapped_prefix(((0x1000, 0x1000),), 0x4000) == 0                    # none at 0
    assert mapped_prefix(((0, 0x1000),), 0x100) == 0x100                      # BAR < a page


# ---- Container bookkeeping under threads (a fake kernel stands in for the VFIO ioctls) ---------


class FakeIommu:
    """The type1 rules the container relies on: no overlapping mappings, whole unmaps only."""

    def __init__(self) -> None:
        self.maps: dict[int, int] = {}
        self.lock = threading.Lock()

    def map_dma(self, fd: int, vaddr: int, iova: int, size: int) -> None:
        with self.lock:
            if any(s < iova + size and iova < s + n for s, n in self.maps.items()):
                raise VfioError("VFIO_IOMMU_MAP_DMA", errno.EEXIST)
            self.maps[iova] = size

    def unmap_dma(self, fd: int, iova: int, size: int, flags: int = 0) -> int:
        with self.lock:
            if self.maps.get(iova) != size:
                raise VfioError("VFIO_IOMMU_UNMAP_DMA", errno.EINVAL)
            del self.maps[iova]
        return size


@pytest.fixture
def fake_container(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Container, FakeIommu]]:
    iommu = FakeIommu()
    monkeypatch.setattr(Container, "_open", staticmethod(lambda path: os.open(os.devnull, 0)))
    monkeypatch.setattr(vfio, "iommu_map_dma", iommu.map_dma)
    monkeypatch.setattr(vfio, "iommu_unmap_dma", iommu.unmap_dma)
    monkeypatch.setattr(vfio, "group_unset_container", lambda fd: None)
    monkeypatch.setattr(container_module, "check_memlock", lambda extra: None)
    c = Container()
    c._groups[1] = os.open(os.devnull, 0)
    c.iova_ranges, c.page_sizes = ((0, (1 << 48) - 1),), 0x1000
    yield c, iommu
    c.close()


def test_container_refcounts_shared_mappings(fake_container: tuple[Container, FakeIommu]) -> None:
    c, iommu = fake_container
    c.map(0x10000, 0x4000)
    c.map(0x12000, 0x4000)                 # overlaps: only the new part is mapped
    assert iommu.maps == {0x10000: 0x4000, 0x14000: 0x2000}
    assert c.is_mapped(0x10000, 0x6000) and not c.is_mapped(0x10000, 0x7000)
    c.unmap(0x10000, 0x4000)               # still used by the second request
    assert iommu.maps == {0x10000: 0x4000, 0x14000: 0x2000}
    c.unmap(0x12000, 0x4000)
    assert iommu.maps == {} and c.mapping_count == 0
    with pytest.raises(IommuDmaError, match="was not mapped"):
        c.unmap(0x12000, 0x4000)


def test_container_map_unmap_from_threads(fake_container: tuple[Container, FakeIommu]) -> None:
    """Overlapping map/unmap from several threads: the kernel never sees an overlap or a
    partial unmap, and everything is released at the end."""
    c, iommu = fake_container
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(300):
                va = 0x100000 + ((seed * 7 + i) % 16) * 0x1000
                c.map(va, 0x3000)
                assert c.is_mapped(va, 0x3000)
                c.unmap(va, 0x3000)
        except BaseException as e:
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)            # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert iommu.maps == {} and c.mapping_count == 0 and c.mapped_bytes == 0

"""The VFIO layer against real (emulated) hardware in the bench guest: BAR0, config space, IOVA
ranges, the in-aperture allocator, registration, several groups, and every error case."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iommu_dma import discovery, vfio
from iommu_dma.container import Container, within_ranges
from iommu_dma.errors import (
    AlignmentError,
    ClosedError,
    DeviceBusyError,
    NotBoundError,
    NotNvmeError,
    OutsideApertureError,
    UnknownDeviceError,
    VfioError,
)
from iommu_dma.memory import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    DmaAllocator,
    mmap_at,
    munmap,
    place_window,
    process_mappings,
)
from iommu_dma.pci import PciDevice
from iommu_dma.testing.bench import Bench
from iommu_dma.testing.guest import PCI_DEVICES

pytestmark = pytest.mark.iommu_dma_vm
BOTH = pytest.mark.parametrize("idma_bench", ["default", "aw39"], indirect=True)

# bench-facts.md: what VFIO reports in the bench guest
RANGES = {
    48: ((0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)),
    39: ((0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)),
}
PAGE_SIZES = 4096 | (2 << 20) | (1 << 30)
NVME_CAP, NVME_VS = 0x00, 0x08


def sysfs_hex(bdf: str, name: str) -> int:
    return int((PCI_DEVICES / bdf / name).read_text(), 16)


def mmap_inside(container: Container, size: int) -> int:
    """Anonymous memory placed inside the aperture (what the allocator does, by hand)."""
    base = place_window(container.iova_ranges, size, 2 << 20, process_mappings())
    assert base is not None
    return mmap_at(base, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)


# ---- the device ----------------------------------------------------------------------------


@BOTH
def test_bar0_registers_config_space_reset_and_msix(idma_bench: Bench,
                                                    vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    with Container() as c:
        dev = PciDevice(c, bdf)                       # attaches the device's group
        buf = DmaAllocator(c).alloc(4096)
        assert c.is_mapped(buf.iova, 4096)
        cap = dev.read64(NVME_CAP)
        assert cap & 0xFFFF == 0x7FF                 # MQES (QEMU 7.2)
        assert (cap >> 16) & 1 == 1                  # CQR
        assert dev.read32(NVME_VS) == 0x00010400     # NVMe 1.4
        assert ctypes.c_uint32.from_address(dev.bar0_addr + NVME_VS).value == 0x00010400
        assert dev.vendor_id == sysfs_hex(bdf, "vendor")
        assert dev.device_id == sysfs_hex(bdf, "device")
        assert dev.class_code == sysfs_hex(bdf, "class")
        assert dev.bar0.size >= 0x2000 and dev.bar0.mmappable

        dev.enable_bus_master()
        assert dev.bus_master
        dev.enable_bus_master(False)
        assert not dev.bus_master
        dev.enable_bus_master()

        assert dev.can_reset
        dev.reset()
        assert dev.bus_master
        assert dev.read32(NVME_VS) == 0x00010400

        vectors = dev.irq_info().count
        assert vectors >= 2
        fds = dev.enable_msix(2)
        dev.trigger_msix(1)
        assert int.from_bytes(os.read(fds[1], 8), "little") == 1
        dev.disable_msix()
        with pytest.raises(ValueError, match="MSI-X vectors"):
            dev.enable_msix(vectors + 1)


def test_discovery_in_guest(vfio_bdfs: list[str]) -> None:
    found = {i.bdf: i for i in discovery.list_nvme()}
    assert sorted(found) == vfio_bdfs
    for bdf in vfio_bdfs:
        info = found[bdf]
        assert info.vendor_device == "1b36:0010" and info.driver == "vfio-pci"
        assert info.iommu_group == int((PCI_DEVICES / bdf / "iommu_group").resolve().name)
        assert info.vfio_path == f"/dev/vfio/{info.iommu_group}" and info.vfio_owner == "root"
        assert info.group_members == ()
        assert discovery.find(bdf[5:]) == info


# ---- IOVA ranges, allocator, registration ------------------------------------------------


@BOTH
def test_ranges_and_allocations_inside_aperture(idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    with Container() as c:
        c.attach(vfio_bdfs[0])
        assert c.iova_ranges == RANGES[idma_bench.aw_bits]
        assert c.page_sizes & PAGE_SIZES == PAGE_SIZES and c.page_size == 4096
        assert c.dma_avail == 65535
        mem = DmaAllocator(c)
        bufs = []
        for size, align in [(1, 4096), (4096, 4096), (5000, 4096), (64 << 10, 64 << 10),
                            (2 << 20, 2 << 20), ((3 << 20) + 1, 4096), (8192, 1 << 20),
                            (100, 64)]:
            buf = mem.alloc(size, align)
            bufs.append(buf)
            assert buf.iova == buf.addr and buf.size == size and len(buf) == size
            assert buf.addr % align == 0
            assert within_ranges(c.iova_ranges, buf.addr, size)
            assert c.is_mapped(buf.addr, size)
            view = buf.view                              # zero-copy
            view[-1] = 0x5A
            view[0] = 0xA5                               # the same byte when size == 1
            assert ctypes.string_at(buf.addr, 1) == b"\xa5"
            if size > 1:
                assert ctypes.string_at(buf.addr + size - 1, 1) == b"\x5a"
            raw = buf.view                               # a buffer-protocol object
            assert raw.nbytes == size and raw.tobytes()[0] == 0xA5 and bytes(buf) == raw
            assert ctypes.addressof(ctypes.c_char.from_buffer(raw)) == buf.addr
        if idma_bench.aw_bits == 39:
            assert all(b.addr + b.size <= 1 << 39 for b in bufs)
        assert c.mapping_count <= 8                      # chunks, not one mapping per buffer
        assert c.dma_avail == 65535 - c.mapping_count
        assert c.dma_avail == vfio.iommu_get_info(c.fd).dma_avail   # the kernel agrees
        # freed space is reused without new mappings
        count, addr = c.mapping_count, bufs[1].addr
        bufs[1].free()
        again = mem.alloc(4096)
        assert again.addr == addr and c.mapping_count == count
        with pytest.raises(Exception, match="already freed"):
            bufs[1].free()


@BOTH
def test_register_external_memory(idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    with Container() as c:
        c.attach(vfio_bdfs[0])
        mem = DmaAllocator(c)
        plain = mmap.mmap(-1, 64 << 10)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(plain))
        if idma_bench.aw_bits == 48:
            reg = mem.register(plain)
            assert reg.iova == reg.addr == addr and reg.size == 64 << 10
            assert c.is_mapped(addr, 64 << 10)
            with pytest.raises(BufferError):
                plain.close()                            # pinned while registered
            mem.unregister(reg)
            assert not c.is_mapped(addr, 4096)
        else:
            # an ordinary mmap address (~0x7fxx_xxxx_xxxx) is outside a 39-bit aperture
            with pytest.raises(OutsideApertureError, match=r"0x7fffffffff\]") as e:
                mem.register(plain)
            assert e.value.start == addr
        # memory placed inside the aperture registers on both widths
        inside = mmap_inside(c, 2 << 20)
        arr = (ctypes.c_ubyte * (2 << 20)).from_address(inside)
        reg = mem.register(arr)
        assert reg.iova == inside and c.is_mapped(inside, 2 << 20)
        mem.unregister(reg)
        munmap(inside, 2 << 20)


def test_overlapping_maps_share_mappings(vfio_bdfs: list[str]) -> None:
    with Container() as c:
        c.attach(vfio_bdfs[0])
        base = mmap_inside(c, 16 << 12)
        c.map(base, 8 << 12)
        c.map(base + (4 << 12), 8 << 12)             # overlaps: only the gap is new
        assert c.mapping_count == 2 and c.mapped_bytes == 12 << 12
        c.map(base, 8 << 12)                          # identical: shared
        assert c.mapping_count == 2
        c.unmap(base, 8 << 12)
        c.unmap(base, 8 << 12)
        assert c.mapping_count == 2                   # the second request still uses both
        assert c.is_mapped(base + (4 << 12), 8 << 12)
        c.unmap(base + (4 << 12), 8 << 12)
        assert c.mapping_count == 0 and not c.is_mapped(base, 4096)
        munmap(base, 16 << 12)


# ---- several groups ------------------------------------------------------------------------


@pytest.mark.iommu_dma_vm(bench="two_ctrl")
def test_two_groups_in_one_container(vfio_bdfs: list[str]) -> None:
    with Container() as c:
        groups = c.attach(*vfio_bdfs)
        assert len(set(groups)) == 2 and c.groups == sorted(groups)
        assert c.iova_ranges == RANGES[48]
        devs = [PciDevice(c, bdf) for bdf in vfio_bdfs]
        for dev in devs:
            assert dev.read32(NVME_VS) == 0x00010400
            assert dev.read64(NVME_CAP) & 0xFFFF == 0x7FF
        buf = DmaAllocator(c).alloc(8192)             # one mapping serves both devices
        assert c.is_mapped(buf.iova, 8192)
    for g in groups:                                  # close released both groups
        fd = os.open(f"/dev/vfio/{g}", os.O_RDWR)
        os.close(fd)


# ---- errors ----------------------------------------------------------------------------------


def test_unbound_device_is_refused(idma_nvme_bdfs: list[str]) -> None:
    bdf = idma_nvme_bdfs[0]                                # still on the kernel nvme driver
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    with Container() as c:
        with pytest.raises(NotBoundError) as e:
            PciDevice(c, bdf)
        assert f"{bdf} is bound to 'nvme', not vfio-pci" in str(e.value)
        assert f"scripts/setup_vfio.sh bind {bdf}" in str(e.value)
        with pytest.raises(NotBoundError):
            c.attach(bdf)


def test_unknown_and_non_nvme_devices(vfio_bdfs: list[str]) -> None:
    with Container() as c:
        with pytest.raises(UnknownDeviceError, match="no PCI device 0000:00:1d.7") as e:
            PciDevice(c, "0000:00:1d.7")
        assert vfio_bdfs[0] in str(e.value)           # says which controllers exist
        other = next(i for i in discovery.list_pci() if not i.is_nvme)
        with pytest.raises(NotNvmeError, match=f"{other.bdf} is not an NVMe controller"):
            PciDevice(c, other.bdf)
        with pytest.raises(NotNvmeError):
            discovery.find(other.bdf)


def test_outside_aperture_and_unaligned(vfio_bdfs: list[str]) -> None:
    with Container() as c:
        c.attach(vfio_bdfs[0])
        with pytest.raises(OutsideApertureError, match=r"outside the usable IOVA ranges"):
            c.map(0xFEE00000, 4096)                    # the MSI window
        with pytest.raises(OutsideApertureError):
            c.map(1 << 48, 4096)
        # and the kernel itself refuses an IOVA in the MSI hole (typed, with a hint)
        base = mmap_inside(c, 4096)
        with pytest.raises(VfioError) as e:
            vfio.iommu_map_dma(c.fd, base, 0xFEE00000, 4096)
        assert e.value.op == "VFIO_IOMMU_MAP_DMA" and e.value.errno is not None
        assert str(e.value).startswith("VFIO_IOMMU_MAP_DMA failed: E")
        with pytest.raises(AlignmentError, match="address"):
            c.map(base + 512, 4096)
        mem = DmaAllocator(c)
        region = mmap.mmap(-1, 3 * 4096)
        with pytest.raises(AlignmentError, match="buffer address 0x[0-9a-f]+ is not a multiple "
                                                 "of 0x1000"):
            mem.register(memoryview(region)[512:512 + 4096])
        with pytest.raises(AlignmentError, match="buffer length 0x3e8"):
            mem.register(memoryview(region)[:1000])
        with pytest.raises(Exception, match="writable"):
            mem.register(b"\0" * 4096)
        munmap(base, 4096)


def test_group_busy(vfio_bdfs: list[str]) -> None:
    with Container() as c:
        group = c.attach(vfio_bdfs[0])[0]
        with Container() as other, pytest.raises(DeviceBusyError) as e:
            other.attach(vfio_bdfs[0])
        assert e.value.path == f"/dev/vfio/{group}" and "in use" in str(e.value)


def test_use_after_close(vfio_bdfs: list[str]) -> None:
    c = Container()
    dev = PciDevice(c, vfio_bdfs[0])
    mem = DmaAllocator(c)
    buf = mem.alloc(4096)
    c.close()
    assert dev.closed and mem.closed
    for call in (lambda: c.map(buf.addr, 4096), lambda: c.attach(vfio_bdfs[0]),
                 lambda: c.is_mapped(buf.addr, 1), lambda: dev.read32(0),
                 lambda: mem.alloc(4096), lambda: dev.config_read(0)):
        with pytest.raises(ClosedError, match="is closed"):
            call()
    c.close()                                          # idempotent
    for call in (lambda: bytes(buf), lambda: buf.view):  # buffers of a closed allocator
        with pytest.raises(ClosedError, match="is closed"):
            call()
    with Container() as again:                         # the group was released
        again.attach(vfio_bdfs[0])


CHILD = textwrap.dedent("""
    import ctypes, json, resource, sys
    from iommu_dma.container import Container
    from iommu_dma.errors import MemlockError
    from iommu_dma.memlock import has_ipc_lock
    from iommu_dma.memory import DmaAllocator

    # root is exempt from RLIMIT_MEMLOCK through CAP_IPC_LOCK: drop it (capset(2), v3)
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = Hdr(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(hdr), data) == 0
    data[0].effective &= ~(1 << 14)
    data[0].permitted &= ~(1 << 14)
    assert libc.capset(ctypes.byref(hdr), data) == 0
    assert not has_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (3 << 20, 3 << 20))
    out = {}
    with Container() as c:
        c.attach(sys.argv[1])
        mem = DmaAllocator(c)
        try:
            mem.alloc(4 << 20)
        except MemlockError as e:
            out["precheck"] = str(e)
        # the kernel's own accounting agrees (ENOMEM, translated)
        from iommu_dma.libc import mmap_at
        from iommu_dma.memory import place_window, process_mappings
        base = place_window(c.iova_ranges, 4 << 20, 2 << 20, process_mappings())
        addr = mmap_at(base, 4 << 20, 3, 0x22 | 0x100000)
        from iommu_dma import vfio
        try:
            vfio.iommu_map_dma(c.fd, addr, addr, 4 << 20)
        except MemlockError as e:
            out["kernel"] = str(e)
        out["small"] = mem.alloc(4096).size   # what fits the limit still works
    print(json.dumps(out))
""")


def test_memlock_limit_in_child(vfio_bdfs: list[str], tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), vfio_bdfs[0]], capture_output=True,
                          text=True, cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    msg = out["precheck"]
    for part in ("RLIMIT_MEMLOCK", "limit 3 MiB", "pinning 4 MiB more", "ulimit -l",
                 "/etc/security/limits.conf", "LimitMEMLOCK"):
        assert part in msg, msg
    assert "ENOMEM" in out["kernel"] and "RLIMIT_MEMLOCK" in out["kernel"]
    assert out["small"] == 4096

"""DMA isolation, proven on the bench's emulated Intel IOMMU: the device cannot reach memory of
this process that is not mapped in the container, even when a command points straight at it.

The raw path IoQueue.submit_unchecked() (UNSAFE, for these tests only) sends a Read whose PRP1
is the address of an anonymous page of this process: inside the IOMMU aperture, holding a
known pattern, not mapped in the container. With IOVA = VA that address *is* a bus address,
so only the IOMMU stands between the device and the page.

What QEMU 7.2 + Linux 6.1 did on the default bench (seen 2026-11-29; the asserts pin it):
- The Read into the unmapped page COMPLETES WITH SUCCESS (status 0, in about 6 ms): QEMU's
  DMA helpers bounce the data and drop the failed write, no Data Transfer Error, no timeout.
  The device's status therefore proves nothing; the IOMMU does the isolating.
- The guest kernel logs, right after the completion:
    DMAR: DRHD: handling fault status reg 2
    DMAR: [DMA Write NO_PASID] Request device [00:0a.0] fault addr 0x7f96c91a3000
          [fault reason 0x05] PTE Write access is not set
  (fault addr = the page; QEMU's own stderr adds "vtd_iova_to_slpte: detected slpte
  permission error (iova=0x7f96c91a3000, level=0x4, slpte=0x0, write=1 ...)").
- The page keeps its 0xA5 pattern; the same Read into ctrl.alloc() memory on the same queue
  then succeeds and brings the block.
- Control, the checked path: ns.command(Read) with PRP1/PRP2/MPTR = the page and no buffer
  goes out with PRP1 = PRP2 = 0; QEMU 7.2 again answers Success and the kernel logs DMAR
  faults at "fault addr 0x0 [fault reason 0x05]", none at the page.
- The other direction, a Write whose PRP1 is the page: also Success, and
    DMAR: [DMA Read NO_PASID] Request device [00:0a.0] fault addr 0x7f21007ca000
          [fault reason 0x06] PTE Read access is not set
  the block on the media does not hold the page's pattern (it held zeroes: QEMU wrote its
  bounce buffer, not our memory).
- The fault lines are rate limited by the kernel (10 per 5 s): each test here makes one.
"""

from __future__ import annotations

import ctypes
import mmap
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.container import within_ranges
from iommu_dma.nvme import sqe
from iommu_dma.nvme.ioqueue import IoFuture
from iommu_dma.testing.bench import image_path
from tests.vm.kernel_log import DmarFault, KernelLog, source_id

pytestmark = pytest.mark.iommu_dma_vm(bench="default")

PAGE = 4096
LBA = 12400                 # ns1 blocks this file owns: 12400..12403
PATTERN = b"\xa5" * PAGE



@pytest.fixture
def unmapped_page(ctrl: Controller) -> Iterator[tuple[mmap.mmap, int]]:
    """An anonymous page of this process holding PATTERN, inside the aperture, not mapped."""
    page = mmap.mmap(-1, PAGE)
    page[:] = PATTERN
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    assert addr % PAGE == 0
    assert within_ranges(ctrl.container.iova_ranges, addr, PAGE)    # a valid IOVA...
    assert not ctrl.container.is_mapped(addr, PAGE)                  # ...that nobody mapped
    yield page, addr
    page.close()


def image_block(images: Path, lba: int) -> bytes:
    with open(image_path(images, 0, 1), "rb") as f:
        f.seek(lba * PAGE)
        return f.read(PAGE)


def outcome(fut: IoFuture, completed: bool) -> str:
    """How a command ended: "Success", its NvmeError's status name, or "timeout"."""
    if not completed:
        return "timeout"
    err = fut.exception()
    return "Success" if err is None else getattr(err, "name", repr(err))


def faults_at(faults: list[DmarFault], addr: int) -> list[DmarFault]:
    return [f for f in faults if f.addr == addr & ~(PAGE - 1)]


def test_read_into_an_unmapped_page_is_stopped_by_the_iommu(
        ctrl: Controller, vfio_bdfs: list[str], idma_bench_images: Path,
        unmapped_page: tuple[mmap.mmap, int]) -> None:
    page, addr = unmapped_page
    ns = ctrl.namespace(1)
    data = random.randbytes(PAGE)
    ns.write(LBA, data)
    cmd = sqe.read(1, LBA, 1)
    cmd.prp1 = addr
    with KernelLog() as klog:
        fut = ns.queue.submit_unchecked(cmd, f"Read LBA {LBA} into unmapped {addr:#x}")
        completed = fut.wait(30)
        faults = klog.wait_for_fault(addr, 10)
        seen = klog.text()
    # (a) what the device answered
    status = outcome(fut, completed)
    print(f"unchecked Read into unmapped {addr:#x}: {status}; kernel:\n{seen}")
    # (b) the IOMMU refused the device's write to that page, and the kernel says so
    ours = faults_at(faults, addr)
    assert ours, f"no DMAR fault for {addr:#x}; kernel log:\n{seen}"
    assert all(f.kind == "DMA Write" and f.source == source_id(vfio_bdfs[0])
               and f.reason == 0x05 for f in ours), seen
    # (c) the page is untouched
    assert page[:] == PATTERN
    # (a) QEMU 7.2 reports Success (the data went nowhere); a Data Transfer Error would do too
    assert status in ("Success", "Data Transfer Error"), status
    # (d) the same Read into mapped memory, on the same queue, then works
    with ctrl.alloc(PAGE) as buf:
        buf.view[:] = bytes(PAGE)
        good = sqe.read(1, LBA, 1)
        good.prp1 = buf.addr
        assert ns.queue.submit_unchecked(good, "Read into mapped memory").result(30) == 0
        assert bytes(buf) == data
    assert ns.read(LBA, 1) == data                   # and the checked path too
    assert image_block(idma_bench_images, LBA) == data


def test_write_from_an_unmapped_page_cannot_read_it(
        ctrl: Controller, vfio_bdfs: list[str], idma_bench_images: Path,
        unmapped_page: tuple[mmap.mmap, int]) -> None:
    """The other direction: a Write whose PRP1 is the unmapped page cannot fetch its bytes."""
    page, addr = unmapped_page
    ns = ctrl.namespace(1)
    lba = LBA + 1
    before = random.randbytes(PAGE)
    ns.write(lba, before)
    cmd = sqe.write(1, lba, 1)
    cmd.prp1 = addr
    with KernelLog() as klog:
        fut = ns.queue.submit_unchecked(cmd, f"Write LBA {lba} from unmapped {addr:#x}")
        completed = fut.wait(30)
        faults = klog.wait_for_fault(addr, 10)
        seen = klog.text()
    status = outcome(fut, completed)
    print(f"unchecked Write from unmapped {addr:#x}: {status}; kernel:\n{seen}")
    ours = faults_at(faults, addr)
    assert ours, f"no DMAR fault for {addr:#x}; kernel log:\n{seen}"
    assert all(f.kind == "DMA Read" and f.source == source_id(vfio_bdfs[0])
               and f.reason == 0x06 for f in ours), seen
    assert status in ("Success", "Data Transfer Error"), status
    assert page[:] == PATTERN
    on_media = image_block(idma_bench_images, lba)
    got = ("the old block" if on_media == before else "zeroes" if on_media == bytes(PAGE)
           else f"other bytes ({on_media[:8].hex()}...)")
    print(f"the media got {got}")
    assert on_media != PATTERN                       # the page's bytes never reached the media
    assert ns.read(lba, 1) == on_media


def test_checked_path_never_sends_a_callers_pointer(
        ctrl: Controller, vfio_bdfs: list[str], idma_bench_images: Path,
        unmapped_page: tuple[mmap.mmap, int]) -> None:
    """Control: ns.command() with PRP1/PRP2/MPTR set but no buffer sends PRPs of zero (the
    engine replaces every data pointer of a checked submission), so no DMA aims at the page."""
    page, addr = unmapped_page
    ns = ctrl.namespace(1)
    lba = LBA + 2
    data = random.randbytes(PAGE)
    ns.write(lba, data)
    cmd = sqe.read(1, lba, 1)
    cmd.prp1 = cmd.prp2 = cmd.mptr = addr
    with KernelLog() as klog:
        # dmar_fault() rate-limits its lines (10 per 5 s, shared by the "handling fault status"
        # line and the record line): after the earlier tests' faults the record line can be
        # dropped, so the command is sent again once the 5 s window has passed.
        for _ in range(2):
            try:
                ns.command(cmd, timeout=30)
                status = "Success"
            except Exception as e:  # noqa: BLE001 - recorded, whatever it is
                status = f"{type(e).__name__}: {getattr(e, 'name', e)}"
            faults = klog.wait_for_fault(0, 6)
            if faults_at(faults, 0):
                break
        seen = klog.text()
    print(f"checked Read, no buffer, prp1={addr:#x}: {status}; kernel:\n{seen}")
    assert not faults_at(faults, addr), seen         # nothing aimed at the page
    assert faults_at(faults, 0), seen                # the device got PRP1 = 0 instead
    assert status == "Success", status               # QEMU 7.2's answer for PRP1 = 0
    assert page[:] == PATTERN
    assert ns.read(lba, 1) == data

"""The "faults" bench: media errors injected by QEMU's blkdebug, requests stalled or throttled
from the in-guest QEMU monitor, and a controller behind a hot-pluggable root port.

Nothing here unplugs the hotplug controller (another test of this bench does, later)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from iommu_dma import Controller, NvmeError
from iommu_dma.nvme.constants import SC_UNRECOVERED_READ_ERROR, SC_WRITE_FAULT, SCT_MEDIA
from iommu_dma.testing.bench import Bench, image_path
from iommu_dma.testing.guest import PCI_DEVICES
from iommu_dma.testing.qmp import Qmp

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

BLOCK = 4096


@pytest.fixture
def qmp(idma_qmp: Qmp) -> Qmp:
    """The guest's monitor; idma_qmp resumes and unthrottles everything on teardown."""
    return idma_qmp


def _image_blocks(images: Path, ci: int, nsid: int, lba: int, nlb: int) -> bytes:
    with open(image_path(images, ci, nsid), "rb") as f:
        f.seek(lba * BLOCK)
        return f.read(nlb * BLOCK)


def test_bench_injects_what_its_configuration_says(idma_bench: Bench,
                                                   any_driver: None) -> None:
    ns1 = idma_bench.controllers[0].namespaces[0]
    assert ns1.read_errors == (1000, 5000, 12000) and ns1.write_errors == (3000,)
    assert idma_bench.fault_injection


def test_read_of_an_error_lba_fails_with_unrecovered_read_error(vfio_bdfs: list[str]) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(1)
        with pytest.raises(NvmeError) as err:
            ns.read(1000, 1)
        assert err.value.name == "Unrecovered Read Error"
        assert (err.value.sct, err.value.sc) == (SCT_MEDIA, SC_UNRECOVERED_READ_ERROR) == (2, 0x81)
        # the neighbours read fine, before and after the failure
        assert len(ns.read(999, 1)) == BLOCK
        assert len(ns.read(1001, 1)) == BLOCK
        # a multi-block read that covers an error LBA fails as a whole
        with pytest.raises(NvmeError, match="Unrecovered Read Error"):
            ns.read(4996, 8)
        with pytest.raises(NvmeError, match="Unrecovered Read Error"):
            ns.read(12000, 1)
        # namespace 2 has no error LBAs
        assert len(c.namespace(2).read(1000, 1)) == BLOCK


def test_write_of_an_error_lba_fails_with_write_fault(vfio_bdfs: list[str],
                                                     idma_bench_images: Path) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(1)
        before = _image_blocks(idma_bench_images, 0, 1, 3000, 1)
        with pytest.raises(NvmeError) as err:
            ns.write(3000, random.randbytes(BLOCK))
        assert err.value.name == "Write Fault"
        assert (err.value.sct, err.value.sc) == (SCT_MEDIA, SC_WRITE_FAULT) == (2, 0x80)
        assert _image_blocks(idma_bench_images, 0, 1, 3000, 1) == before
        # writes elsewhere land in the backing image, including at a read-error LBA
        for lba, nlb in ((2999, 1), (3001, 4), (1000, 1)):
            data = random.randbytes(nlb * BLOCK)
            ns.write(lba, data)
            assert _image_blocks(idma_bench_images, 0, 1, lba, nlb) == data
        assert ns.read(2999, 1) == _image_blocks(idma_bench_images, 0, 1, 2999, 1)


def test_stalled_read_completes_after_resume(vfio_bdfs: list[str], qmp: Qmp,
                                             idma_bench_images: Path) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(2)
        data = random.randbytes(2 * BLOCK)
        ns.write(64, data)
        buf = c.alloc(2 * BLOCK)
        try:
            qmp.stall(0, 2)
            try:
                req = ns.read_async(64, 2, buf)
                assert len(req.futures) == 1
                assert not req.futures[0].wait(1.0), "the stalled read completed"
                assert not req.done()
            finally:
                qmp.resume(0, 2)
            assert req.futures[0].wait(30.0)
            req.result(0)
            assert bytes(buf) == data == _image_blocks(idma_bench_images, 0, 2, 64, 2)
            # the breakpoint is gone: the next read is not stalled
            assert ns.read(64, 2) == data
        finally:
            buf.free()


def test_stall_without_a_request_resumes_cleanly(vfio_bdfs: list[str], qmp: Qmp) -> None:
    """resume() also drops a breakpoint that nothing hit: later reads are not stalled."""
    qmp.stall(0, 1)
    qmp.resume(0, 1)
    with Controller.open(vfio_bdfs[0]) as c:
        assert len(c.namespace(1).read(7, 1, timeout=30)) == BLOCK


def test_stalled_write_completes_after_resume(vfio_bdfs: list[str], qmp: Qmp,
                                              idma_bench_images: Path) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(2)
        data = random.randbytes(BLOCK)
        buf = c.alloc(BLOCK)
        buf.view[:] = data
        try:
            qmp.stall(0, 2, event="write_aio")
            try:
                req = ns.write_async(200, buf, 1)
                assert not req.futures[0].wait(1.0), "the stalled write completed"
            finally:
                qmp.resume(0, 2)
            req.result(30)
            assert _image_blocks(idma_bench_images, 0, 2, 200, 1) == data
        finally:
            buf.free()


def test_throttled_read_completes_after_unthrottle(vfio_bdfs: list[str], qmp: Qmp) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(2)
        data = random.randbytes(BLOCK)
        ns.write(300, data)
        first, second = c.alloc(BLOCK), c.alloc(BLOCK)
        try:
            qmp.throttle(0, 2, 1)
            try:
                # with 1 byte/s the first request passes, the following ones wait
                r1 = ns.read_async(300, 1, first)
                r2 = ns.read_async(300, 1, second)
                assert r1.futures[0].wait(30.0)
                assert not r2.futures[0].wait(1.0), "the throttled read completed"
            finally:
                qmp.unthrottle(0, 2)
            r1.result(0)
            r2.result(30)
            assert bytes(first) == bytes(second) == data
        finally:
            first.free()
            second.free()
        assert ns.read(300, 1, timeout=30) == data       # no limit left


def test_qmp_errors_name_the_command(qmp: Qmp, any_driver: None) -> None:
    from iommu_dma.testing.qmp import QmpError

    with pytest.raises(QmpError, match="block_set_io_throttle: .*") as err:
        qmp.command("block_set_io_throttle", id="nosuchdev", bps=0, bps_rd=0, bps_wr=0,
                    iops=0, iops_rd=0, iops_wr=0)
    assert err.value.error_class and err.value.desc
    assert "nvme1" in qmp.hmp("info qtree")
    with pytest.raises(ValueError, match="cannot be hot-unplugged"):
        qmp.device_del(0)
    with pytest.raises(ValueError, match="not over blkdebug"):
        qmp.stall(1, 1)


def test_hotplug_controller_sits_behind_a_root_port(idma_nvme_bdfs: list[str],
                                                    any_driver: None) -> None:
    bdf = idma_nvme_bdfs[1]
    assert int(bdf.split(":")[1], 16) >= 1                       # bus 01+, not pcie.0
    port = (PCI_DEVICES / bdf).resolve().parent
    assert (port / "class").read_text().startswith("0x0604")      # a PCI bridge: the root port
    group = (PCI_DEVICES / bdf / "iommu_group").resolve()
    # its own IOMMU group: the root port is not in it
    assert [d.name for d in (group / "devices").iterdir()] == [bdf]


def test_hotplug_controller_is_usable_from_user_space(vfio_bdfs: list[str],
                                                      idma_bench_images: Path) -> None:
    with Controller.open(vfio_bdfs[1]) as c:
        assert c.identify.sn == "IDMAF001"
        ns = c.namespace(1)
        data = random.randbytes(4 * BLOCK)
        ns.write(10, data)
        assert ns.read(10, 4) == data == _image_blocks(idma_bench_images, 1, 1, 10, 4)

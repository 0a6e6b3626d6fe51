"""The NVMe driver on the bench's emulated controllers: identify, data, errors, back-pressure.

Tests that only move data use the plugin's session controller `nvme0` (as a device-test suite
would); tests that close or count a controller of their own use `ctrl`.

Data written by our driver is checked through another path: the namespace's backing image
on the host (read from the guest) or the kernel nvme driver after unbinding.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from iommu_dma.container import Container
from iommu_dma.errors import ClosedError
from iommu_dma.memory import DmaAllocator
from iommu_dma.native import ffi, lib
from iommu_dma.nvme import sqe
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.ioqueue import NotMappedError
from iommu_dma.nvme.namespace import InactiveNamespaceError
from iommu_dma.nvme.perf import Workload, run
from iommu_dma.nvme.queue import Command
from iommu_dma.nvme.status import NvmeError
from iommu_dma.testing.bench import Bench, image_path
from tests.conftest import setup_vfio

pytestmark = pytest.mark.iommu_dma_vm



def image_bytes(images: Path, ctrl_index: int, nsid: int, offset: int, length: int) -> bytes:
    with open(image_path(images, ctrl_index, nsid), "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("idma_bench", ["default", "aw39", "two_ctrl"], indirect=True)
def test_identify_matches_bench(idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    for bdf, cfg in zip(vfio_bdfs, idma_bench.controllers):
        with Controller.open(bdf) as c:
            assert (c.identify.sn, c.identify.mn, c.identify.mdts) == (cfg.serial, cfg.model,
                                                                        cfg.mdts)
            assert c.identify.vid == 0x1B36 and c.identify.version == "1.4.0"
            assert c.max_transfer == 4096 << cfg.mdts
            assert c.max_io_queues == cfg.max_ioqpairs
            assert c.active_namespaces() == list(range(1, len(cfg.namespaces) + 1))
            for nsid, ns_cfg in enumerate(cfg.namespaces, start=1):
                ns = c.namespace(nsid)
                assert (ns.lba_size, ns.blocks, ns.capacity) == (ns_cfg.lba_size, ns_cfg.blocks,
                                                                 ns_cfg.size)


@pytest.mark.parametrize("idma_bench", ["default", "aw39"], indirect=True)
def test_write_read_sizes_and_offsets(idma_bench: Bench, nvme0: Controller,
                                      idma_bench_images: Path) -> None:
    """1 block up to several MDTS, from buffers starting at odd dword offsets in a page."""
    rng = random.Random(idma_bench.aw_bits)
    for nsid, ns_cfg in enumerate(idma_bench.controllers[0].namespaces, start=1):
        ns = nvme0.namespace(nsid)
        mdts_blocks = nvme0.max_transfer // ns.lba_size
        lba = 0
        for nlb in (1, 3, mdts_blocks, 3 * mdts_blocks + 1):
            for offset in (0, 520, 4092):
                size = nlb * ns.lba_size
                buf = nvme0.alloc(size + 8192)
                view = buf.view[offset:offset + size]
                data = rng.randbytes(size)
                view[:] = data
                ns.write_from(lba, view, nlb)
                view[:] = bytes(size)
                ns.read_into(lba, view, nlb)
                assert bytes(view) == data, f"nsid {nsid} nlb {nlb} offset {offset}"
                assert image_bytes(idma_bench_images, 0, nsid, lba * ns.lba_size, size) == data
                buf.free()
                lba += nlb
        assert lba * ns.lba_size <= ns_cfg.size


def test_sgl_and_prp_queues_move_the_same_data(nvme0: Controller,
                                               idma_bench_images: Path) -> None:
    """Data described by one SGL Data Block descriptor (QEMU reports SGLS bit 0) lands where
    PRPs put it: written through an SGL queue, read through a PRP queue and from the image,
    and the other way round, from dword-offset buffers of 1 block up to several MDTS."""
    assert nvme0.identify.sgls & 0x3
    sgl_q = nvme0.create_io_queue(16, sgl=True)
    prp_q = nvme0.create_io_queue(16)
    try:
        from iommu_dma.nvme.namespace import Namespace

        rng = random.Random(7)
        lba = 4096
        for nsid in (1, 2):
            via = {"sgl": Namespace(nvme0, nsid, sgl_q), "prp": Namespace(nvme0, nsid, prp_q)}
            lba_size = via["sgl"].lba_size
            for nlb in (1, 5, 3 * nvme0.max_transfer // lba_size + 1):
                for writer, reader in (("sgl", "prp"), ("prp", "sgl")):
                    size = nlb * lba_size
                    buf = nvme0.alloc(size + 8192)
                    view = buf.view[516:516 + size]
                    data = rng.randbytes(size)
                    view[:] = data
                    via[writer].write_from(lba, view, nlb)
                    view[:] = bytes(size)
                    via[reader].read_into(lba, view, nlb)
                    where = f"nsid {nsid} nlb {nlb} {writer} -> {reader}"
                    assert bytes(view) == data, where
                    assert image_bytes(idma_bench_images, 0, nsid, lba * lba_size, size) == data
                    buf.free()
                    lba += nlb
        assert sgl_q.qpair.info()["sgl"] == 1 and prp_q.qpair.info()["sgl"] == 0
    finally:
        nvme0.delete_io_queue(sgl_q.qid)
        nvme0.delete_io_queue(prp_q.qid)


@pytest.mark.iommu_dma_vm(bench="two_ctrl")
def test_two_controllers_share_one_container(idma_bench: Bench, vfio_bdfs: list[str],
                                             idma_bench_images: Path) -> None:
    with Container() as cont:
        cont.attach(*vfio_bdfs)
        assert len(cont.groups) == 2
        alloc = DmaAllocator(cont)
        ctrls = [Controller.open(b, container=cont, allocator=alloc) for b in vfio_bdfs]
        shared = alloc.alloc(64 * 1024)            # one buffer, DMA'd by both devices
        for i, c in enumerate(ctrls):
            ns = c.namespace(1)
            data = random.randbytes(len(shared))
            shared.view[:] = data
            nlb = len(data) // ns.lba_size
            ns.write_from(100, shared, nlb)
            assert ns.read(100, nlb) == data
            assert image_bytes(idma_bench_images, i, 1, 100 * ns.lba_size, len(data)) == data
        for c in ctrls:
            c.close()
        alloc.close()


def test_kernel_driver_reads_ours_and_we_read_the_kernels(idma_nvme_bdfs: list[str]) -> None:
    bdf = idma_nvme_bdfs[0]
    ours, theirs = random.randbytes(1 << 20), random.randbytes(1 << 20)
    setup_vfio("bind", bdf)
    with Controller.open(bdf) as c:
        c.namespace(1).write(256, ours)
    setup_vfio("unbind", bdf)
    ctrl_name = next((Path("/sys/bus/pci/devices") / bdf / "nvme").iterdir()).name
    fd = os.open(f"/dev/{ctrl_name}n1", os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        back = mmap.mmap(-1, len(ours))
        os.preadv(fd, [back], 256 * 4096)
        assert bytes(back) == ours
        back[:] = theirs
        os.pwritev(fd, [back], 512 * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    setup_vfio("bind", bdf)
    try:
        with Controller.open(bdf) as c:
            assert c.namespace(1).read(512, len(theirs) // 4096) == theirs
    finally:
        setup_vfio("unbind", bdf)


def test_errors_are_named_and_checked_before_submission(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    buf = ctrl.alloc(8192)
    with pytest.raises(NvmeError) as e:                  # the device's own verdict
        ns.command(sqe.read(1, ns.blocks, 1), buf, 4096)
    assert e.value.name == "LBA Out of Range" and e.value.dnr and not e.value.retryable
    assert "LBA Out of Range (SCT 0x0, SC 0x80, DNR)" in str(e.value)
    reads_before = ctrl.smart_log().host_read_commands
    checks = [
        (lambda: ns.read(ns.blocks - 1, 2), ValueError, "outside namespace 1"),
        (lambda: ns.read(0, 0), ValueError, "at least 1"),
        (lambda: ns.read_into(0, buf, 3), ValueError, "buffer holds 8192 bytes"),
        (lambda: ns.read_into(0, buf.view[2:4098], 1), ValueError,
         "not dword aligned"),
        (lambda: ns.write(0, b"x" * 100), ValueError, "not a positive multiple"),
        (lambda: ctrl.namespace(9), InactiveNamespaceError, "namespace 9 is not active"),
    ]
    for call, exc, text in checks:
        with pytest.raises(exc, match=text):
            call()
    assert ctrl.smart_log().host_read_commands == reads_before   # none reached the device
    ctrl.close()
    with pytest.raises(ClosedError, match="closed"):
        ns.read(0, 1)


def test_unmapped_buffer_never_reaches_the_device(nvme0: Controller) -> None:
    ns = nvme0.namespace(1)
    ns.write(7, b"\xab" * 4096)
    plain = bytearray(8192)                              # ordinary memory, not mapped
    reads_before = nvme0.smart_log().host_read_commands
    with pytest.raises(NotMappedError, match="not DMA-mapped"):
        ns.read_into(7, plain, 1)
    with pytest.raises(NotMappedError, match="not DMA-mapped, command not sent"):
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(plain)))
        ns.queue.submit(sqe.read(1, 7, 1), addr, 4096).result(5)
    assert plain == bytearray(8192)
    assert nvme0.smart_log().host_read_commands == reads_before
    assert ns.read(7, 1) == b"\xab" * 4096               # the queue still works


def test_queue_full_back_pressure_loses_nothing(nvme0: Controller) -> None:
    ns = nvme0.namespace(1)
    q = nvme0.create_io_queue(depth=4)                     # 3 commands in flight at most
    data = random.randbytes(64 * 4096)
    ns.write(1000, data)
    buf = nvme0.alloc(len(data))
    cmds = [Command(sqe.read(1, 1000 + i, 1), buf.addr + i * 4096, 4096, 0, f"read {i}")
            for i in range(64)]
    futures = q.submit_many(cmds, owner=buf)
    assert q.qpair.inflight == 3 and q.outstanding == 64
    for f in futures:
        f.result(10)
    assert bytes(buf) == data
    nvme0.delete_io_queue(q.qid)


def test_other_io_commands(nvme0: Controller, idma_bench_images: Path) -> None:
    ns = nvme0.namespace(1)
    data = random.randbytes(16 * 4096)
    ns.write(2000, data)
    assert ns.compare(2000, data)
    assert not ns.compare(2000, data[:-1] + bytes([data[-1] ^ 1]))
    ns.verify(2000, 16)
    ns.flush()
    ns.write_zeroes(2000, 4)
    assert ns.read(2000, 16) == bytes(4 * 4096) + data[4 * 4096:]
    ns.deallocate([(2008, 8)])
    assert ns.read(2008, 8) == bytes(8 * 4096)             # DLFEAT: deallocated reads zeroes
    assert image_bytes(idma_bench_images, 0, 1, 2000 * 4096, 16 * 4096) == (
        bytes(4 * 4096) + data[4 * 4096:8 * 4096] + bytes(8 * 4096))
    requests = [ns.read_async(2004 + i, 1, nvme0.alloc(4096)) for i in range(4)]
    for r in requests:
        r.result()


def test_admin_logs_and_features(idma_bench: Bench, nvme0: Controller) -> None:
    smart = nvme0.smart_log()
    nvme0.namespace(1).write(0, bytes(4096))
    assert nvme0.smart_log().host_write_commands == smart.host_write_commands + 1
    assert smart.temperature > 273 and smart.avail_spare <= 100
    fw = nvme0.firmware_log()
    assert fw.active_slot == 1 and fw.frs[0] == "1.0"     # QEMU 7.2 fills slot 1 with "1.0"
    assert isinstance(nvme0.error_log(), list)
    nq = nvme0.get_features(0x07)
    assert (nq & 0xFFFF) + 1 == idma_bench.controllers[0].max_ioqpairs
    with pytest.raises(NvmeError, match="Invalid Field in Command|Invalid Log Page"):
        nvme0.get_log_page(0x7F, 512)


def test_native_worker_writes_verifiable_pattern(nvme0: Controller) -> None:
    ns = nvme0.namespace(1)
    ns.write_zeroes(0, 1024)                       # earlier tests left data there
    w = Workload(rw="randrw", bs=8192, iodepth=8, runtime=0, ios=1500, verify=True,
                 size=4 << 20, seed=77)
    r = run(ns, w)
    assert (r.ios, r.errors, r.verify_failures) == (1500, 0, 0)
    assert r.lat_p50_ns <= r.lat_p99_ns <= r.lat_max_ns
    # a block the worker wrote holds its LBA-encoding pattern when read back another way
    area = ns.read(0, 1024)
    blocks = [area[i * 4096:(i + 1) * 4096] for i in range(1024)]
    written = [lba for lba, b in enumerate(blocks) if b != bytes(4096)]
    assert len(written) > 100, "the worker wrote little or nothing"
    expect = ffi.new("uint8_t[]", 4096)
    for lba in written:
        lib.idma_pattern_fill(expect, lba, 1, 4096, 77)
        assert blocks[lba] == bytes(expect), f"LBA {lba} does not hold its pattern"

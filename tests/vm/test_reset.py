"""Controller.reset() on the bench's emulated controller: under QD32 load from other threads,
by CC.EN and by function level reset; the same queue objects work afterwards and every request
either completed or failed with a named error. Data is checked through the backing image."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from iommu_dma import ClosedError, Controller, ControllerResetError, DmaBuffer
from iommu_dma.testing.bench import image_path

pytestmark = pytest.mark.iommu_dma_vm

LBA = 4096
FIRST, COUNT = 2048, 1024          # ns1 LBAs this file owns



def pattern(lba: int, generation: int) -> bytes:
    return (lba.to_bytes(4, "little") + generation.to_bytes(4, "little")) * (LBA // 8)


class Load:
    """One thread writing QD32 to its slice of LBAs, round after round, until stopped; a
    request that a reset aborted is written again. Records what ended each request."""

    def __init__(self, ctrl: Controller, first: int, count: int) -> None:
        self.ns = ctrl.namespace(1)
        self.first, self.count = first, count
        self.bufs: list[DmaBuffer] = [ctrl.alloc(LBA) for _ in range(32)]
        self.stop = threading.Event()
        self.done = 0
        self.aborted = 0
        self.other: list[BaseException] = []
        self.generation = 0
        self.latest: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.generation += 1
                for base in range(self.first, self.first + self.count, 32):
                    self._burst(base)
                    if self.stop.is_set():
                        return
        except BaseException as e:          # reported by the test
            self.other.append(e)

    def _burst(self, base: int) -> None:
        todo = list(range(base, base + 32))
        while todo:
            reqs = []
            for i, lba in enumerate(todo):
                self.bufs[i].view[:] = pattern(lba, self.generation)
                reqs.append((lba, self.ns.write_async(lba, self.bufs[i], 1)))
            todo = []
            for lba, req in reqs:
                try:
                    req.result(60)
                    self.done += 1
                    self.latest[lba] = self.generation
                except ControllerResetError:
                    self.aborted += 1
                    todo.append(lba)        # its content is unknown: write it again


def check_image(images: Path, latest: dict[int, int]) -> None:
    with open(image_path(images, 0, 1), "rb") as f:
        for lba, gen in latest.items():
            f.seek(lba * LBA)
            assert f.read(LBA) == pattern(lba, gen), f"LBA {lba} generation {gen}"


def test_reset_under_qd32_load_from_another_thread(ctrl: Controller,
                                                     idma_bench_images: Path) -> None:
    loads = [Load(ctrl, FIRST, COUNT // 2), Load(ctrl, FIRST + COUNT // 2, COUNT // 2)]
    queue = ctrl.namespace(1).queue
    for ld in loads:
        ld.thread.start()
    times = []
    try:
        for _ in range(3):
            while sum(ld.done for ld in loads) < 200 * (len(times) + 1):
                assert all(ld.thread.is_alive() for ld in loads), [ld.other for ld in loads]
                time.sleep(0.05)
            t0 = time.monotonic()
            ctrl.reset()
            times.append(time.monotonic() - t0)
    finally:
        for ld in loads:
            ld.stop.set()
            ld.thread.join(120)
    assert not any(ld.thread.is_alive() for ld in loads)
    assert [e for ld in loads for e in ld.other] == []
    assert ctrl.resets == 3
    assert ctrl.namespace(1).queue is queue            # same objects after the reset
    assert ctrl.dbbuf is not None                       # shadow doorbells on again
    print(f"3 resets under QD32 load: {', '.join(f'{t * 1000:.0f} ms' for t in times)}; "
          f"{sum(ld.done for ld in loads)} writes completed, "
          f"{sum(ld.aborted for ld in loads)} aborted by a reset and written again")
    latest = {k: v for ld in loads for k, v in ld.latest.items()}
    assert len(latest) >= 200
    check_image(idma_bench_images, latest)
    ns = ctrl.namespace(1)
    for lba in list(latest)[:64]:                       # and through our driver
        assert ns.read(lba, 1) == pattern(lba, latest[lba])
    assert ctrl.allocator.quarantined_bytes == 0        # every buffer came back


def test_function_level_reset_keeps_queues_working(ctrl: Controller,
                                                   idma_bench_images: Path) -> None:
    assert ctrl.pci.can_reset
    ns = ctrl.namespace(1)
    ns.write(FIRST, pattern(FIRST, 1))
    t0 = time.monotonic()
    ctrl.reset(function_level=True)
    took = time.monotonic() - t0
    print(f"function level reset and restart: {took * 1000:.0f} ms")
    assert ns.read(FIRST, 1) == pattern(FIRST, 1)
    ns.write(FIRST + 1, pattern(FIRST + 1, 2))
    check_image(idma_bench_images, {FIRST: 1, FIRST + 1: 2})
    assert ctrl.identify_namespace(1).nsze == ns.blocks
    q = ctrl.create_io_queue(64)                        # new queues after the reset too
    ctrl.delete_io_queue(q.qid)


def test_reset_fails_only_what_was_in_flight(ctrl: Controller) -> None:
    """Requests in flight at the reset end with ControllerResetError, none hangs; requests
    submitted after it complete."""
    ns = ctrl.namespace(1)
    bufs = [ctrl.alloc(8 * LBA) for _ in range(32)]
    reqs = [ns.read_async(FIRST + 8 * i, 8, b) for i, b in enumerate(bufs)]
    ctrl.reset()
    outcomes = {"ok": 0, "reset": 0}
    for r in reqs:
        try:
            r.result(30)
            outcomes["ok"] += 1
        except ControllerResetError as e:
            assert "aborted by a controller reset" in str(e) and ctrl.bdf in str(e)
            outcomes["reset"] += 1
    assert sum(outcomes.values()) == 32
    print(f"requests in flight at the reset: {outcomes}")
    assert ns.read(FIRST, 8) is not None
    assert ctrl.allocator.quarantined_bytes == 0


def test_reset_after_close_is_refused(vfio_bdfs: list[str]) -> None:
    c = Controller.open(vfio_bdfs[0])
    c.close()
    with pytest.raises(ClosedError):
        c.reset()

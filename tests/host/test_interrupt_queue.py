"""The Python side of interrupt-driven queues against the simulated controller, which signals
an eventfd after each completion as VFIO does for an MSI-X vector: threads sharing a queue
(one asleep on the interrupt, the others on the queue's condition), waits that sleep, close
waking every waiter, request done-callbacks, and an asyncio loop reaping the queue."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import pytest

from iommu_dma.errors import ClosedError
from iommu_dma.memory import DmaAllocator
from iommu_dma.nvme import aio, sqe
from iommu_dma.nvme.interrupts import QueueInterrupt, check_mode
from iommu_dma.nvme.ioqueue import IoQueue
from iommu_dma.nvme.namespace import Request
from tests.host.sim_nvme import BAR_SIZE, LBA, SimController, SimIommu, attach_queue


class IrqBench:
    def __init__(self, mode: str = "interrupt") -> None:
        self.iommu = SimIommu()
        self.mem = DmaAllocator(self.iommu, window_size=1 << 30, hugepages=False)
        self.dev = SimController().start()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        irq = QueueInterrupt(1, self.efd, mode, check_mode(mode, None))  # type: ignore[arg-type]
        self.queue = IoQueue(1, 32, self.mem, self.dev.bar_addr, BAR_SIZE, dstrd=0,
                             page_size=4096, max_transfer=1 << 20,
                             maptable=self.iommu.maptable, irq=irq)
        attach_queue(self.dev, self.queue, self.efd)

    def read(self, lba: int, buf: object, addr: int) -> Request:
        return Request([self.queue.submit(sqe.read(1, lba, 1), addr, LBA, owner=buf)])


@pytest.fixture(params=["interrupt", "hybrid"])
def bench(request: pytest.FixtureRequest) -> Iterator[IrqBench]:
    b = IrqBench(request.param)
    yield b
    b.dev.stop()
    os.close(b.efd)


def test_check_mode_names_the_choices() -> None:
    assert check_mode("poll", None) == 0 and check_mode("interrupt", None) == 0
    assert 0 < check_mode("hybrid", None) < 0.001 and check_mode("hybrid", 0.01) == 0.01
    with pytest.raises(ValueError, match="poll, interrupt, hybrid"):
        check_mode("irq", None)
    with pytest.raises(ValueError, match="hybrid wait mode only"):
        check_mode("interrupt", 0.1)
    with pytest.raises(ValueError, match=r"within \(0, 1\]"):
        check_mode("hybrid", 5)


def test_threads_sharing_an_interrupt_queue_all_complete(bench: IrqBench) -> None:
    for lba in range(64):
        bench.dev.media[lba * LBA:(lba + 1) * LBA] = bytes([lba]) * LBA
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        buf = bench.mem.alloc(LBA)
        try:
            for i in range(100):
                lba = (t * 16 + i) % 64
                bench.read(lba, buf, buf.addr).result(10)
                assert bytes(buf) == bytes([lba]) * LBA
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert bench.queue.outstanding == 0


def test_a_waiter_sleeps_while_the_command_is_held(bench: IrqBench) -> None:
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    req = bench.read(0, buf, buf.addr)
    threading.Timer(0.5, bench.dev.release_held).start()
    cpu, wall = time.thread_time(), time.monotonic()
    req.result(10)
    cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    assert wall >= 0.4 and cpu < 0.5 * wall, (cpu, wall)


def test_close_wakes_every_waiter_and_closes_the_eventfd(bench: IrqBench) -> None:
    bench.dev.hold_next = 3
    outcome: list[str] = []

    def waiter() -> None:
        buf = bench.mem.alloc(LBA)
        try:
            bench.read(0, buf, buf.addr).result(30)
        except ClosedError:
            outcome.append("closed")

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(0.3)
    bench.queue.close(ClosedError("I/O queue 1"), device_quiet=True)
    for th in threads:
        th.join(5)
    assert outcome == ["closed"] * 3
    irq = bench.queue.irq
    assert irq is not None and irq.closed
    with pytest.raises(OSError):
        os.fstat(irq.fd)


def test_request_callbacks_run_once_all_pieces_end(bench: IrqBench) -> None:
    buf = bench.mem.alloc(4 * LBA)
    q = bench.queue
    bench.dev.hold_next = 1
    req = Request([q.submit(sqe.read(1, k, 1), buf.addr + k * LBA, LBA, owner=buf)
                   for k in range(4)], value=buf)
    calls: list[object] = []
    req.add_done_callback(lambda r: calls.append(r.result()))
    deadline = time.monotonic() + 5
    while q.outstanding > 1 and time.monotonic() < deadline:
        q.process(0.01)
    assert calls == [] and not req.done()           # one piece is still held
    bench.dev.release_held()
    while not req.done():
        q.process(0.01)
    assert calls == [buf]
    req.add_done_callback(lambda r: calls.append("late"))     # already done: runs at once
    assert calls == [buf, "late"] and req.exception() is None


def test_asyncio_loop_reaps_the_queue(bench: IrqBench) -> None:
    for lba in range(16):
        bench.dev.media[lba * LBA:(lba + 1) * LBA] = bytes([0x40 + lba]) * LBA

    async def main() -> list[bytes]:
        aio.LoopReaper(bench.queue, asyncio.get_running_loop(), lambda q, p: None)
        bufs = [bench.mem.alloc(LBA) for _ in range(16)]
        reqs = [bench.read(k, b, b.addr) for k, b in enumerate(bufs)]
        assert bench.queue.outstanding == 16
        await asyncio.gather(*reqs)
        return [bytes(b) for b in bufs]

    assert asyncio.run(main()) == [bytes([0x40 + k]) * LBA for k in range(16)]

"""Ownership, close and threads in the Python queue layer, against a simulated controller.

The real DmaAllocator and IoQueue run over a simulated IOMMU and controller (tests/host/
sim_nvme.py), so failure paths can be forced: commands held back by the device (timeouts),
Write Faults on one piece of a split transfer, Ctrl-C, close under load, thread churn.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from iommu_dma import ClosedError, NvmeError, NvmeTimeoutError
from iommu_dma.memory import BufferFreedError, DmaAllocator
from iommu_dma.nvme import sqe
from iommu_dma.nvme.ioqueue import IoQueue
from iommu_dma.nvme.namespace import Request
from iommu_dma.nvme.queue import Command
from tests.churn import churn
from tests.host.sim_nvme import BAR_SIZE, LBA, SimController, SimIommu, attach_queue


class Bench:
    def __init__(self, depth: int = 16) -> None:
        self.iommu = SimIommu()
        self.mem = DmaAllocator(self.iommu, window_size=1 << 30, hugepages=False)
        self.dev = SimController().start()
        self.queue = self.new_queue(1, depth)

    def new_queue(self, qid: int, depth: int) -> IoQueue:
        q = IoQueue(qid, depth, self.mem, self.dev.bar_addr, BAR_SIZE, dstrd=0, page_size=4096,
                    max_transfer=1 << 20, maptable=self.iommu.maptable)
        attach_queue(self.dev, q)
        return q

    def write(self, lba: int, data: bytes, owner: object, addr: int) -> Request:
        n = len(data) // LBA
        return Request([self.queue.submit(sqe.write(1, lba, n), addr, len(data),
                                          owner=owner)])


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.dev.stop()


def test_timed_out_buffer_is_quarantined_until_reaped(bench: Bench) -> None:
    buf = bench.mem.alloc(8 * LBA)
    bench.dev.hold_next = 1                           # the device sits on the next command
    fut = bench.queue.submit(sqe.read(1, 0, 8), buf.addr, 8 * LBA, owner=buf)
    with pytest.raises(NvmeTimeoutError, match="still owned by the device"):
        fut.result(0.05)
    buf.free()
    assert bench.mem.quarantined_bytes == 8 * LBA
    again = bench.mem.alloc(8 * LBA)                  # before the fix: the same address
    assert again.addr != buf.addr
    bench.dev.release_held()                          # the completion arrives late
    while bench.queue.outstanding:
        bench.queue.process(0.01)
    assert fut.done() and bench.mem.quarantined_bytes == 0
    assert bench.mem.alloc(8 * LBA).addr == buf.addr  # reusable only now


def test_a_view_of_a_buffer_leases_the_buffer(bench: Bench) -> None:
    """Data given as a slice of buf.view: freeing buf while the device holds the command
    quarantines buf, as for buf itself; a view of a freed buffer is refused."""
    buf = bench.mem.alloc(4 * LBA)
    view = buf.view[LBA:3 * LBA]
    bench.dev.hold_next = 1
    fut = bench.queue.submit(sqe.read(1, 0, 2), buf.addr + LBA, 2 * LBA, owner=view)
    buf.free()
    assert bench.mem.quarantined_bytes == 4 * LBA
    bench.dev.release_held()
    assert fut.wait(5)
    del fut
    assert bench.mem.quarantined_bytes == 0
    with pytest.raises(BufferFreedError):
        bench.queue.submit(sqe.read(1, 0, 2), buf.addr + LBA, 2 * LBA, owner=view)


def test_failed_piece_does_not_release_pieces_in_flight(bench: Bench) -> None:
    """Finding 1: piece 0 of an 8 KiB write fails while piece 1 is held; the next write must
    not reuse the buffer, and LBAs 8-15 must get the first write's data."""
    first = bytes([1]) * (2 * LBA)
    buf = bench.mem.alloc(2 * LBA)
    buf.view[:] = first
    bench.dev.fail_lbas = {0}
    bench.dev.hold_next = 0
    piece0 = bench.queue.submit(sqe.write(1, 0, 1), buf.addr, LBA, owner=buf)
    assert piece0.wait(5)
    bench.dev.hold_next = 1
    piece1 = bench.queue.submit(sqe.write(1, 8, 1), buf.addr + LBA, LBA, owner=buf)
    req = Request([piece0, piece1])
    with pytest.raises(NvmeTimeoutError):             # piece 1 is held: no early raise
        req.result(0.05)
    assert piece0.done() and isinstance(piece0.exception(), NvmeError)
    buf.free()
    second = bench.mem.alloc(2 * LBA)
    assert second.addr != buf.addr
    second.view[:] = bytes([2]) * (2 * LBA)
    bench.dev.release_held()
    with pytest.raises(NvmeError, match="Write Fault"):
        req.result(5)
    assert bytes(bench.dev.media[8 * LBA:9 * LBA]) == first[LBA:]


def test_freed_buffer_is_refused(bench: Bench) -> None:
    buf = bench.mem.alloc(LBA)
    buf.free()
    with pytest.raises(BufferFreedError):
        bench.queue.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf)
    assert bench.queue.outstanding == 0 and bench.dev.commands == 0


def test_keyboard_interrupt_during_processing_keeps_state(bench: Bench) -> None:
    """Ctrl-C landing anywhere in result() never loses a command the device holds."""
    import gc
    import signal

    gc.collect()      # a finalizer run by the collector would swallow a KeyboardInterrupt
    gc.disable()

    buf = bench.mem.alloc(64 * LBA)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, stop)
    try:
        for i in range(200):
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.0001 + 0.00002 * (i % 13))
                while True:
                    futs = bench.queue.submit_many(
                        [Command(sqe.read(1, k * 4, 4), buf.addr + k * 4 * LBA, 4 * LBA)
                         for k in range(16)], owner=buf)
                    Request(futs).result(5)
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            # every command the device may still run holds a lease on the buffer
            q = bench.queue
            pending = [*q._inflight.values(), *q._backlog]
            assert all(p.lease is not None and p.lease.owner is buf for p in pending)
            assert buf.device_owned or not pending
            while q.outstanding:
                q.process(0.01)
            assert q.qpair.inflight == 0 and not buf.device_owned
    finally:
        signal.signal(signal.SIGALRM, old)
        gc.enable()


def test_close_fails_pending_and_refuses_use(bench: Bench) -> None:
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    fut = bench.queue.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf)
    bench.queue.close(ClosedError("controller X"), device_quiet=True)
    with pytest.raises(ClosedError):
        fut.result(1)
    for call in (lambda: bench.queue.process(0.01), lambda: bench.queue.submit(sqe.flush(1)),
                 lambda: bench.queue.qpair.poll()):
        with pytest.raises(ClosedError):
            call()
    assert not buf.device_owned


def test_close_without_quiet_device_keeps_memory_quarantined(bench: Bench) -> None:
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    bench.queue.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf)
    bench.queue.close(ClosedError("controller X"), device_quiet=False)
    buf.free()
    assert bench.mem.quarantined_bytes == LBA          # the device might still write it


def test_threads_share_queues_while_others_churn_memory(bench: Bench) -> None:
    """Finding 3: six threads on two shared queues (three each) while two more threads
    allocate, free and register: no KeyError, no lost tracker, data intact, nothing leaked."""
    queues = [bench.queue, bench.new_queue(2, 8)]
    errors: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        q = queues[n % 2]
        try:
            for _ in range(40):
                lba = n * 512 + rng.randrange(0, 500)
                nlb = rng.randint(1, 8)
                data = rng.randbytes(nlb * LBA)
                with bench.mem.alloc(len(data)) as buf:
                    buf.view[:] = data
                    q.submit(sqe.write(1, lba, nlb), buf.addr, len(data), owner=buf).result(120)
                with bench.mem.alloc(len(data)) as buf:
                    q.submit(sqe.read(1, lba, nlb), buf.addr, len(data), owner=buf).result(120)
                    if bytes(buf) != data:
                        errors.append(f"thread {n}: LBA {lba} differs")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {n}: {e!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    errors += churn(bench.mem, threads=2, rounds=200)
    for t in threads:
        t.join(600)
    assert not errors
    for q in queues:
        assert q.outstanding == 0 and q.qpair.inflight == 0 and q.unknown_completions == 0
    assert bench.mem.quarantined_bytes == 0


def test_threads_allocate_register_and_free_without_sharing_pages(bench: Bench) -> None:
    assert churn(bench.mem) == []

"""Waiting for completions on the bench: polled, interrupt-driven and hybrid queues, done
callbacks, asyncio on a loop's own queue, and per-thread queues. Data written is checked in
the namespace's backing image; the interrupts are counted by the guest kernel
(/proc/interrupts, vfio-msix lines)."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest

from iommu_dma import ClosedError, Controller, Namespace, NvmeError, Request
from iommu_dma.nvme.interrupts import WAIT_MODES
from iommu_dma.testing.bench import image_path

pytestmark = pytest.mark.iommu_dma_vm

LBA = 4096
FIRST = 6144                   # ns1 LBAs from here on are this file's



def pattern(lba: int, tag: int) -> bytes:
    return (lba.to_bytes(4, "little") + tag.to_bytes(4, "little")) * (LBA // 8)


def image_blocks(images: Path, lba: int, count: int) -> bytes:
    with open(image_path(images, 0, 1), "rb") as f:
        f.seek(lba * LBA)
        return f.read(count * LBA)


def msix_counts(bdf: str) -> dict[int, int]:
    """vfio-msix[vector] interrupt counts of bdf, summed over CPUs (/proc/interrupts)."""
    out: dict[int, int] = {}
    for line in Path("/proc/interrupts").read_text().splitlines():
        m = re.search(rf"vfio-msix\[(\d+)\]\({re.escape(bdf)}\)", line)
        if m:
            fields = line.split(":", 1)[1].split()
            out[int(m.group(1))] = sum(int(f) for f in fields if f.isdigit())
    return out


@pytest.mark.parametrize("mode", WAIT_MODES)
def test_each_wait_mode_moves_data(ctrl: Controller, idma_bench_images: Path,
                                   mode: str) -> None:
    """A queue in each mode writes 64 blocks at QD16 and reads them back; the image holds
    them. Interrupt queues get IEN and a vector of their own, which the kernel counts."""
    q = ctrl.create_io_queue(64, wait=mode)  # type: ignore[arg-type]
    ns = Namespace(ctrl, 1, queue=q)
    base = FIRST + 64 * WAIT_MODES.index(mode)
    before = msix_counts(ctrl.bdf)
    bufs = [ctrl.alloc(4 * LBA) for _ in range(16)]
    for i, b in enumerate(bufs):
        b.view[:] = b"".join(pattern(base + 4 * i + k, 7) for k in range(4))
    reqs = [ns.write_async(base + 4 * i, b) for i, b in enumerate(bufs)]
    for r in reqs:
        r.result()
    back = ctrl.alloc(64 * LBA)
    assert ns.read_async(base, 64, back).result() is back
    expect = b"".join(pattern(base + k, 7) for k in range(64))
    assert bytes(back) == expect
    assert image_blocks(idma_bench_images, base, 64) == expect
    after = msix_counts(ctrl.bdf)
    if mode == "poll":
        assert q.irq is None
    else:
        assert q.irq is not None and q.irq.vector >= 1
        assert after.get(q.irq.vector, 0) > before.get(q.irq.vector, 0), after


def test_done_callbacks_chain_commands(ctrl: Controller) -> None:
    """A callback may submit the next command (it runs after the queue lock is released):
    20 reads, each started by the previous one's callback, on an interrupt queue."""
    q = ctrl.create_io_queue(8, wait="interrupt")
    ns = Namespace(ctrl, 1, queue=q)
    buf = ctrl.alloc(LBA)
    seen: list[int] = []
    finished = threading.Event()

    def next_read(req: Request | None) -> None:
        if req is not None:
            assert req.exception() is None and req.result() is buf
            seen.append(threading.get_ident())
        if len(seen) == 20:
            finished.set()
        else:
            ns.read_async(FIRST + len(seen), 1, buf).add_done_callback(next_read)

    next_read(None)
    while not finished.is_set():
        q.process(0.05)                 # this thread reaps; the callbacks run here
    assert len(seen) == 20 and set(seen) == {threading.get_ident()}


def test_asyncio_gather_runs_at_qd32_on_the_loops_queue(ctrl: Controller,
                                                        idma_bench_images: Path) -> None:
    """asyncio.gather of 32 reads: all 32 are in flight at once on the loop's own
    interrupt queue, reaped by the loop with no other thread; the data is the image's."""
    ns = ctrl.namespace(1)
    base = FIRST + 256
    ns.write(base, b"".join(pattern(base + k, 9) for k in range(32)))
    threads = threading.active_count()

    async def main() -> tuple[int, list[bytes], int]:
        bufs = [ctrl.alloc(LBA) for _ in range(32)]
        tasks = [asyncio.ensure_future(ns.read_async(base + k, 1, bufs[k]))
                 for k in range(32)]
        await asyncio.sleep(0)          # every task has submitted; nothing reaped yet
        q = ctrl.queue_for_caller()
        depth = q.outstanding
        got = await asyncio.gather(*tasks)
        assert all(g is b for g, b in zip(got, bufs))
        return depth, [bytes(b) for b in bufs], q.qid

    depth, data, qid = asyncio.run(main())
    assert depth == 32
    assert threading.active_count() == threads          # no polling thread was started
    assert data == [image_blocks(idma_bench_images, base + k, 1) for k in range(32)]
    assert qid != ctrl.default_io_queue().qid


def test_asyncio_errors_and_cancellation(ctrl: Controller) -> None:
    """A failed command raises the named NvmeError in the awaiting task; cancelling a task
    leaves the buffer with the device until the command has completed."""
    ns = ctrl.namespace(1)
    base = FIRST + 320
    ns.write(base, pattern(base, 1))

    async def main() -> None:
        buf = ctrl.alloc(LBA)
        buf.view[:] = pattern(base, 2)              # differs from the block
        with pytest.raises(NvmeError, match="Compare Failure"):
            await ns.compare_async(base, buf)
        with pytest.raises(ValueError, match="outside namespace"):
            await ns.read_async(ns.blocks, 1, buf)
        other = ctrl.alloc(LBA)
        task = asyncio.ensure_future(ns.read_async(base, 1, other))
        await asyncio.sleep(0)
        task.cancel()
        assert other.device_owned                   # still the device's
        q = ctrl.queue_for_caller()
        while q.outstanding:
            await asyncio.sleep(0.001)
        assert not other.device_owned and bytes(other) == pattern(base, 1)
        await ns.write_zeroes_async(base, 1)
        await ns.flush_async()
        assert (await ns.read_async(base, 1, other)) is other and bytes(other) == bytes(LBA)

    asyncio.run(main())


def test_per_thread_queues(ctrl: Controller, idma_bench_images: Path) -> None:
    """With per_thread_queues each thread gets its own queue pair without naming one; the
    queues of finished threads are deleted when a new one is made."""
    ctrl.per_thread_queues = True
    ctrl.wait = "interrupt"
    ns = ctrl.namespace(1)
    base = FIRST + 384
    qids: dict[int, int] = {}
    errors: list[BaseException] = []
    all_running = threading.Barrier(4, timeout=30)

    def worker(t: int) -> None:
        try:
            for k in range(8):
                lba = base + 8 * t + k
                ns.write(lba, pattern(lba, t))
                assert ns.read(lba, 1) == pattern(lba, t)
            qids[t] = ns.queue.qid
            all_running.wait()          # no thread ends (freeing its queue) before all ran
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(set(qids.values())) == 4
    assert set(qids.values()) <= set(ctrl.io_queues)
    for t in range(4):
        expect = b"".join(pattern(base + 8 * t + k, t) for k in range(8))
        assert image_blocks(idma_bench_images, base + 8 * t, 8) == expect
    mine = ctrl.thread_queue()                          # reclaims the ended threads' queues
    assert not set(qids.values()) & (set(ctrl.io_queues) - {mine.qid})


@pytest.mark.parametrize("flr", [False, True], ids=["cc_en", "flr"])
def test_interrupt_queue_survives_reset(ctrl: Controller, flr: bool) -> None:
    """After a controller reset (CC.EN or FLR) the interrupt queue is re-created with its
    vector and still wakes its waiter."""
    q = ctrl.create_io_queue(16, wait="interrupt")
    ns = Namespace(ctrl, 1, queue=q)
    base = FIRST + 448
    ns.write(base, pattern(base, 3))
    before = msix_counts(ctrl.bdf).get(q.irq.vector if q.irq else -1, 0)
    ctrl.reset(function_level=flr)
    assert ns.read(base, 1) == pattern(base, 3)
    # A completion reaped before the device looks at the CQ head raises no interrupt (the
    # head already equals the tail), so count over batches that outlast the first poll.
    bufs = [ctrl.alloc(LBA) for _ in range(15)]
    for _ in range(4):
        for r in [ns.read_async(base, 1, b) for b in bufs]:
            r.result()
    assert all(bytes(b) == pattern(base, 3) for b in bufs)
    assert msix_counts(ctrl.bdf).get(q.irq.vector if q.irq else -1, 0) > before


def test_close_wakes_sleeping_waiters(vfio_bdfs: list[str]) -> None:
    """close() from another thread while threads share an interrupt queue: every request
    ends (completed or ClosedError) and each waiting thread returns."""
    ctrl = Controller.open(vfio_bdfs[0], wait="interrupt")
    ns = ctrl.namespace(1)
    outcome: list[str] = []

    def reader() -> None:
        buf = ctrl.alloc(LBA) if not ctrl.closed else None
        try:
            while True:
                assert buf is not None
                ns.read_into(FIRST, buf, 1)
        except ClosedError:
            outcome.append("closed")
        except BaseException as e:      # reported below
            outcome.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for th in threads:
        th.start()
    threading.Event().wait(0.5)
    ctrl.close()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads)
    assert outcome == ["closed"] * 3, outcome

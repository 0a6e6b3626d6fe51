"""The native I/O worker's interrupt wait (cfg.irq_fd) against the simulated controller, which
signals an eventfd after each completion as VFIO does for an MSI-X vector: the worker sleeps
on it instead of spinning, still notices the I/O timeout and a queue being closed while
asleep, falls back to polling on a bad descriptor, and perf runs jobs in each wait mode."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from iommu_dma.errors import ClosedError
from iommu_dma.memory import DmaAllocator
from iommu_dma.nvme import perf
from iommu_dma.nvme.interrupts import QueueInterrupt, check_mode
from iommu_dma.nvme.ioqueue import IoQueue
from iommu_dma.nvme.queue import ETIMEDOUT, WorkerConfig, WorkerResult, run_worker
from tests.host.sim_nvme import BAR_SIZE, LBA, SimController, SimIommu, attach_queue

BLOCKS = 1024


class SimCtrl:
    """What PerfRun uses of a Controller: queues of each wait mode on the simulated one."""

    def __init__(self) -> None:
        self.dev = SimController(BLOCKS).start()
        self.iommu = SimIommu()
        self.mem = DmaAllocator(self.iommu, window_size=1 << 30, hugepages=False)
        self.bdf, self.cap, self.max_transfer = "0000:00:04.0", SimpleNamespace(mqes=64), 1 << 20
        self.max_io_queues, self.next_qid = 4, 1
        self.io_queues: dict[int, IoQueue] = {}
        self.eventfds: list[int] = []
        self.created: list[IoQueue] = []

    def create_io_queue(self, depth: int, wait: str = "poll") -> IoQueue:
        irq, efd = None, None
        if wait != "poll":
            efd = os.eventfd(0, os.EFD_NONBLOCK)        # VFIO's, in the real controller
            self.eventfds.append(efd)
            irq = QueueInterrupt(self.next_qid, efd, wait,  # type: ignore[arg-type]
                                 check_mode(wait, None))
        q = IoQueue(self.next_qid, depth, self.mem, self.dev.bar_addr, BAR_SIZE, dstrd=0,
                    page_size=4096, max_transfer=self.max_transfer,
                    maptable=self.iommu.maptable, irq=irq)
        self.next_qid += 1                  # the simulator serves a qid for good: a new one
        attach_queue(self.dev, q, efd)
        self.io_queues[q.qid] = q
        self.created.append(q)
        return q

    def delete_io_queue(self, qid: int) -> None:
        self.io_queues.pop(qid).close(ClosedError(f"I/O queue {qid} deleted"), device_quiet=True)

    def alloc(self, size: int) -> Any:
        return self.mem.alloc(size)

    def close(self) -> None:
        self.dev.stop()
        for q in list(self.io_queues):
            self.delete_io_queue(q)
        for fd in self.eventfds:
            os.close(fd)


class SimNs:
    def __init__(self, ctrl: SimCtrl) -> None:
        self.ctrl, self.nsid, self.lba_size, self.blocks = ctrl, 1, LBA, BLOCKS
        self.capacity = BLOCKS * LBA
        self.ms = 0                     # no metadata


@pytest.fixture
def ctrl() -> Iterator[SimCtrl]:
    c = SimCtrl()
    yield c
    c.close()


def config(q: IoQueue, buf: Any, qd: int, **kw: Any) -> WorkerConfig:
    irq = q.irq
    return WorkerConfig(nsid=1, lba_size=LBA, lba_count=BLOCKS, buf_addr=buf.addr, qd=qd,
                        irq_fd=irq.fd if irq is not None else -1,
                        idle_spin=irq.spin if irq is not None else 0.0, **kw)


def timed(fn: Any) -> tuple[WorkerResult, float, float]:
    """fn() and the (CPU, wall) seconds of this thread, where the worker runs."""
    cpu, wall = time.thread_time(), time.monotonic()
    res = fn()
    return res, time.thread_time() - cpu, time.monotonic() - wall


@pytest.mark.parametrize("mode", ["interrupt", "hybrid"])
@pytest.mark.parametrize("qd", [1, 4])
def test_worker_moves_verified_data_sleeping_on_the_interrupt(ctrl: SimCtrl, mode: str,
                                                              qd: int) -> None:
    q = ctrl.create_io_queue(qd + 1, mode)
    buf = ctrl.alloc(qd * LBA)
    cfg = config(q, buf, qd, read_pct=0, verify=True, io_count=BLOCKS // 4, seed=5)
    res = run_worker(q.qpair, cfg)                      # sequential: LBAs 0..255 written
    assert (res.rc, res.writes, res.errors) == (0, BLOCKS // 4, 0)
    cfg.read_pct, cfg.random, cfg.io_count = 100, True, 300
    cfg.lba_count, cfg.verify_all = BLOCKS // 4, True
    res, cpu, wall = timed(lambda: run_worker(q.qpair, cfg))
    assert (res.rc, res.reads, res.errors, res.verify_failures) == (0, 300, 0, 0)
    assert q.qpair.inflight == 0
    if mode == "interrupt" and qd == 1:
        # the simulated device takes ~0.1 ms or more per command, in Python: spinning through
        # it would use the whole wall time
        assert cpu < 0.5 * wall, (cpu, wall)


@pytest.mark.parametrize("mode", ["interrupt", "hybrid"])
def test_worker_sleeps_while_nothing_completes_and_times_out(ctrl: SimCtrl, mode: str) -> None:
    """A held command: the worker sleeps in 10 ms slices (the polled worker's spin and
    nanosleep steps cost ~30% of the wait here), and still gives up after io_timeout."""
    q = ctrl.create_io_queue(2, mode)
    buf = ctrl.alloc(LBA)
    ctrl.dev.hold_next = 1
    res, cpu, wall = timed(lambda: run_worker(q.qpair, config(q, buf, 1, io_count=5,
                                                              io_timeout=0.3)))
    assert res.rc == ETIMEDOUT and res.timed_out and res.ios == 0
    assert 0.25 <= wall < 5 and cpu < 0.1 * wall, (cpu, wall)
    ctrl.dev.release_held()


def test_closing_the_queue_ends_a_sleeping_worker(ctrl: SimCtrl) -> None:
    q = ctrl.create_io_queue(3, "interrupt")
    buf = ctrl.alloc(2 * LBA)
    ctrl.dev.hold_next = 2
    out: list[BaseException] = []

    def job() -> None:
        try:
            run_worker(q.qpair, config(q, buf, 2, io_count=10))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=job)
    t.start()
    time.sleep(0.2)                                     # asleep on the interrupt by now
    start = time.monotonic()
    ctrl.delete_io_queue(q.qid)                         # quiesce waits for the worker
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 2
    assert len(out) == 1 and isinstance(out[0], ClosedError), out


def test_a_bad_descriptor_falls_back_to_polling(ctrl: SimCtrl) -> None:
    q = ctrl.create_io_queue(5)
    buf = ctrl.alloc(4 * LBA)
    cfg = config(q, buf, 4, io_count=200)
    cfg.irq_fd = 1 << 30                                # no such descriptor: EBADF
    res = run_worker(q.qpair, cfg)
    assert (res.rc, res.ios, res.errors) == (0, 200, 0)


@pytest.mark.parametrize("wait", ["poll", "interrupt", "hybrid"])
def test_perf_runs_jobs_in_each_wait_mode(ctrl: SimCtrl, wait: str) -> None:
    w = perf.Workload(rw="randrw", iodepth=4, runtime=0, ios=400, numjobs=2, verify=True,
                      wait=wait)                        # type: ignore[arg-type]
    res = perf.run(SimNs(ctrl), w)                      # type: ignore[arg-type]
    assert res.ok and res.ios == 800 and res.verify_failures == 0, res.problems
    assert [q.irq.mode if q.irq is not None else "poll" for q in ctrl.created] == [wait] * 2
    assert ctrl.io_queues == {}                         # queues given back


def test_perf_refuses_an_unknown_wait_mode(ctrl: SimCtrl) -> None:
    w = perf.Workload(runtime=1, wait="irq")            # type: ignore[arg-type]
    with pytest.raises(ValueError, match="poll, interrupt, hybrid"):
        perf.run(SimNs(ctrl), w)                        # type: ignore[arg-type]
    assert ctrl.created == []

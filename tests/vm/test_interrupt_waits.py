"""Waits that must sleep, on the "faults" bench: a command held by QEMU (I/O throttled to
1 byte/s) is waited for on an interrupt-driven queue, by a thread and by an asyncio loop.
The waiting thread uses almost no CPU; the loop keeps running other tasks meanwhile, also
while the timed-out command is recovered (Abort, then a reset, in a thread of its own)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from iommu_dma import Controller, Namespace, NvmeTimeoutError
from iommu_dma.testing.qmp import Qmp

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

STALL_NS = 2           # ctrl[0] nsid 2: stallable, no injected errors
LBA = 4096



def _held_read(ctrl: Controller, qmp: Qmp, mode: str) -> tuple[float, float, bytes]:
    """One read waited for by a thread while QEMU holds it for 1.5 s: (the thread's CPU
    seconds, wall seconds, the data)."""
    q = ctrl.create_io_queue(4, wait=mode)  # type: ignore[arg-type]
    ns = Namespace(ctrl, STALL_NS, queue=q)
    buf = ctrl.alloc(LBA)
    out: list[float] = []
    qmp.throttle(0, STALL_NS, 1)
    try:
        ns.read_into(701, buf, 1)       # the throttle lets the first request through
        req = ns.read_async(700, 1, buf)

        def waiter() -> None:
            cpu, wall = time.thread_time(), time.monotonic()
            req.result(30)
            out.extend([time.thread_time() - cpu, time.monotonic() - wall])

        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(1.5)
    finally:
        qmp.unthrottle(0, STALL_NS)
    th.join(30)
    ctrl.delete_io_queue(q.qid)
    return out[0], out[1], bytes(buf)


def test_interrupt_wait_sleeps(ctrl: Controller, idma_qmp: Qmp) -> None:
    qmp = idma_qmp
    ns = ctrl.namespace(STALL_NS)
    ns.write(700, b"\xa5" * LBA)
    cpu, wall, data = _held_read(ctrl, qmp, "interrupt")
    spin_cpu, spin_wall, _ = _held_read(ctrl, qmp, "poll")
    print(f"a read held 1.5 s by QEMU: interrupt wait {cpu:.3f} s CPU in {wall:.2f} s; "
          f"polled wait {spin_cpu:.3f} s CPU in {spin_wall:.2f} s")
    assert data == b"\xa5" * LBA
    assert wall >= 1.0                  # it did wait for the held command...
    assert cpu < 0.25 * wall            # ...asleep, not spinning


def test_asyncio_loop_runs_on_while_a_command_is_recovered(ctrl: Controller,
                                                           idma_qmp: Qmp) -> None:
    """A held read with a 1 s deadline: the awaiting task gets NvmeTimeoutError after the
    Abort and the reset, which run outside the loop; a ticker task keeps ticking meanwhile."""
    qmp = idma_qmp
    ctrl.recovery.abort_timeout = 0.5
    ns = ctrl.namespace(STALL_NS)
    ns.write(710, b"\x3c" * LBA)

    async def main() -> tuple[int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.05)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        buf = ctrl.alloc(LBA)
        started = time.monotonic()
        with pytest.raises(NvmeTimeoutError, match="controller was reset"):
            await ns.read_async(710, 1, buf, timeout=1.0)
        took = time.monotonic() - started
        qmp.unthrottle(0, STALL_NS)
        stop.set()
        await tick_task
        assert (await ns.read_async(710, 1, buf)) is buf and bytes(buf) == b"\x3c" * LBA
        return ticks, took

    qmp.throttle(0, STALL_NS, 1)
    ns.read(711, 1)                     # the throttle lets the first request through
    try:
        ticks, took = asyncio.run(main())
    finally:
        qmp.unthrottle(0, STALL_NS)
    print(f"timed-out read recovered in {took:.2f} s; the loop ticked {ticks} times meanwhile")
    deadline = time.monotonic() + 30      # the recovery thread counts the reset as it ends
    while ctrl.resets == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctrl.resets == 1
    assert ticks >= took / 0.05 / 4      # the loop was not blocked by the recovery

"""perf's wait modes on the bench: the native worker on a polled queue, or sleeping on its
queue's MSI-X vector (interrupt, hybrid). Each run must complete its I/O without errors, and an
interrupt-driven run must make the guest kernel count interrupts on the queue's vector
(/proc/interrupts, vfio-msix lines). Figures (IOPS, CPU% = process CPU time / wall) are
printed (-rP), not asserted: TCG timings say little.

This file owns ns1 LBAs 14336..14591 of the default bench (the verified writes)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from iommu_dma import Controller
from iommu_dma.native import ffi, lib
from iommu_dma.nvme.interrupts import WAIT_MODES, WaitMode
from iommu_dma.nvme.perf import PerfResult, PerfRun, Workload
from tests.vm.test_interrupts import msix_counts

pytestmark = pytest.mark.iommu_dma_vm

BLOCK = 4096
FIRST, COUNT = 14336, 256       # ns1 LBAs this file writes



def run_counted(ctrl: Controller, w: Workload) -> tuple[PerfResult, float, dict[int, int]]:
    """Run w on ns1: the result, CPU% of the run and the interrupts each of its queues'
    vectors took meanwhile (vector -> count)."""
    before = msix_counts(ctrl.bdf)
    cpu, wall = time.process_time(), time.perf_counter()
    run = PerfRun(ctrl.namespace(1), w)
    vectors = [q.irq.vector for q in run.queues if q.irq is not None]
    assert len(vectors) == (0 if w.wait == "poll" else w.numjobs)
    res = run.wait()
    cpu_pct = 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)
    after = msix_counts(ctrl.bdf)
    return res, cpu_pct, {v: after.get(v, 0) - before.get(v, 0) for v in vectors}


@pytest.mark.parametrize("qd", [1, 4])
@pytest.mark.parametrize("wait", WAIT_MODES)
def test_randread_in_each_wait_mode(ctrl: Controller, wait: WaitMode, qd: int) -> None:
    res, cpu_pct, irqs = run_counted(ctrl, Workload(rw="randread", iodepth=qd, runtime=1.0,
                                                    wait=wait))
    print(f"perf randread 4k QD{qd} --wait {wait}: {res.iops:.0f} IOPS, avg "
          f"{res.lat_avg_ns / 1000:.1f} us, CPU {cpu_pct:.0f}%, interrupts {irqs}")
    assert res.ok, res.problems
    assert res.ios > 0 and res.errors == 0 and res.verify_failures == 0
    if wait != "poll":
        assert all(n > 0 for n in irqs.values()), irqs


def test_verified_writes_sleeping_on_the_interrupt(ctrl: Controller) -> None:
    """randwrite with verify in interrupt mode: each block it wrote holds its LBA pattern when
    read back through the Python path; then randrw over the same blocks checks each read of
    a block written in that run."""
    ns = ctrl.namespace(1)
    ns.write_zeroes(FIRST, COUNT)
    w = Workload(rw="randwrite", iodepth=4, runtime=0, ios=1000, verify=True,
                 offset=FIRST * BLOCK, size=COUNT * BLOCK, wait="interrupt", seed=41)
    res, cpu_pct, irqs = run_counted(ctrl, w)
    print(f"perf randwrite 4k QD4 --wait interrupt --verify: {res.ios} I/Os, {res.iops:.0f} "
          f"IOPS, CPU {cpu_pct:.0f}%, interrupts {irqs}")
    assert res.ok and (res.ios, res.errors) == (1000, 0), res.problems
    assert all(n > 0 for n in irqs.values()), irqs
    data = ns.read(FIRST, COUNT)
    expect = ffi.new("uint8_t[]", BLOCK)
    written = 0
    for k in range(COUNT):
        block = data[k * BLOCK:(k + 1) * BLOCK]
        if block == bytes(BLOCK):
            continue                        # not drawn (1000 random draws of 256 blocks)
        lib.idma_pattern_fill(expect, FIRST + k, 1, BLOCK, 41)
        assert block == bytes(expect), f"LBA {FIRST + k} does not hold its pattern"
        written += 1
    assert written > 200, written

    w = dataclasses.replace(w, rw="randrw")
    res, cpu_pct, irqs = run_counted(ctrl, w)
    print(f"perf randrw 4k QD4 --wait interrupt --verify: {res.ios} I/Os, {res.iops:.0f} "
          f"IOPS, CPU {cpu_pct:.0f}%, {res.verify_failures} verify failures")
    assert res.ok and (res.ios, res.errors, res.verify_failures) == (1000, 0, 0), res.problems
    assert res.jobs[0].reads > 0 and res.jobs[0].writes > 0

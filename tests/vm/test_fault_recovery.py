"""Recovery from a stalled device, on the "faults" bench: a command that does not complete is
aborted (Abort, admin 08h) and, when the Abort does not bring it back, the controller is
reset; a command that comes back after the Abort ends without a reset. Every request ends
with a named error; none is left hanging; no buffer stays quarantined.

The stall comes from QEMU's monitor (iommu_dma.testing.qmp):
- throttle (block_set_io_throttle, 1 byte/s): requests wait in QEMU; the nvme controller's
  reset drains them, so a reset recovers;
- blkdebug break: the request is suspended until resume; QEMU's reset would wait for it (the
  vCPU stops in the drain), so that stall is only used where the command comes back by itself.
QEMU 7.2 answers every Abort with "not aborted" (DW0 bit 0 = 1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from iommu_dma import Controller, ControllerResetError, NvmeTimeoutError
from iommu_dma.nvme.namespace import Request
from iommu_dma.testing.qmp import Qmp

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

STALL_NS = 2           # ctrl[0] nsid 2: stallable, no injected errors



@pytest.fixture
def qmp() -> Iterator[Qmp]:
    with Qmp.guest() as q:
        yield q


def test_stalled_command_is_aborted_then_the_controller_reset(ctrl: Controller,
                                                              qmp: Qmp) -> None:
    ctrl.recovery.abort_timeout = 1.0
    ns = ctrl.namespace(STALL_NS)
    ns.write(100, b"\x5a" * 4096)
    bufs = [ctrl.alloc(4096) for _ in range(8)]
    qmp.throttle(0, STALL_NS, 1)
    try:
        others = [ns.read_async(200 + i, 1, b, timeout=None) for i, b in enumerate(bufs)]
        t0 = time.monotonic()
        with pytest.raises(NvmeTimeoutError) as err:
            ns.read(100, 1, timeout=2.0)
        took = time.monotonic() - t0
        assert "controller was reset" in str(err.value), err.value
        assert ctrl.resets == 1
        ended = _outcomes(others)
    finally:
        qmp.unthrottle(0, STALL_NS)
    print(f"stalled read: NvmeTimeoutError {took:.2f} s after submission (timeout 2 s, "
          f"abort wait 1 s, then reset); the 8 other reads: {ended}")
    assert 3.0 <= took < 10.0
    assert ended["reset"] >= 1 and sum(ended.values()) == 8
    assert ns.read(100, 1) == b"\x5a" * 4096            # the same queue works again
    assert ctrl.allocator.quarantined_bytes == 0


def test_command_back_after_the_abort_needs_no_reset(ctrl: Controller, qmp: Qmp) -> None:
    ctrl.recovery.abort_timeout = 20.0
    ns = ctrl.namespace(STALL_NS)
    buf = ctrl.alloc(4096)
    qmp.stall(0, STALL_NS, "read_aio")
    resumer = threading.Timer(3.0, qmp.resume, (0, STALL_NS))
    resumer.start()
    try:
        t0 = time.monotonic()
        req = ns.read_async(300, 1, buf, timeout=1.0)
        with pytest.raises(NvmeTimeoutError) as err:
            req.result(None)
        took = time.monotonic() - t0
    finally:
        resumer.join()
        qmp.resume(0, STALL_NS)
    print(f"stalled read, resumed 3 s later: {err.value} ({took:.2f} s)")
    assert "completed afterwards (success)" in str(err.value)
    assert ctrl.resets == 0
    assert 2.5 < took < 20.0
    assert ctrl.allocator.quarantined_bytes == 0
    assert ns.read(300, 1) is not None


def test_caller_timeout_without_a_device_deadline(ctrl: Controller, qmp: Qmp) -> None:
    """A request submitted with no deadline (timeout=None) and waited with result(t): the
    wait's end makes it timed out, and recovery ends it."""
    ctrl.recovery.abort_timeout = 0.5
    ns = ctrl.namespace(STALL_NS)
    buf = ctrl.alloc(4096)
    qmp.throttle(0, STALL_NS, 1)
    try:
        reqs = [ns.read_async(400 + i, 1, buf, timeout=None) for i in range(2)]
        with pytest.raises((NvmeTimeoutError, ControllerResetError)):
            for r in reqs:
                r.result(1.5)
    finally:
        qmp.unthrottle(0, STALL_NS)
    for r in reqs:
        assert r.done()
    assert ctrl.allocator.quarantined_bytes == 0


def _outcomes(reqs: list[Request]) -> dict[str, int]:
    out = {"ok": 0, "reset": 0}
    for r in reqs:
        try:
            r.result(30)
            out["ok"] += 1
        except ControllerResetError:
            out["reset"] += 1
    return out

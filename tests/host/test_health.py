"""The health watch's decisions, against a register page in host memory: CSTS all ones means
the device is gone, CSTS.CFS asks for a reset, the VFIO request eventfd asks for the device
back; each is noticed within about one interval, and nothing fires while a reset runs."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Iterator

import pytest

from iommu_dma.libc import eventfd
from iommu_dma.nvme import regs
from iommu_dma.nvme.health import HealthWatch


class Registers:
    """BAR0 stand-in: read32 of a host page, and the request eventfd VFIO would signal."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, 4096)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        self.request_fd = eventfd(True)

    def read32(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self.addr + offset).value

    def set_csts(self, value: int) -> None:
        ctypes.c_uint32.from_address(self.addr + regs.CSTS).value = value

    def enable_request_irq(self) -> int:
        return self.request_fd


class Watched:
    """What HealthWatch calls on its controller, recorded with the time it happened."""

    bdf = "0000:00:00.0"

    def __init__(self) -> None:
        self.pci = Registers()
        self.resetting = False
        self.calls: list[tuple[str, float]] = []
        self.seen = threading.Event()

    def _device_lost(self, why: str, *, present: bool) -> None:
        self.calls.append((f"lost present={present}", time.monotonic()))
        self.seen.set()

    def _fatal_status(self) -> None:
        self.calls.append(("fatal", time.monotonic()))
        self.seen.set()


@pytest.fixture
def ctrl() -> Iterator[Watched]:
    c = Watched()
    c.pci.set_csts(regs.CSTS_RDY)
    yield c
    os.close(c.pci.request_fd)


def watch(c: Watched) -> HealthWatch:
    return HealthWatch(c, interval=0.02)  # type: ignore[arg-type]


def test_quiet_device_raises_nothing(ctrl: Watched) -> None:
    w = watch(ctrl)
    time.sleep(0.2)
    w.stop()
    assert ctrl.calls == []


def test_all_ones_is_a_gone_device(ctrl: Watched) -> None:
    w = watch(ctrl)
    t0 = time.monotonic()
    ctrl.pci.set_csts(regs.CSTS_GONE)
    assert ctrl.seen.wait(5)
    w.stop()
    assert [name for name, _ in ctrl.calls] == ["lost present=False"]
    assert ctrl.calls[0][1] - t0 < 1.0


def test_cfs_asks_for_a_reset_but_not_during_one(ctrl: Watched) -> None:
    ctrl.resetting = True
    w = watch(ctrl)
    ctrl.pci.set_csts(regs.CSTS_RDY | regs.CSTS_CFS)
    time.sleep(0.2)
    assert ctrl.calls == []                         # a reset is under way: not acted on
    ctrl.resetting = False
    assert ctrl.seen.wait(5)
    w.stop()
    assert ctrl.calls[0][0] == "fatal"


def test_request_interrupt_gives_the_device_back(ctrl: Watched) -> None:
    w = watch(ctrl)
    assert w.watches_removal
    t0 = time.monotonic()
    os.write(ctrl.pci.request_fd, (1).to_bytes(8, "little"))
    assert ctrl.seen.wait(5)
    w.stop()
    assert [name for name, _ in ctrl.calls] == ["lost present=True"]
    assert ctrl.calls[0][1] - t0 < 1.0


def test_stop_is_prompt(ctrl: Watched) -> None:
    w = HealthWatch(ctrl, interval=10.0)  # type: ignore[arg-type]
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 2.0

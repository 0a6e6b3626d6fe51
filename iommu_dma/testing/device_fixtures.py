"""pytest fixtures for suites that test an NVMe device (pynvme's names), part of the pytest
plugin: `pytest --pciaddr 0000:01:00.0 [--pciaddr ...] tests.py`.

- `nvme0`, `nvme1`: an open Controller of the first / second --pciaddr (bound to vfio-pci),
  kept for the session; `nvme0n1`: namespace 1 of nvme0; `pcie`: nvme0's PciDevice (config
  space, FLR); `qpair`: a fresh I/O queue pair of nvme0 per test, deleted afterwards; `buf`: a
  DMA buffer per test, 4 KiB or the size given by indirect parametrization
  (`@pytest.mark.parametrize("buf", [65536], indirect=True)`).
- Without --pciaddr the tests that use them are skipped (with the reason); inside a bench guest
  they default to the bench's controllers (nvme0 the first, nvme1 the second), bound to
  vfio-pci on first use.
- A test cannot leave the controller wedged for the next: after each test that used a
  controller, one that reports a fatal status (CSTS.CFS), is no longer ready (CSTS.RDY clear)
  or gave up recovering is reset (a controller that cannot be reset is closed and opened
  again at its next use).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from iommu_dma.discovery import VFIO_DRIVER, normalize_bdf
from iommu_dma.testing.bench import current_bench

if TYPE_CHECKING:
    from iommu_dma.memory import DmaBuffer
    from iommu_dma.nvme.controller import Controller
    from iommu_dma.nvme.ioqueue import IoQueue
    from iommu_dma.nvme.namespace import Namespace
    from iommu_dma.pci import PciDevice

log = logging.getLogger(__name__)
OPTION = "--pciaddr"
SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "data" / "setup_vfio.sh"


def add_options(parser: pytest.Parser) -> None:
    parser.getgroup("iommu-dma").addoption(
        OPTION, action="append", default=[], metavar="BDF",
        help="NVMe controller (on vfio-pci) for the device fixtures nvme0, nvme0n1, qpair, buf, "
             "pcie; repeat for nvme1")


class Devices:
    """The controllers of the session, opened on first use and kept healthy."""

    def __init__(self, config: pytest.Config) -> None:
        given = config.getoption(OPTION) or []
        self.bdfs = [normalize_bdf(b) for b in given]
        self.in_bench = not self.bdfs and current_bench() is not None
        if self.in_bench:
            from iommu_dma.testing.guest import nvme_bdfs

            self.bdfs = nvme_bdfs()             # nvme0: the bench's first, nvme1: its second
        self.open: dict[int, Controller] = {}

    def controller(self, index: int) -> Controller:
        from iommu_dma.nvme.controller import Controller

        if index >= len(self.bdfs):
            pytest.skip(f"no controller for nvme{index}: give {OPTION} BDF"
                        + (f" {len(self.bdfs) + 1} times" if self.bdfs else
                           " (a controller bound to vfio-pci: `iommu-dma bind BDF`)"))
        ctrl = self.open.get(index)
        if ctrl is not None and not ctrl.closed:
            return ctrl
        bdf = self.bdfs[index]
        if self.in_bench:
            self._bind(bdf)
        self.open[index] = ctrl = Controller.open(bdf)
        return ctrl

    @staticmethod
    def _bind(bdf: str) -> None:
        from iommu_dma.testing.guest import driver_of

        if driver_of(bdf) != VFIO_DRIVER:
            subprocess.run(["bash", str(SETUP_SCRIPT), "bind", bdf], check=True,
                           capture_output=True)

    def heal(self, index: int) -> None:
        """After a test: reset a controller left failed or not ready; close one that cannot
        be reset (it is opened again at its next use)."""
        from iommu_dma.errors import ClosedError, IommuDmaError
        from iommu_dma.nvme import regs
        from iommu_dma.nvme.status import ControllerFailedError

        ctrl = self.open.get(index)
        if ctrl is None or ctrl.closed:
            return
        try:
            ctrl.check_open()
            csts = ctrl.pci.read32(regs.CSTS)
            if not csts & regs.CSTS_CFS and csts & regs.CSTS_RDY:
                return
            log.warning("%s: CSTS %#x after the test: resetting the controller", ctrl.bdf, csts)
            ctrl.reset()
        except (ControllerFailedError, ClosedError, IommuDmaError) as e:
            log.warning("%s: %s; closing it (opened again at its next use)", ctrl.bdf, e)
            try:
                ctrl.close()
            except IommuDmaError:
                pass

    def close(self) -> None:
        for ctrl in self.open.values():
            if not ctrl.closed:
                ctrl.close()
        self.open.clear()


@pytest.fixture(scope="session")
def idma_devices(request: pytest.FixtureRequest) -> Iterator[Devices]:
    devices = Devices(request.config)
    yield devices
    devices.close()


@pytest.fixture
def nvme0(idma_devices: Devices) -> Iterator[Controller]:
    """The first --pciaddr controller (kept open for the session; healed after the test)."""
    yield idma_devices.controller(0)
    idma_devices.heal(0)


@pytest.fixture
def nvme1(idma_devices: Devices) -> Iterator[Controller]:
    """The second --pciaddr controller."""
    yield idma_devices.controller(1)
    idma_devices.heal(1)


@pytest.fixture
def nvme0n1(nvme0: Controller) -> Namespace:
    """Namespace 1 of nvme0 (its calls go to the controller's shared default queue)."""
    return nvme0.namespace(1)


@pytest.fixture
def pcie(nvme0: Controller) -> PciDevice:
    """nvme0's PCI function: config_read/config_write, reset() (FLR), BAR0 registers."""
    return nvme0.pci


@pytest.fixture
def qpair(nvme0: Controller) -> Iterator[IoQueue]:
    """A new I/O queue pair of nvme0 (polled), deleted after the test
    (`Namespace(nvme0, 1, queue=qpair)` sends a namespace's commands to it)."""
    q = nvme0.create_io_queue()
    yield q
    if not q.closed and not nvme0.closed and nvme0.io_queues.get(q.qid) is q:
        nvme0.delete_io_queue(q.qid)


@pytest.fixture
def buf(request: pytest.FixtureRequest, nvme0: Controller) -> Iterator[DmaBuffer]:
    """A zeroed DMA buffer of nvme0's allocator: 4096 bytes, or the indirect parameter."""
    size = int(getattr(request, "param", 4096))
    b = nvme0.alloc(size)
    b.view[:] = bytes(size)
    yield b
    if not b.freed:
        b.free()                # quarantined instead while a command still points at it

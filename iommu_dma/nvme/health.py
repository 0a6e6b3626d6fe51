"""A controller's health watch: a daemon thread that notices, while commands wait, what no
completion will ever report.

- CSTS reads all ones: the device is gone (surprise removal, link down; §3.1.4 reads of a
  missing function return all ones);
- CSTS.CFS: Controller Fatal Status (NVMe Base 2.0 §3.1.4.6, §10.5): the controller needs a reset;
- the VFIO request interrupt: the kernel wants the device back (hot removal, unbind) and waits
  until we close it.

Each is noticed within one `interval` (0.1 s by default) and handed to the controller, which
fails every waiter with a named error. The thread reads one register per interval and sleeps on
the request eventfd in between; it never holds the controller's lock while it waits.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import TYPE_CHECKING

from iommu_dma.errors import IommuDmaError
from iommu_dma.nvme import regs

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

log = logging.getLogger(__name__)

INTERVAL = 0.1


class HealthWatch:
    """Watch one controller (started by Controller; stop() before the BAR is unmapped)."""

    def __init__(self, ctrl: Controller, interval: float = INTERVAL) -> None:
        self._ctrl = ctrl
        self.interval = interval
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._request_fd = ctrl.pci.enable_request_irq()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"iommu-dma-health-{ctrl.bdf}")
        self._thread.start()

    @property
    def watches_removal(self) -> bool:
        """True when the kernel's removal requests reach us (VFIO request interrupt)."""
        return self._request_fd is not None

    def stop(self) -> None:
        """Stop and wait for the thread (unless called from it)."""
        if not self._stop.is_set():
            self._stop.set()
            os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        fds = [self._wake_r] + ([self._request_fd] if self._request_fd is not None else [])
        while not self._stop.is_set():
            ready, _, _ = select.select(fds, [], [], self.interval)
            if self._stop.is_set():
                return
            try:
                if self._request_fd is not None and self._request_fd in ready:
                    os.read(self._request_fd, 8)
                    self._ctrl._device_lost("the kernel asked for the device back (hot "
                                            "removal or unbind)", present=True)
                    return
                if not self._check_registers():
                    return
            except IommuDmaError as e:      # closed under us: nothing left to watch
                log.debug("health watch of %s ends: %s", self._ctrl.bdf, e)
                return

    def _check_registers(self) -> bool:
        """Read CSTS once; False when the watch is over."""
        ctrl = self._ctrl
        if ctrl.resetting:
            return True
        csts = ctrl.pci.read32(regs.CSTS)
        if csts == regs.CSTS_GONE:
            ctrl._device_lost("CSTS reads all ones: the device is gone", present=False)
            return False
        if csts & regs.CSTS_CFS:
            ctrl._fatal_status()
        return True

"""Hot removal while I/O runs, on the "faults" bench: QMP device_del of ctrl[1] (behind its own
PCIe root port) in the middle of `iommu-dma perf` (QD32 randread).

The guest kernel asks vfio-pci for the device back; vfio-pci signals our VFIO request
interrupt and waits until the device is closed. The controller's health watch answers it:
outstanding I/O fails with DeviceGoneError, the controller is disabled and closed, the removal
completes (QEMU's DEVICE_DELETED event), and the process neither hangs nor crashes.

The bench has one removable controller, so everything that removes it is in one test, and
this module must be the last one on the faults bench (modules run in name order).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.testing.qmp import Qmp
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

REMOVABLE = 1

def test_device_del_mid_perf(cli: Cli, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[REMOVABLE]
    with Controller.open(bdf) as c:                     # the bench's removable controller
        assert c.identify.sn == "IDMAF001"
    perf = subprocess.Popen(
        [sys.executable, "-m", "iommu_dma.cli.main", "perf", bdf, "-n", "1", "--rw", "randread",
         "--iodepth", "32", "--runtime", "300", "--size", "16m"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert perf.stdout is not None
        for line in perf.stdout:
            lines.append(line)
            if "IOPS" in line:                          # the live line: I/O is flowing
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert running.wait(180), "".join(lines)
    with Qmp.guest() as qmp:
        t0 = time.monotonic()
        qmp.device_del(REMOVABLE, wait=False)
        perf.wait(120)
        perf_end = time.monotonic() - t0
        event = qmp.wait_event("DEVICE_DELETED", 120)
        deleted = time.monotonic() - t0
    reader.join(10)
    out = "".join(lines)
    said = (f"device_del: perf ended {perf_end:.2f} s later (rc {perf.returncode}), "
            f"DEVICE_DELETED after {deleted:.2f} s; perf said:\n{out}")
    print(said)
    assert event is not None
    assert perf.returncode == 1, out
    assert "asked for the device back" in out, out
    assert "Traceback" not in out
    assert not Path(f"/sys/bus/pci/devices/{bdf}").exists()
    r = cli("id-ctrl", bdf)
    print(said)                     # again: cli took the output captured so far
    assert r.rc != 0 and bdf in r.err, r.err
    assert "Traceback" not in r.err, r.err

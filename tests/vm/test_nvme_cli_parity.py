"""`iommu-dma id-ctrl|id-ns|smart-log -o json` on vfio-pci against `nvme ... -o json` (nvme-cli 2.x)
on the kernel nvme driver, for the same controller: the same keys and values as parsed JSON.

id-ctrl is equal outright (sn, mn and fr keep their space padding, as nvme-cli's); id-ns and
smart-log carry a few keys more (nvme_json.EXTRA_*: nsid, lba_size, temperature_celsius).
SMART counters that move between the two reads (VARYING_SMART) must not go backwards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iommu_dma.cli import nvme_json
from iommu_dma.cli.common import controller
from iommu_dma.demo import kernel_block_device
from iommu_dma.testing.guest import driver_of
from tests.conftest import setup_vfio
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="default")

# SMART values that change while the controller works or time passes, compared as ours >= kernel's
VARYING_SMART = ("data_units_read", "data_units_written", "host_read_commands",
                 "host_write_commands", "controller_busy_time", "power_on_hours")


def nvme_cli(*args: str) -> dict[str, Any]:
    proc = subprocess.run(["nvme", *args, "-o", "json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"nvme {' '.join(args)}: {proc.stderr}"
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_json_equals_nvme_cli(cli: Cli, idma_nvme_bdfs: list[str]) -> None:
    def ours(*args: str) -> dict[str, Any]:
        data: dict[str, Any] = cli.ok(*args, "-o", "json").json()
        return data

    bdf = idma_nvme_bdfs[0]
    assert driver_of(bdf) == "nvme"
    ns_devs = {nsid: kernel_block_device(bdf, nsid) for nsid in (1, 2)}
    ctrl_dev = str(Path(ns_devs[1]).with_name(Path(ns_devs[1]).name.rsplit("n", 1)[0]))
    k_ctrl = nvme_cli("id-ctrl", ctrl_dev)
    k_ns = {nsid: nvme_cli("id-ns", dev) for nsid, dev in ns_devs.items()}
    k_smart = nvme_cli("smart-log", ctrl_dev)
    kernel_said = json.dumps({"id-ctrl": k_ctrl, "id-ns": k_ns, "smart-log": k_smart})
    print(kernel_said)

    setup_vfio("bind", bdf)
    assert driver_of(bdf) == "vfio-pci"

    # Identify Controller: equal, key for key (sn, mn, fr padded with spaces as nvme-cli's)
    o_ctrl = ours("id-ctrl", bdf)
    assert o_ctrl == k_ctrl
    assert len(k_ctrl["psds"]) == k_ctrl["npss"] + 1 and o_ctrl["psds"] == k_ctrl["psds"]

    # Identify Namespace 1 and 2: nvme-cli's dict plus nsid and lba_size
    for nsid, k in k_ns.items():
        o = ours("id-ns", bdf, "-n", str(nsid))
        assert {key: v for key, v in o.items() if key not in nvme_json.EXTRA_ID_NS} == k, nsid
        assert len(o["lbafs"]) == k["nlbaf"] + 1
        assert o["nsid"] == nsid and o["lba_size"] == 1 << k["lbafs"][k["flbas"] & 0xF]["ds"]

    # SMART: every key; the stable values equal, the counters not behind the kernel's read
    o_smart = ours("smart-log", bdf)
    print(kernel_said)              # again: cli took the output captured so far
    assert set(o_smart) == set(k_smart) | nvme_json.EXTRA_SMART
    assert {k: v for k, v in o_smart.items() if k not in (*VARYING_SMART, *nvme_json.EXTRA_SMART)
            } == {k: v for k, v in k_smart.items() if k not in VARYING_SMART}
    for key in VARYING_SMART:
        assert isinstance(o_smart[key], str) and int(o_smart[key]) >= int(k_smart[key]), key
    assert o_smart["temperature_celsius"] == o_smart["temperature"] - 273

    # the library's own JSON, padding kept, is nvme-cli's outright
    with controller(bdf) as ctrl:
        assert nvme_json.id_ctrl(ctrl.identify) == k_ctrl
        assert nvme_json.id_ns(ctrl.identify_namespace(1)) == k_ns[1]

"""Zoned Namespaces on the "cmds" bench, controller [0] (IDMAC000): nsid 1 is zoned (16 zones
of 256 LBAs, capacity 192, max open 4, max active 6), nsid 2 is a plain NVM namespace.

Data we write is checked in the backing image and through the kernel driver; our report-zones
JSON is compared with nvme-cli's for the same namespace on the kernel driver."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iommu_dma import Controller
from iommu_dma.demo import kernel_block_device
from iommu_dma.nvme.zns import (
    NotZonedError,
    ReportOption,
    ZonedNamespace,
    ZoneError,
    ZoneState,
)
from iommu_dma.testing.bench import Bench, image_path
from iommu_dma.testing.guest import driver_of
from tests.conftest import setup_vfio
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="cmds")

ZONES, ZSZE, ZCAP = 16, 256, 192
LBA = 4096


def image_bytes(images: Path, nsid: int, lba: int, nlb: int) -> bytes:
    with open(image_path(images, 0, nsid), "rb") as f:
        f.seek(lba * LBA)
        return f.read(nlb * LBA)


def states(z: ZonedNamespace, *zslbas: int) -> list[ZoneState | int]:
    return [z.zone(s).state for s in zslbas]


def test_zoned_namespace_identify_and_report(idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    cfg = idma_bench.controllers[0].namespaces
    assert cfg[0].zoned and cfg[0].zone_size == ZSZE * LBA and cfg[0].zone_capacity == ZCAP * LBA
    with Controller.open(vfio_bdfs[0]) as c:
        z = ZonedNamespace.of(c, 1)
        assert (z.zone_count, z.zone_size, z.lba_size) == (ZONES, ZSZE, LBA)
        assert (z.zns.max_open, z.zns.max_active) == (cfg[0].max_open, cfg[0].max_active)
        assert (z.zns.mor, z.zns.mar) == (3, 5)            # 0's based in the structure
        assert z.zasl == 0 and z.max_append_blocks == c.max_transfer // LBA
        z.reset(select_all=True)
        zones = z.report_zones()
        assert [(q.zslba, q.wp, q.zcap, q.state, q.zt) for q in zones] == [
            (i * ZSZE, i * ZSZE, ZCAP, ZoneState.EMPTY, 2) for i in range(ZONES)]
        assert z.count_zones() == ZONES and z.count_zones(ZSZE * 3 + 7) == ZONES - 3
        part = z.report_zones(ZSZE + 44, 3)                # from the zone holding the LBA
        assert [q.zslba for q in part] == [ZSZE, 2 * ZSZE, 3 * ZSZE]
        assert z.report_zones(0, state=ReportOption.FULL) == []
        # nsid 2 is an NVM namespace: Identify Namespace unchanged with CC.CSS = 110b
        ns2 = c.namespace(2)
        assert (ns2.lba_size, ns2.blocks) == (LBA, cfg[1].size // LBA)
        with pytest.raises(NotZonedError, match="namespace 2 is not a zoned namespace"):
            ZonedNamespace.of(c, 2)
        with pytest.raises(ValueError, match="not a zone start LBA"):
            z.open(5)


def test_write_pointer_append_finish_reset(vfio_bdfs: list[str], idma_bench_images: Path
                                           ) -> None:
    rng = random.Random(13)
    with Controller.open(vfio_bdfs[0]) as c:
        z = ZonedNamespace.of(c, 1)
        z.reset(select_all=True)
        data = rng.randbytes(4 * LBA)
        z.write(0, data)                                   # at the write pointer
        q = z.zone(0)
        assert (q.wp, q.state) == (4, ZoneState.IMPLICITLY_OPENED)
        with pytest.raises(ZoneError) as e:
            z.write(10, data[:LBA])                        # not at the write pointer
        assert e.value.name == "Zone Invalid Write" and (e.value.sct, e.value.sc) == (1, 0xBC)
        more = rng.randbytes(2 * LBA)
        assert z.append(0, more) == 4                      # the LBA the controller chose
        assert z.append(0, more[:LBA]) == 6
        assert z.zone(0).wp == 7
        assert z.read(0, 7) == data + more + more[:LBA]
        assert image_bytes(idma_bench_images, 1, 0, 7) == data + more + more[:LBA]
        # a second zone, appended into while empty
        assert z.append(ZSZE, more) == ZSZE
        # finish: Full; a write then fails with Zone Is Full
        z.finish(0)
        assert z.zone(0).state == ZoneState.FULL
        with pytest.raises(ZoneError, match="Zone Is Full"):
            z.append(0, more[:LBA])
        # reset: Empty, write pointer at the start, the data reads as zeroes
        z.reset(0)
        q = z.zone(0)
        assert (q.state, q.wp) == (ZoneState.EMPTY, 0)
        assert z.read(0, 7) == bytes(7 * LBA)
        assert image_bytes(idma_bench_images, 1, 0, 7) == bytes(7 * LBA)
        # writing past the zone capacity crosses into unwritable LBAs
        z.reset(ZSZE)
        z.write(ZSZE, rng.randbytes(ZCAP * LBA))
        assert z.zone(ZSZE).state == ZoneState.FULL
        z.reset(select_all=True)


def test_open_close_and_limits(vfio_bdfs: list[str]) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        z = ZonedNamespace.of(c, 1)
        z.reset(select_all=True)
        for i in range(4):                                 # max open 4
            z.open(i * ZSZE)
        with pytest.raises(ZoneError) as e:
            z.open(4 * ZSZE)
        assert e.value.name == "Too Many Open Zones"
        assert [q.zslba for q in z.report_zones(state=ReportOption.EXPLICITLY_OPENED)] == [
            0, ZSZE, 2 * ZSZE, 3 * ZSZE]
        z.close(ZSZE)
        assert states(z, 0, ZSZE) == [ZoneState.EXPLICITLY_OPENED, ZoneState.CLOSED]
        z.open(4 * ZSZE)                                   # a slot is free again
        z.close(select_all=True)
        assert len(z.report_zones(state=ReportOption.CLOSED)) == 5
        z.open(5 * ZSZE)                                   # 6 active zones: the limit
        z.close(5 * ZSZE)
        with pytest.raises(ZoneError) as e:
            z.open(6 * ZSZE)
        assert e.value.name == "Too Many Active Zones"
        with pytest.raises(ZoneError) as e:
            z.close(7 * ZSZE)                              # an empty zone cannot be closed
        assert e.value.name == "Invalid Zone State Transition"
        z.finish(select_all=True)                          # closed zones become full
        assert len(z.report_zones(state=ReportOption.FULL)) == 6
        z.reset(select_all=True)
        assert z.count_zones(state=ReportOption.EMPTY) == ZONES


def _kernel_sees_the_same(bdf: str, report: dict[object, Any], idns: dict[str, Any],
                          data: bytes, images: Path) -> None:
    setup_vfio("unbind", bdf)
    assert driver_of(bdf) == "nvme"
    dev = kernel_block_device(bdf, 1)
    ctrl_dev = dev.rsplit("n", 1)[0]
    for args, mine in report.items():
        assert isinstance(args, tuple)
        proc = subprocess.run(["nvme", "zns", "report-zones", dev, *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == mine, args
    assert report[("-o", "json")]["zone_list"][7]["state"] in ("EXP_OPENED", "EMPTY")
    assert report[("-S", "5", "-o", "json")]["zone_list"][0]["slba"] == 5 * ZSZE
    proc = subprocess.run(["nvme", "zns", "id-ns", dev, "-o", "json"], capture_output=True,
                          text=True, timeout=120)
    assert json.loads(proc.stdout) == idns
    proc = subprocess.run(["nvme", "zns", "id-ctrl", ctrl_dev, "-o", "json"],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout) == {"zasl": 0}
    with open(dev, "rb") as f:
        f.seek(2 * ZSZE * LBA)
        assert f.read(2 * len(data)) == data + data
    assert image_bytes(images, 1, 2 * ZSZE, 6) == data + data


def test_cli_and_nvme_cli_parity(cli: Cli, vfio_bdfs: list[str], tmp_path: Path,
                                 idma_bench_images: Path) -> None:
    """Our zns CLI on vfio-pci; then, on the kernel driver, nvme-cli's JSON equals ours and
    the kernel reads our data."""
    bdf = vfio_bdfs[0]
    cli.ok("zns", "reset-zone", bdf, "-n", "1", "-a")
    data = random.Random(7).randbytes(3 * LBA)
    (tmp_path / "d.bin").write_bytes(data)
    r = cli.ok("zns", "zone-append", bdf, "-n", "1", "-s", 2 * ZSZE, "--data",
               tmp_path / "d.bin", "-o", "json")
    assert r.json()["result_lba"] == 2 * ZSZE
    r = cli.ok("zns", "zone-append", bdf, "-n", "1", "-s", 2 * ZSZE, "-d", tmp_path / "d.bin")
    assert r.text.strip() == f"Success appended data to LBA {2 * ZSZE + 3:x}"
    cli.ok("zns", "finish-zone", bdf, "-n", "1", "-s", 5 * ZSZE)
    cli.ok("zns", "open-zone", bdf, "-n", "1", "-s", 7 * ZSZE)
    cli.fails("zns", "open-zone", bdf, "-n", "1", message="give the zone's start LBA")
    cli.fails("zns", "open-zone", bdf, "-n", "1", "-s", "3", message="not a zone start LBA")
    text = cli.ok("zns", "report-zones", bdf, "-n", "1", "-d", "3", "-s", ZSZE).text
    assert text.splitlines()[0] == f"nr_zones: {ZONES}"         # nvme-cli: from LBA 0
    assert len(text.splitlines()) == 4
    assert cli.ok("zns", "id-ctrl", bdf, "-o", "json").json() == {"zasl": 0}
    idns = cli.ok("zns", "id-ns", bdf, "-n", "1", "-o", "json").json()
    assert (idns["mar"], idns["mor"], idns["lbafe"][4]) == (5, 3, {"zsze": ZSZE, "zdes": 0})
    report: dict[object, Any] = {}
    for args in (("-o", "json"), ("-d", "2", "-o", "json"), ("-s", "600", "-o", "json"),
                 ("-S", "5", "-o", "json")):
        report[args] = cli.ok("zns", "report-zones", bdf, "-n", "1", *args).json()
    _kernel_sees_the_same(bdf, report, idns, data, idma_bench_images)

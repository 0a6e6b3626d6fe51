"""The iommu-dma command inside the bench guest: every subcommand, its output and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommu_dma.testing.bench import QEMU_MODEL, Bench
from iommu_dma.testing.guest import driver_of

pytestmark = pytest.mark.vm


@dataclass
class Run:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()

    def json(self) -> Any:
        return json.loads(self.out)


def cli(*args: str | int, stdin: bytes | None = None) -> Run:
    """iommu-dma ARGS as a subprocess; stdin is not a terminal."""
    proc = subprocess.run([sys.executable, "-m", "iommu_dma.cli.main", *map(str, args)],
                          input=stdin if stdin is not None else b"", capture_output=True)
    return Run(proc.returncode, proc.stdout, proc.stderr.decode())


def ok(*args: str | int) -> Run:
    r = cli(*args)
    assert r.rc == 0, f"iommu-dma {args} failed ({r.rc}): {r.err}"
    return r


def fails(*args: str | int, message: str, rc: int = 1) -> Run:
    r = cli(*args)
    assert r.rc == rc, f"iommu-dma {args}: exit {r.rc}, expected {rc}: {r.err}"
    assert message in r.err, r.err
    if rc == 1:
        assert r.err.startswith("iommu-dma: error: ") and "Traceback" not in r.err
    return r


def image_bytes(images: Path, ctrl: int, nsid: int, offset: int, size: int) -> bytes:
    with open(images / f"c{ctrl}n{nsid}.img", "rb") as f:
        f.seek(offset)
        return f.read(size)


# ---- list / bind / unbind -------------------------------------------------------------------

def _check_list(bench: Bench, bdfs: list[str], driver: str) -> None:
    listed = ok("list", "-o", "json").json()["controllers"]
    assert [c["bdf"] for c in listed] == bdfs
    for c, cfg in zip(listed, bench.controllers):
        assert (c["driver"], c["serial"], c["model"]) == (driver, cfg.serial, QEMU_MODEL)
        assert c["error"] is None and c["iommu_group"] is not None
        got = [(n["nsid"], n["blocks"], n["lba_size"]) for n in c["namespaces"]]
        assert got == [(i, ns.blocks, ns.lba_size) for i, ns in enumerate(cfg.namespaces, 1)]
        assert c["capacity"] == sum(ns.size for ns in cfg.namespaces)
    human = ok("list").text.splitlines()
    assert human[0].split() == ["BDF", "Driver", "Group", "Serial", "Model", "Namespaces",
                                "Capacity"]
    row = human[2]
    assert bdfs[0] in row and driver in row and bench.controllers[0].serial in row
    assert QEMU_MODEL in row and " 1,2 " in row and "96.00 MiB" in row


def test_list_bind_unbind(bench: Bench, nvme_bdfs: list[str]) -> None:
    bdf = nvme_bdfs[0]
    _check_list(bench, nvme_bdfs, "nvme")
    fails("id-ctrl", bdf, message=f"`iommu-dma bind {bdf}`")
    out = ok("bind", bdf).text
    assert f"{bdf} bound to vfio-pci" in out and driver_of(bdf) == "vfio-pci"
    try:
        _check_list(bench, nvme_bdfs, "vfio-pci")
    finally:
        out = ok("unbind", bdf).text
    assert "given back to the kernel nvme driver" in out and driver_of(bdf) == "nvme"
    fails("bind", "0000:00:1d.7", message="no PCI device 0000:00:1d.7")


# ---- admin commands -------------------------------------------------------------------------

def test_id_ctrl_and_id_ns(bench: Bench, vfio_bdfs: list[str]) -> None:
    bdf, cfg = vfio_bdfs[0], bench.controllers[0]
    idc = ok("id-ctrl", bdf, "-o", "json").json()
    assert (idc["sn"], idc["mn"], idc["mdts"], idc["vid"]) == (cfg.serial, QEMU_MODEL, cfg.mdts,
                                                               0x1B36)
    assert idc["nn"] >= len(cfg.namespaces)
    text = ok("id-ctrl", bdf).text
    assert text.startswith("NVME Identify Controller:\n")
    for line in (f"sn        : {cfg.serial}", f"mn        : {QEMU_MODEL}",
                 f"mdts      : {cfg.mdts}", "vid       : 0x1b36"):
        assert line in text.splitlines()
    for key in ("ssvid", "fr", "cntlid", "ver", "oacs", "sqes", "cqes", "oncs", "subnqn"):
        assert any(line.startswith(f"{key:<10}: ") for line in text.splitlines()), key

    for nsid, ns in enumerate(cfg.namespaces, start=1):
        d = ok("id-ns", bdf, "-n", nsid, "-o", "json").json()
        assert (d["nsid"], d["nsze"], d["ncap"], d["lba_size"]) == (nsid, ns.blocks, ns.blocks,
                                                                    ns.lba_size)
        text = ok("id-ns", bdf, "--namespace-id", nsid).text.splitlines()
        assert text[0] == f"NVME Identify Namespace {nsid}:"
        assert f"nsze    : {ns.blocks:#x}" in text
        lbads = ns.lba_size.bit_length() - 1
        in_use = [line for line in text if line.endswith("(in use)")]
        assert len(in_use) == 1 and f"ms:0   lbads:{lbads:<2d} rp:0 (in use)" in in_use[0]
    fails("id-ns", bdf, "-n", 9, message="namespace 9 is not active; active NSIDs: 1, 2")


def test_logs_and_features(vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    smart = ok("smart-log", bdf, "-o", "json").json()
    assert smart["temperature"] > 273 and smart["temperature_celsius"] == \
        smart["temperature"] - 273
    assert smart["critical_warning"] == 0 and "host_read_commands" in smart
    text = ok("smart-log", bdf).text
    assert f"{smart['temperature_celsius']} °C ({smart['temperature']} K)" in text
    for key in ("critical_warning", "available_spare", "percentage_used", "data_units_read",
                "power_cycles", "unsafe_shutdowns", "media_errors", "num_err_log_entries"):
        assert f"\n{key:<40}: " in text, key

    errors = ok("error-log", bdf, "-o", "json").json()
    assert isinstance(errors["errors"], list)
    assert ok("error-log", bdf).text.startswith(f"Error Log Entries for device:{bdf} entries:")

    queues = ok("get-feature", bdf, "-f", "7", "-o", "json").json()
    assert (queues["feature_id"], queues["name"], queues["sel"]) == (7, "Number of Queues", 0)
    text = ok("get-feature", bdf, "-f", "0x07").text
    assert text.startswith("get-feature:0x07 (Number of Queues), Current value:0x")
    ok("get-feature", bdf, "-f", "4", "-s", "1")          # temperature threshold, default
    # an NVMe error status is reported by name
    fails("get-feature", bdf, "-f", "0x7f", message="Invalid Field in Command")


def test_format_asks_unless_forced(bench: Bench, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    fails("format", bdf, "-n", 2, "-l", 0, message="stdin is not a terminal")
    lbaf = ok("id-ns", bdf, "-n", 2, "-o", "json").json()
    current = lbaf["flbas"] & 0xF
    fails("format", bdf, "-n", 2, "-l", 99, "--force", message="has LBA formats 0..")
    fails("format", bdf, "-n", 9, "-l", 0, "--force", message="namespace 9 is not active")
    r = ok("format", bdf, "-n", 2, "-l", current, "--force", "-o", "json").json()
    assert (r["lba_size"], r["nsze"]) == (512, bench.controllers[0].namespaces[1].blocks)
    assert ok("format", bdf, "-n", 2, "-l", current, "--force").text.startswith(
        "Success formatting namespace:2")


# ---- read / write / compare ---------------------------------------------------------------

@pytest.mark.parametrize("nsid", [1, 2])
def test_write_read_compare(bench: Bench, vfio_bdfs: list[str], bench_images: Path,
                            tmp_path: Path, nsid: int) -> None:
    bdf = vfio_bdfs[0]
    lba = bench.controllers[0].namespaces[nsid - 1].lba_size
    data = os.urandom(300 * 1024 + 100)                # not a whole number of blocks
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    blocks = -(-len(data) // lba)
    start = 37
    r = ok("write", bdf, "-n", nsid, "--start-block", start, "--data", src)
    assert "zero-padded" in r.err and f"{blocks} blocks of {lba} bytes at LBA {start}" in r.text
    on_disk = image_bytes(bench_images, 0, nsid, start * lba, blocks * lba)
    assert on_disk == data + bytes(blocks * lba - len(data))

    back = tmp_path / "back.bin"
    ok("read", bdf, "-n", nsid, "--start-block", start, "--block-count", blocks, "--data", back)
    assert back.read_bytes() == on_disk
    assert ok("read", bdf, "-n", nsid, "-s", start + 1, "-c", 2).out == on_disk[lba:3 * lba]
    j = ok("read", bdf, "-n", nsid, "-s", start, "-c", 1, "-d", back, "-o", "json").json()
    assert j == {"op": "read", "nsid": nsid, "start_block": start, "blocks": 1, "bytes": lba,
                 "result": "success"}

    assert "compare: Success" in ok("compare", bdf, "-n", nsid, "-s", start, "-d", src).text
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(changed))
    fails("compare", bdf, "-n", nsid, "-s", start, "-d", src, message="Compare Failure")

    # --block-count cuts the file; writes through stdin work too
    ok("write", bdf, "-n", nsid, "-s", start, "-c", 1, "-d", src)
    assert image_bytes(bench_images, 0, nsid, start * lba, lba) == bytes(changed[:lba])


def test_io_errors(bench: Bench, vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[0]
    blocks = bench.controllers[0].namespaces[0].blocks
    fails("read", bdf, "-n", 1, "-s", blocks - 1, "-c", 2, message="LBA out of range")
    data = tmp_path / "d.bin"
    data.write_bytes(bytes(8192))
    fails("write", bdf, "-n", 1, "-s", blocks - 1, "-d", data, message="LBA out of range")
    fails("write", bdf, "-n", 1, "-d", tmp_path / "missing.bin",
          message=f"{tmp_path / 'missing.bin'}: No such file or directory")
    fails("write", bdf, "-n", 1, "-d", tmp_path, message="Is a directory")
    fails("read", bdf, "-n", 1, "-c", 1, "-d", tmp_path / "no" / "dir.bin",
          message="No such file or directory")
    fails("read", bdf, "-n", 9, message="namespace 9 is not active")
    fails("read", bdf, "-n", 1, "-o", "json", message="needs --data FILE")
    fails("read", "0000:00:1d.7", "-n", 1, message="no PCI device 0000:00:1d.7")
    fails("read", bdf, message="the following arguments are required: -n", rc=2)


# ---- perf -----------------------------------------------------------------------------------

def test_perf(vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[0]
    r = ok("perf", bdf, "-n", 1, "--rw", "randread", "--bs", "4k", "--iodepth", 8,
           "--runtime", 2, "-o", "json")
    j = r.json()
    assert j["ios"] > 0 and j["iops"] > 0 and j["errors"] == 0
    assert j["workload"]["rw"] == "randread" and j["workload"]["iodepth"] == 8
    assert j["lat_ns"]["p50"] <= j["lat_ns"]["p99"] <= j["lat_ns"]["max"]
    assert "IOPS" in r.err and "MB/s" in r.err                # the live line, once a second
    r = ok("perf", bdf, "-n", 2, "--rw", "read", "--bs", "64k", "--runtime", 1,
           "--numjobs", 2, "--size", "8m", "--offset", "1m")
    lines = r.text.splitlines()
    assert lines[0].split()[:3] == ["IOPS", "MB/s", "lat"] and float(lines[2].split()[0]) > 0

    data = tmp_path / "d.bin"
    data.write_bytes(os.urandom(4096))
    ok("write", bdf, "-n", 1, "-s", 0, "-d", data)
    fails("perf", bdf, "-n", 1, "--rw", "randwrite", "--runtime", 1, message="holds data")
    j = ok("perf", bdf, "-n", 1, "--rw", "randrw", "--rwmixread", 70, "--runtime", 1,
           "--size", "4m", "--force", "-o", "json").json()
    assert j["workload"]["read_pct"] == 70 and j["ios"] > 0
    fails("perf", bdf, "-n", 1, "--bs", "1m", "--runtime", 1, message="MDTS")
    fails("perf", bdf, "-n", 1, "--size", "1g", "--runtime", 1, message="do not fit")

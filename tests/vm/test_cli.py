"""The iommu-dma command inside the bench guest: every subcommand, its output and its errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iommu_dma.testing.bench import QEMU_MODEL, Bench
from iommu_dma.testing.guest import driver_of
from tests.vm.cli_run import Cli, image_bytes

pytestmark = pytest.mark.iommu_dma_vm


# ---- list / bind / unbind -------------------------------------------------------------------

def _check_list(cli: Cli, idma_bench: Bench, bdfs: list[str], driver: str) -> None:
    listed = cli.ok("list", "-o", "json").json()["controllers"]
    assert [c["bdf"] for c in listed] == bdfs
    for c, cfg in zip(listed, idma_bench.controllers):
        assert (c["driver"], c["serial"], c["model"]) == (driver, cfg.serial, QEMU_MODEL)
        assert c["error"] is None and c["iommu_group"] is not None
        # the IOMMU backend we opened it through (none while the kernel drives it)
        auto = "iommufd" if os.path.exists("/dev/iommu") else "container"
        assert c["iommu_backend"] == (None if driver == "nvme" else auto)
        got = [(n["nsid"], n["blocks"], n["lba_size"]) for n in c["namespaces"]]
        assert got == [(i, ns.blocks, ns.lba_size) for i, ns in enumerate(cfg.namespaces, 1)]
        assert c["capacity"] == sum(ns.size for ns in cfg.namespaces)
    human = cli.ok("list").text.splitlines()
    assert human[0].split() == ["BDF", "Driver", "Group", "Backend", "Serial", "Model",
                                "Namespaces", "Capacity"]
    row = human[2]
    assert bdfs[0] in row and driver in row and idma_bench.controllers[0].serial in row
    assert QEMU_MODEL in row and " 1,2 " in row and "96.00 MiB" in row


def test_list_bind_unbind(cli: Cli, idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    bdf = idma_nvme_bdfs[0]
    _check_list(cli, idma_bench, idma_nvme_bdfs, "nvme")
    cli.fails("id-ctrl", bdf, message=f"`iommu-dma bind {bdf}`")
    r = cli.ok("bind", bdf)
    # the packaged setup_vfio.sh speaks as the CLI
    assert f"iommu-dma: {bdf} bound to vfio-pci" in r.text and driver_of(bdf) == "vfio-pci"
    assert "setup_vfio" not in r.text + r.err
    try:
        _check_list(cli, idma_bench, idma_nvme_bdfs, "vfio-pci")
    finally:
        r = cli.ok("unbind", bdf)
    assert f"iommu-dma: {bdf} given back to the kernel nvme driver" in r.text
    assert driver_of(bdf) == "nvme" and "setup_vfio" not in r.text + r.err
    r = cli.fails("bind", "0000:00:1d.7", message="no PCI device 0000:00:1d.7")
    assert "setup_vfio" not in r.err and "'iommu-dma list'" in r.err


# ---- admin commands -------------------------------------------------------------------------

def test_id_ctrl_and_id_ns(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    bdf, cfg = vfio_bdfs[0], idma_bench.controllers[0]
    idc = cli.ok("id-ctrl", bdf, "-o", "json").json()
    # nvme-cli's JSON keeps the strings' space padding
    assert (idc["sn"].rstrip(), idc["mn"].rstrip(), idc["mdts"], idc["vid"]) == (
        cfg.serial, QEMU_MODEL, cfg.mdts, 0x1B36)
    assert idc["nn"] >= len(cfg.namespaces)
    text = cli.ok("id-ctrl", bdf).text
    assert text.startswith("NVME Identify Controller:\n")
    for line in (f"sn        : {cfg.serial}", f"mn        : {QEMU_MODEL}",
                 f"mdts      : {cfg.mdts}", "vid       : 0x1b36"):
        assert line in text.splitlines()
    for key in ("ssvid", "fr", "cntlid", "ver", "oacs", "sqes", "cqes", "oncs", "subnqn"):
        assert any(line.startswith(f"{key:<10}: ") for line in text.splitlines()), key

    for nsid, ns in enumerate(cfg.namespaces, start=1):
        d = cli.ok("id-ns", bdf, "-n", nsid, "-o", "json").json()
        assert (d["nsid"], d["nsze"], d["ncap"], d["lba_size"]) == (nsid, ns.blocks, ns.blocks,
                                                                    ns.lba_size)
        text = cli.ok("id-ns", bdf, "--namespace-id", nsid).text.splitlines()
        assert text[0] == f"NVME Identify Namespace {nsid}:"
        assert f"nsze    : {ns.blocks:#x}" in text
        lbads = ns.lba_size.bit_length() - 1
        in_use = [line for line in text if line.endswith("(in use)")]
        assert len(in_use) == 1 and f"ms:0   lbads:{lbads:<2d} rp:0 (in use)" in in_use[0]


def test_error_exit_status_of_a_real_process(cli: Cli, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    proc = subprocess.run([sys.executable, "-m", "iommu_dma.cli.main", "id-ns", bdf, "-n", "9"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"iommu-dma: error: {bdf}: namespace 9 is not active; active NSIDs: "
                           "1, 2\n")


def test_logs_and_features(cli: Cli, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    smart = cli.ok("smart-log", bdf, "-o", "json").json()
    assert smart["temperature"] > 273 and smart["temperature_celsius"] == \
        smart["temperature"] - 273
    assert smart["critical_warning"] == 0 and "host_read_commands" in smart
    text = cli.ok("smart-log", bdf).text
    assert f"{smart['temperature_celsius']} °C ({smart['temperature']} K)" in text
    for key in ("critical_warning", "available_spare", "percentage_used", "data_units_read",
                "power_cycles", "unsafe_shutdowns", "media_errors", "num_err_log_entries"):
        assert f"\n{key:<40}: " in text, key

    errors = cli.ok("error-log", bdf, "-o", "json").json()
    assert isinstance(errors["errors"], list)
    assert cli.ok("error-log", bdf).text.startswith(f"Error Log Entries for device:{bdf} entries:")

    queues = cli.ok("get-feature", bdf, "-f", "7", "-o", "json").json()
    assert (queues["feature_id"], queues["name"], queues["sel"]) == (7, "Number of Queues", 0)
    text = cli.ok("get-feature", bdf, "-f", "0x07").text
    assert text.startswith("get-feature:0x07 (Number of Queues), Current value:0x")
    cli.ok("get-feature", bdf, "-f", "4", "-s", "1")          # temperature threshold, default
    # an NVMe error status is reported by name
    cli.fails("get-feature", bdf, "-f", "0x7f", message="Invalid Field in Command")


def test_format_asks_unless_forced(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    cli.fails("format", bdf, "-n", 2, "-l", 0, message="stdin is not a terminal")
    lbaf = cli.ok("id-ns", bdf, "-n", 2, "-o", "json").json()
    current = lbaf["flbas"] & 0xF
    cli.fails("format", bdf, "-n", 2, "-l", 99, "--force", message="has LBA formats 0..")
    cli.fails("format", bdf, "-n", 9, "-l", 0, "--force", message="namespace 9 is not active")
    r = cli.ok("format", bdf, "-n", 2, "-l", current, "--force", "-o", "json").json()
    assert (r["lba_size"], r["nsze"]) == (512, idma_bench.controllers[0].namespaces[1].blocks)
    assert cli.ok("format", bdf, "-n", 2, "-l", current, "--force").text.startswith(
        "Success formatting namespace:2")


# ---- read / write / compare ---------------------------------------------------------------

@pytest.mark.parametrize("nsid", [1, 2])
def test_write_read_compare(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str],
                            idma_bench_images: Path,
                            tmp_path: Path, nsid: int) -> None:
    bdf = vfio_bdfs[0]
    lba = idma_bench.controllers[0].namespaces[nsid - 1].lba_size
    data = os.urandom(300 * 1024 + 100)                # not a whole number of blocks
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    blocks = -(-len(data) // lba)
    start = 37
    r = cli.ok("write", bdf, "-n", nsid, "--start-block", start, "--data", src)
    assert "zero-padded" in r.err and f"{blocks} blocks of {lba} bytes at LBA {start}" in r.text
    on_disk = image_bytes(idma_bench_images, 0, nsid, start * lba, blocks * lba)
    assert on_disk == data + bytes(blocks * lba - len(data))

    back = tmp_path / "back.bin"
    cli.ok("read", bdf, "-n", nsid, "--start-block", start, "--block-count", blocks, "--data", back)
    assert back.read_bytes() == on_disk
    assert cli.ok("read", bdf, "-n", nsid, "-s", start + 1, "-c", 2).out == on_disk[lba:3 * lba]
    j = cli.ok("read", bdf, "-n", nsid, "-s", start, "-c", 1, "-d", back, "-o", "json").json()
    assert j == {"op": "read", "nsid": nsid, "start_block": start, "blocks": 1, "bytes": lba,
                 "result": "success"}

    assert "compare: Success" in cli.ok("compare", bdf, "-n", nsid, "-s", start, "-d", src).text
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(changed))
    cli.fails("compare", bdf, "-n", nsid, "-s", start, "-d", src, message="Compare Failure")

    # --block-count cuts the file; writes through stdin work too
    cli.ok("write", bdf, "-n", nsid, "-s", start, "-c", 1, "-d", src)
    assert image_bytes(idma_bench_images, 0, nsid, start * lba, lba) == bytes(changed[:lba])


def test_io_errors(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[0]
    blocks = idma_bench.controllers[0].namespaces[0].blocks
    cli.fails("read", bdf, "-n", 1, "-s", blocks - 1, "-c", 2, message="LBA out of range")
    data = tmp_path / "d.bin"
    data.write_bytes(bytes(8192))
    cli.fails("write", bdf, "-n", 1, "-s", blocks - 1, "-d", data, message="LBA out of range")
    cli.fails("write", bdf, "-n", 1, "-d", tmp_path / "missing.bin",
          message=f"{tmp_path / 'missing.bin'}: No such file or directory")
    cli.fails("write", bdf, "-n", 1, "-d", tmp_path, message="Is a directory")
    cli.fails("read", bdf, "-n", 1, "-c", 1, "-d", tmp_path / "no" / "dir.bin",
          message="No such file or directory")
    cli.fails("read", bdf, "-n", 9, message="namespace 9 is not active")
    cli.fails("read", bdf, "-n", 1, "-o", "json", message="needs --data FILE")
    cli.fails("read", "0000:00:1d.7", "-n", 1, message="no PCI device 0000:00:1d.7")
    cli.fails("read", bdf, message="the following arguments are required: -n", rc=2)


def test_write_streams_stdin(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str],
                             idma_bench_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bdf = vfio_bdfs[0]
    lba = idma_bench.controllers[0].namespaces[0].lba_size
    data = os.urandom(3 * (4 << 20) // 2)           # 1.5 CHUNKs: whole blocks, two pieces
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    r = cli.ok("write", bdf, "-n", 1, "-s", 3, "-d", "-")
    assert f"write: Success ({len(data) // lba} blocks of {lba} bytes at LBA 3)" in r.text
    assert image_bytes(idma_bench_images, 0, 1, 3 * lba, len(data)) == data
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert "compare: Success" in cli.ok("compare", bdf, "-n", 1, "-s", 3, "-d", "-").text

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bytes(lba + 1))))
    cli.fails("write", bdf, "-n", 1, "-d", "-",
              message=f"stdin: data read from a stream must be a whole number of {lba}-byte "
                      "blocks")
    blocks = idma_bench.controllers[0].namespaces[0].blocks
    cli.fails("write", bdf, "-n", 1, "-s", blocks, "-d", "-",
              message=f"--start-block {blocks} is past the end of namespace 1")
    cli.fails("read", bdf, "-n", 1, "-s", 1 << 64, message="is past the end of namespace 1")
    cli.fails("read", bdf, "-n", 1 << 32, message="must be in 1..0xffffffff", rc=2)


# ---- perf -----------------------------------------------------------------------------------

def test_perf(cli: Cli, vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[0]
    r = cli.ok("perf", bdf, "-n", 1, "--rw", "randread", "--bs", "4k", "--iodepth", 8,
           "--runtime", 2, "-o", "json")
    j = r.json()
    assert j["ios"] > 0 and j["iops"] > 0 and j["errors"] == 0
    assert j["workload"]["rw"] == "randread" and j["workload"]["iodepth"] == 8
    assert j["lat_ns"]["p50"] <= j["lat_ns"]["p99"] <= j["lat_ns"]["max"]
    assert "IOPS" in r.err and "MB/s" in r.err                # the live line, once a second
    r = cli.ok("perf", bdf, "-n", 2, "--rw", "read", "--bs", "64k", "--runtime", 1,
           "--numjobs", 2, "--size", "8m", "--offset", "1m")
    lines = r.text.splitlines()
    assert lines[0].split()[:3] == ["IOPS", "MB/s", "lat"] and float(lines[2].split()[0]) > 0

    data = tmp_path / "d.bin"
    data.write_bytes(os.urandom(4096))
    cli.ok("write", bdf, "-n", 1, "-s", 0, "-d", data)
    cli.fails("perf", bdf, "-n", 1, "--rw", "randwrite", "--runtime", 1, message="holds data")
    j = cli.ok("perf", bdf, "-n", 1, "--rw", "randrw", "--rwmixread", 70, "--runtime", 1,
           "--size", "4m", "--force", "-o", "json").json()
    assert j["workload"]["read_pct"] == 70 and j["ios"] > 0
    cli.fails("perf", bdf, "-n", 1, "--bs", "1m", "--runtime", 1, message="MDTS")
    cli.fails("perf", bdf, "-n", 1, "--size", "1g", "--runtime", 1, message="do not fit")


def test_perf_refuses_an_iodepth_deeper_than_the_queues(cli: Cli, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    j = cli.ok("perf", bdf, "-n", 1, "--iodepth", 4, "--runtime", "0.5", "-o", "json").json()
    assert j["ok"] is True and j["problems"] == [] and j["timed_out"] is False
    j = cli.ok("perf", bdf, "-n", 1, "--iodepth", 1, "--runtime", "0.5", "--spin-only",
               "-o", "json").json()
    assert j["ok"] is True and j["ios"] > 0 and j["workload"]["spin_only"] is True
    cli.fails("perf", bdf, "-n", 1, "--runtime", 1, "--spin-only", "--wait", "interrupt",
              message="--spin-only is for --wait poll; --wait interrupt")
    r = cli.fails("perf", bdf, "-n", 1, "--iodepth", 100000, "--runtime", 1,
                  message="--iodepth 100000 is more than the controller's queues allow: at most")
    assert "CAP.MQES" in r.err and r.out == b""
    cli.fails("perf", bdf, "-n", 1, "--runtime", "inf", message="finite number", rc=2)


def test_perf_fails_when_the_worker_times_out(cli: Cli, vfio_bdfs: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose I/O timeout is shorter than the device's latency gives up (rc
    ETIMEDOUT): perf says so and exits 1 even though some I/O may have finished."""
    from dataclasses import replace

    from iommu_dma.nvme import perf

    real = perf.run_worker

    def impatient(qpair: Any, config: Any, progress: Any = None, mix: Any = None) -> Any:
        return real(qpair, replace(config, io_timeout=20e-6, spin_only=True), progress, mix)

    monkeypatch.setattr(perf, "run_worker", impatient)
    bdf = vfio_bdfs[0]
    r = cli.fails("perf", bdf, "-n", 1, "--iodepth", 8, "--runtime", 1, message="timed out")
    assert r.err.splitlines()[-1].startswith("iommu-dma: error: ")
    monkeypatch.setattr(perf, "run_worker", real)
    # the controller still works afterwards
    assert cli.ok("perf", bdf, "-n", 1, "--runtime", "0.5", "-o", "json").json()["ok"] is True

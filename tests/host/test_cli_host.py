"""iommu-dma CLI on the host: argument parsing, output formatting, errors without a device."""

from __future__ import annotations

import argparse
import struct

import pytest

from iommu_dma.cli import devices, io, output
from iommu_dma.cli.common import CliError, parse_size
from iommu_dma.cli.main import build_parser, describe, main
from iommu_dma.nvme.identify import IdentifyController, IdentifyNamespace, SmartLog


@pytest.mark.parametrize("text, value", [("4096", 4096), ("4k", 4096), ("128K", 128 << 10),
                                         ("1m", 1 << 20), ("2MiB", 2 << 20), ("1g", 1 << 30)])
def test_sizes_take_fio_suffixes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4x", "k", "-4k", "1.5m"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_perf_options_are_fio_names() -> None:
    args = build_parser().parse_args(
        ["perf", "00:04.0", "-n", "1", "--rw", "randrw", "--rwmixread", "70", "--bs", "128k",
         "--iodepth", "32", "--runtime", "2", "--numjobs", "2", "--size", "8m", "--offset", "1m",
         "--verify", "--force", "-o", "json"])
    assert (args.rw, args.rwmixread, args.bs, args.iodepth, args.runtime, args.numjobs) == \
        ("randrw", 70, 128 << 10, 32, 2.0, 2)
    assert (args.size, args.offset, args.verify, args.force, args.output_format) == \
        (8 << 20, 1 << 20, True, True, "json")


def test_io_options_and_natural_block_count() -> None:
    p = build_parser()
    a = p.parse_args(["read", "0000:00:04.0", "-n", "2", "--start-block", "7",
                      "--block-count", "8", "--data", "out.bin"])
    assert (a.bdf, a.nsid, a.start_block, a.block_count, a.data) == ("0000:00:04.0", 2, 7, 8,
                                                                      "out.bin")
    a = p.parse_args(["write", "00:04.0", "-n", "1", "-s", "0x10", "-d", "f"])
    assert (a.start_block, a.block_count) == (16, None)
    assert "natural count" in p._subparsers._group_actions[0].choices["read"].format_help()


def test_debug_is_accepted_before_and_after_the_command() -> None:
    p = build_parser()
    assert p.parse_args(["--debug", "list"]).debug is True
    assert p.parse_args(["list", "--debug"]).debug is True
    assert p.parse_args(["list"]).debug is False


def test_vm_takes_the_command_after_double_dash() -> None:
    a = build_parser().parse_args(["vm", "--bench", "aw39", "--timeout", "60", "--", "ls", "-l"])
    assert (a.bench, a.timeout, a.command) == ("aw39", 60.0, ["--", "ls", "-l"])


@pytest.mark.parametrize("argv", [["read", "00:04.0"], ["bogus"], ["perf", "x", "-n", "1",
                                                                    "--bs", "4q"],
                                  ["format", "00:04.0", "-n", "1"], ["get-feature", "00:04.0"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: iommu-dma" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["id-ctrl", "banana"], "'banana' is not a PCI address"),
    (["smart-log", "0000:00:1d.7"], "no PCI device 0000:00:1d.7"),
])
def test_errors_are_one_line_without_traceback(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("iommu-dma: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_debug_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "id-ctrl", "banana"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_file_errors_name_the_file() -> None:
    assert describe(FileNotFoundError(2, "No such file or directory", "/x/y")) == \
        "/x/y: No such file or directory"


def test_write_pads_the_last_block_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    data, blocks = io.padded(b"a" * 5000, 4096, None, "f.bin")
    assert (len(data), blocks) == (8192, 2) and data[5000:] == bytes(3192)
    assert "zero-padded" in capsys.readouterr().err
    data, blocks = io.padded(b"a" * 8192, 512, 4, "f.bin")
    assert (len(data), blocks) == (2048, 4)
    with pytest.raises(CliError, match="empty"):
        io.padded(b"", 512, None, "f.bin")


# ---- formatting, on synthetic Identify / log data ---------------------------------------------

def _identify_controller() -> IdentifyController:
    raw = bytearray(4096)
    struct.pack_into("<HH", raw, 0, 0x1B36, 0x1AF4)
    raw[4:24] = b"IDMA0001".ljust(20)
    raw[24:64] = b"QEMU NVMe Ctrl".ljust(40)
    raw[64:72] = b"7.2.0".ljust(8)
    raw[77] = 5
    struct.pack_into("<I", raw, 80, 0x10400)
    struct.pack_into("<I", raw, 516, 256)
    return IdentifyController.parse(bytes(raw))


def _identify_namespace() -> IdentifyNamespace:
    raw = bytearray(4096)
    struct.pack_into("<QQQ", raw, 0, 16384, 16384, 16384)
    raw[25] = 1                                     # two formats
    raw[26] = 1                                     # the second in use
    struct.pack_into("<II", raw, 128, 9 << 16, 12 << 16)
    return IdentifyNamespace.parse(bytes(raw))


def test_id_ctrl_lines_use_nvme_cli_names() -> None:
    lines = output.id_ctrl_lines(_identify_controller())
    assert lines[0] == "NVME Identify Controller:"
    for want in ("vid       : 0x1b36", "ssvid     : 0x1af4", "sn        : IDMA0001",
                 "mn        : QEMU NVMe Ctrl", "fr        : 7.2.0", "mdts      : 5",
                 "ver       : 0x10400", "nn        : 256", "oacs      : 0"):
        assert want in lines


def test_id_ns_lines_and_lbaf_in_use() -> None:
    lines = output.id_ns_lines(_identify_namespace(), 1)
    assert lines[0] == "NVME Identify Namespace 1:"
    assert "nsze    : 0x4000" in lines and "nlbaf   : 1" in lines and "flbas   : 0x1" in lines
    assert lines[-2] == "lbaf  0 : ms:0   lbads:9  rp:0"
    assert lines[-1] == "lbaf  1 : ms:0   lbads:12 rp:0 (in use)"


def test_smart_lines_show_kelvin_and_celsius() -> None:
    raw = bytearray(512)
    struct.pack_into("<H", raw, 1, 323)
    raw[3] = 100
    raw[32] = 3
    log = SmartLog.parse(bytes(raw))
    text = "\n".join(output.smart_lines(log, "0000:00:04.0"))
    assert "temperature" in text and "50 °C (323 K)" in text
    assert "available_spare                         : 100%" in text
    assert "data_units_read                         : 3 (1.46 MiB)" in text
    assert output.smart_dict(log)["temperature_celsius"] == 50


def test_feature_line_and_perf_table() -> None:
    assert output.feature_line(7, 0, 0x70007) == \
        "get-feature:0x07 (Number of Queues), Current value:0x00070007"
    lines = output.perf_lines({"iops": 1234.4, "mb_per_s": 5.06,
                               "lat_ns": {"avg": 25600, "p50": 24000, "p99": 60000,
                                          "p99.9": 90000, "max": 120000}})
    assert lines[0].split() == ["IOPS", "MB/s", "lat", "avg", "p50", "p99", "p99.9", "max",
                                "(us)"]
    assert lines[2].split() == ["1234", "5.06", "25.6", "24.0", "60.0", "90.0", "120.0"]


def test_list_table() -> None:
    c = devices.ControllerInfo("0000:00:04.0", "vfio-pci", 5, "IDMA0001", "QEMU NVMe Ctrl", "1.0",
                               [devices.NamespaceInfo(1, 16384, 4096),
                                devices.NamespaceInfo(2, 65536, 512)])
    lines = devices.list_lines([c])
    assert lines[0].split() == list(devices.LIST_HEADERS)
    assert lines[2].split() == ["0000:00:04.0", "vfio-pci", "5", "IDMA0001", "QEMU", "NVMe",
                                "Ctrl", "1,2", "96.00", "MiB"]
    assert c.to_dict()["namespaces"][1]["size"] == 32 << 20
    assert devices.list_lines([]) == ["no NVMe controller found"]


def test_bind_runs_the_setup_script() -> None:
    args = build_parser().parse_args(["bind", "00:04.0", "--user", "bob", "--force"])
    cmd = devices.setup_command("bind", args)
    assert cmd[1].endswith("iommu_dma/data/setup_vfio.sh") and devices.SETUP_SCRIPT.is_file()
    assert cmd[2:] == ["--force", "--user", "bob", "bind", "0000:00:04.0"]

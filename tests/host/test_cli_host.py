"""iommu-dma CLI on the host: argument parsing, output formatting, errors without a device."""

from __future__ import annotations

import argparse
import io as pyio
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from iommu_dma.cli import devices, io, output
from iommu_dma.cli import perf as cli_perf
from iommu_dma.cli.common import parse_size
from iommu_dma.cli.main import build_parser, describe, main
from iommu_dma.errors import GroupNotViableError, NotBoundError, PermissionDeniedError
from iommu_dma.nvme import perf
from iommu_dma.nvme.identify import IdentifyController, IdentifyNamespace, SmartLog
from iommu_dma.nvme.queue import ETIMEDOUT, WorkerResult
from iommu_dma.nvme.sqe import make_status


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
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert "natural count" in sub.choices["read"].format_help()


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


# ---- a namespace without a device: what the CLI checks and sends ---------------------------

class FakeNamespace:
    """Just what the CLI's read/write/compare/perf use of a Namespace; records writes."""

    def __init__(self, blocks: int = 1024, lba_size: int = 4096, mqes: int = 64) -> None:
        self.nsid, self.blocks, self.lba_size = 1, blocks, lba_size
        self.ms, self.extended, self.pi = 0, False, None      # no metadata
        self.capacity = blocks * lba_size
        self.ctrl = SimpleNamespace(bdf="0000:00:04.0", cap=SimpleNamespace(mqes=mqes),
                                    max_transfer=128 << 10, identify=SimpleNamespace(oncs=1))
        self.writes: list[tuple[int, int]] = []          # (lba, blocks)
        self.on_write: Any = None

    def write(self, lba: int, data: bytes, metadata: bytes | None = None, **pi: Any) -> None:
        assert metadata is None
        assert len(data) % self.lba_size == 0 and lba + len(data) // self.lba_size <= self.blocks
        self.writes.append((lba, len(data) // self.lba_size))
        if self.on_write is not None:
            self.on_write()

    def flush(self) -> None:
        pass

    def compare(self, lba: int, data: bytes) -> bool:
        return True


@pytest.fixture
def fake_ns(monkeypatch: pytest.MonkeyPatch) -> FakeNamespace:
    ns = FakeNamespace()

    @contextmanager
    def namespace(bdf: str, nsid: int) -> Iterator[FakeNamespace]:
        yield ns

    monkeypatch.setattr(io, "namespace", namespace)
    monkeypatch.setattr(cli_perf, "namespace", namespace)
    return ns


class CountingStdin(pyio.BytesIO):
    """stdin's bytes; .consumed is how many were read so far."""

    @property
    def consumed(self) -> int:
        return self.tell()


def set_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> CountingStdin:
    raw = CountingStdin(data)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=raw, isatty=lambda: False))
    return raw


def test_write_streams_stdin_in_chunks(fake_ns: FakeNamespace, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(io, "CHUNK", 16 << 10)
    stdin = set_stdin(monkeypatch, bytes(range(256)) * 64 * 10)     # 160 KiB = 40 blocks
    read_at_write: list[int] = []
    fake_ns.on_write = lambda: read_at_write.append(stdin.consumed)
    assert main(["write", "00:04.0", "-n", "1", "-s", "5", "-d", "-"]) == 0
    assert fake_ns.writes == [(5 + 4 * i, 4) for i in range(10)]
    assert read_at_write[0] <= 16 << 10       # the first chunk went out before the rest was read
    assert "write: Success (40 blocks of 4096 bytes at LBA 5)" in capsys.readouterr().out


def test_write_from_stdin_checks_arguments_before_reading(
        fake_ns: FakeNamespace, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    stdin = set_stdin(monkeypatch, bytes(8192))
    assert main(["write", "00:04.0", "-n", "1", "-s", "1024", "-d", "-"]) == 1
    assert "--start-block 1024 is past the end of namespace 1" in capsys.readouterr().err
    assert main(["write", "00:04.0", "-n", "1", "-s", "1000", "-c", "30", "-d", "-"]) == 1
    assert "LBA out of range: blocks 1000..1029" in capsys.readouterr().err
    assert stdin.consumed == 0 and fake_ns.writes == []


def test_write_from_stdin_wants_whole_blocks(fake_ns: FakeNamespace,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    set_stdin(monkeypatch, bytes(5000))
    assert main(["write", "00:04.0", "-n", "1", "-d", "-"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iommu-dma: error: stdin: data read from a stream must be a whole "
                          "number of 4096-byte blocks") and err.count("\n") == 1
    assert fake_ns.writes == []
    set_stdin(monkeypatch, b"")
    assert main(["write", "00:04.0", "-n", "1", "-d", "-"]) == 1
    assert "stdin is empty" in capsys.readouterr().err
    set_stdin(monkeypatch, bytes(4096 * 1025))                  # more than the namespace
    assert main(["write", "00:04.0", "-n", "1", "-d", "-"]) == 1
    assert "stdin holds more than the 1024 blocks" in capsys.readouterr().err
    set_stdin(monkeypatch, bytes(4096 * 3))
    assert main(["write", "00:04.0", "-n", "1", "-c", "4", "-d", "-"]) == 1
    assert "stdin ended after 3 blocks; --block-count asked for 4" in capsys.readouterr().err


def test_write_pads_a_file_and_says_so(fake_ns: FakeNamespace, tmp_path: Any,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 5000)
    assert main(["write", "00:04.0", "-n", "1", "-d", str(f)]) == 0
    assert fake_ns.writes == [(0, 2)] and "zero-padded" in capsys.readouterr().err
    f.write_bytes(b"")
    assert main(["write", "00:04.0", "-n", "1", "-d", str(f)]) == 1
    assert "the file is empty" in capsys.readouterr().err


# ---- bounds checked before any device access -----------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["id-ns", "00:04.0", "-n", str(1 << 32)], "must be in 1..0xffffffff"),
    (["id-ns", "00:04.0", "-n", "0"], "must be in 1..0xffffffff"),
    (["read", "00:04.0", "-n", "99999999999999"], "must be in 1..0xffffffff"),
    (["get-feature", "00:04.0", "-f", "7", "-n", str(1 << 32)], "must be in 0..0xffffffff"),
    (["get-feature", "00:04.0", "-f", "256"], "must be in 0..255"),
    (["get-feature", "00:04.0", "-f", "7", "--cdw11", str(1 << 32)], "0..0xffffffff"),
    (["perf", "00:04.0", "-n", "1", "--runtime", "nan"], "finite number"),
    (["perf", "00:04.0", "-n", "1", "--runtime", "inf"], "finite number"),
    (["perf", "00:04.0", "-n", "1", "--runtime", "1e12"], "at most 604800"),
    (["perf", "00:04.0", "-n", "1", "--runtime", "0"], "above 0"),
    (["perf", "00:04.0", "-n", "1", "--rwmixread", "101"], "must be in 0..100"),
    (["format", "00:04.0", "-n", "1", "-l", "0", "--timeout", "0"], "above 0"),
    (["format", "00:04.0", "-n", "1", "-l", "0", "--timeout", "-5"], "above 0"),
    (["format", "00:04.0", "-n", "1", "-l", "0", "--timeout", "nan"], "finite number"),
])
def test_out_of_range_arguments_are_usage_errors(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_largest_nsid_is_accepted() -> None:
    assert build_parser().parse_args(["id-ns", "00:04.0", "-n", "0xffffffff"]).nsid == 0xFFFFFFFF


def test_iodepth_above_the_queue_limit_is_refused_before_starting(
        fake_ns: FakeNamespace, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_run(*a: object) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(perf, "PerfRun", no_run)
    assert main(["perf", "00:04.0", "-n", "1", "--iodepth", "64", "--runtime", "1"]) == 1
    err = capsys.readouterr().err
    assert err == ("iommu-dma: error: --iodepth 64 is more than the controller's queues allow: "
                   "at most 63 (CAP.MQES: 64 entries per queue, one kept empty)\n")
    assert perf.check_workload(fake_ns, perf.Workload(iodepth=63))  # type: ignore[arg-type]


def test_unexpected_exceptions_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise struct.error("argument out of range")

    monkeypatch.setattr(devices, "collect", lambda: broken(argparse.Namespace()))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iommu-dma: error: internal error (error: argument out of range)")
    assert err.count("\n") == 1 and "--debug" in err


# ---- perf tells the truth ------------------------------------------------------------------

def worker_result(**kw: Any) -> WorkerResult:
    base: dict[str, Any] = dict(
        rc=0, ios=1000, reads=1000, writes=0, bytes=1000 * 4096, errors=0,
        first_error_status=0, first_error_opcode=0, first_error_lba=0, verify_failures=0,
        first_verify_lba=0, elapsed_ns=10**9, timed_out=False, lat_min_ns=10_000,
        lat_avg_ns=20_000, lat_p50_ns=20_000, lat_p99_ns=40_000, lat_p999_ns=50_000,
        lat_max_ns=60_000, hist={16384: 1000})
    base.update(kw)
    return WorkerResult(**base)


def test_combine_clean_run_is_ok() -> None:
    r = perf.combine([worker_result(), worker_result()])
    assert r.ok and r.problems == [] and r.ios == 2000 and not r.timed_out
    assert r.to_dict()["ok"] is True


def test_combine_reports_a_timeout_even_when_io_finished() -> None:
    r = perf.combine([worker_result(), worker_result(rc=ETIMEDOUT, timed_out=True, ios=77)])
    assert not r.ok and r.timed_out and r.ios == 1077
    assert r.problems == ["job 1 timed out waiting for a completion after 77 I/Os (the "
                          "controller stopped answering; unbind and bind it to reset it)"]
    assert r.to_dict()["timed_out"] is True and r.to_dict()["ok"] is False


def test_combine_reports_worker_failures_errors_and_verify_failures() -> None:
    lba_out_of_range = make_status(0x80)
    r = perf.combine([worker_result(rc=-1, errors=3, first_error_status=lba_out_of_range,
                                    first_error_opcode=2, first_error_lba=99,
                                    verify_failures=2, first_verify_lba=7)])
    assert not r.ok
    assert r.problems[0].startswith("the I/O worker stopped with an error after 1000 I/Os")
    assert r.problems[1].startswith("3 I/O error(s), the first: opcode 0x02 LBA 99: LBA Out "
                                    "of Range")
    assert r.problems[2] == ("2 verify failure(s): data read back differs from what was "
                             "written (first at LBA 7)")


def test_combine_raises_when_no_io_finished() -> None:
    with pytest.raises(Exception, match="timed out"):
        perf.combine([worker_result(rc=ETIMEDOUT, timed_out=True, ios=0, hist={})])


@pytest.mark.parametrize("fmt", ["normal", "json"])
def test_perf_exits_1_when_the_worker_timed_out(fake_ns: FakeNamespace,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                fmt: str) -> None:
    class TimedOutRun:
        def __init__(self, ns: object, w: perf.Workload) -> None:
            pass

        def wait(self, tick: object = None) -> perf.PerfResult:
            return perf.combine([worker_result(rc=ETIMEDOUT, timed_out=True)])

    monkeypatch.setattr(perf, "PerfRun", TimedOutRun)
    assert main(["perf", "00:04.0", "-n", "1", "--runtime", "1", "-o", fmt]) == 1
    out, err = capsys.readouterr()
    assert "1000" in out                                  # the figures are still shown
    last = err.splitlines()[-1]
    assert last.startswith("iommu-dma: error: perf: the I/O worker timed out waiting for a "
                           "completion after 1000 I/Os") and "cannot be trusted" in last


# ---- hints name the CLI --------------------------------------------------------------------

def test_binding_hints_name_the_cli() -> None:
    text = describe(NotBoundError("0000:00:04.0", "nvme"))
    assert "run `iommu-dma bind 0000:00:04.0` first" in text and "setup_vfio" not in text
    text = describe(PermissionDeniedError("/dev/vfio/3"))
    assert "`iommu-dma bind --user NAME BDF`" in text and "setup_vfio" not in text
    text = describe(GroupNotViableError(3, [("0000:00:04.1", "e1000e")]))
    assert "`iommu-dma bind BDF`" in text and "setup_vfio" not in text
    # the library may name both; the CLI shows its own command once
    assert describe(ValueError("run `iommu-dma bind 0000:00:04.0` first (or "
                               "`scripts/setup_vfio.sh bind 0000:00:04.0`)")) == \
        "run `iommu-dma bind 0000:00:04.0` first"


def test_setup_script_messages_are_shown_as_the_cli() -> None:
    out = devices.script_text("setup_vfio.sh: 0000:00:0a.0 bound to vfio-pci: IOMMU group 10\n"
                              "setup_vfio.sh: error: no PCI device 0000:00:1d.7 (see "
                              "'setup_vfio.sh status' for the NVMe controllers)\n")
    assert out == ("iommu-dma: 0000:00:0a.0 bound to vfio-pci: IOMMU group 10\n"
                   "iommu-dma: error: no PCI device 0000:00:1d.7 (see 'iommu-dma list' for "
                   "the NVMe controllers)\n")


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
                                devices.NamespaceInfo(2, 65536, 512)], iommu_backend="iommufd")
    lines = devices.list_lines([c])
    assert lines[0].split() == list(devices.LIST_HEADERS)
    assert lines[2].split() == ["0000:00:04.0", "vfio-pci", "5", "iommufd", "IDMA0001", "QEMU",
                                "NVMe", "Ctrl", "1,2", "96.00", "MiB"]
    assert c.to_dict()["iommu_backend"] == "iommufd"
    assert c.to_dict()["namespaces"][1]["size"] == 32 << 20
    assert devices.list_lines([]) == ["no NVMe controller found"]


def test_bind_runs_the_setup_script() -> None:
    args = build_parser().parse_args(["bind", "00:04.0", "--user", "bob", "--force"])
    cmd = devices.setup_command("bind", args)
    assert cmd[1].endswith("iommu_dma/data/setup_vfio.sh") and devices.SETUP_SCRIPT.is_file()
    assert cmd[2:] == ["--force", "--user", "bob", "bind", "0000:00:04.0"]

"""The ioworker's depth: block-size splits, trim/flush mixes, the IOPS cap, the per-second
series, regions and several namespaces.

The worker itself runs on the simulated controller of native/sim (every command completes at
once, in the worker's own thread: counts are exact and nothing depends on a device's speed);
the Python layer (perf.run, run_many, JSON) on the thread-served simulator of sim_nvme, which
here also executes Dataset Management (deallocate: zeroes) and Flush.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from iommu_dma.cli.main import build_parser
from iommu_dma.nvme import perf
from tests.host.sim_nvme import LBA, _read
from tests.host.test_engine_cost import Rig, sim  # noqa: F401  (the fixture)
from tests.host.test_queue_engine import MediaSim, SimCtrl, SimNs

BIG = 32                            # LBAs of the large size of a split (128 KiB)


def worker_cfg(rig: Rig, qd: int = 8, **fields: Any) -> tuple[Any, Any]:
    """A cfg over a data area of qd * BIG LBAs (mapped), and a result struct."""
    ffi, lib = rig.ffi, rig.lib
    _, addr = rig.mem(qd * BIG * LBA)
    assert lib.idma_maptable_add(rig.table, addr, qd * BIG * LBA) == 0
    cfg = ffi.new("struct idma_worker_cfg *")
    cfg.nsid, cfg.lba_size, cfg.block_lbas, cfg.qd, cfg.read_pct = 1, LBA, 1, qd, 100
    cfg.random, cfg.lba_count, cfg.seed, cfg.buf, cfg.irq_fd = 1, 1 << 20, 7, addr, -1
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg, ffi.new("struct idma_worker_result *")


def split(cfg: Any, pairs: list[tuple[int, int]]) -> None:
    cfg.nbs = len(pairs)
    for i, (lbas, pct) in enumerate(pairs):
        cfg.bs_lbas[i], cfg.bs_pct[i] = lbas, pct


def test_bssplit_draws_sizes_by_weight(sim: Any) -> None:  # noqa: F811
    rig = Rig(sim, depth=9)
    cfg, res = worker_cfg(rig, block_lbas=BIG, io_count=20000)
    split(cfg, [(1, 50), (BIG, 30), (8, 20)])
    assert rig.lib.idma_worker_run(rig.q, cfg, res, rig.ffi.NULL) == 0
    counts = [res.bs_ios[i] for i in range(3)]
    assert sum(counts) == res.ios == res.reads == 20000 and res.errors == 0
    for got, pct in zip(counts, (50, 30, 20)):
        assert abs(got / 20000 - pct / 100) < 0.02, counts
    assert res.bytes == (counts[0] + counts[1] * BIG + counts[2] * 8) * LBA
    assert rig.info().reads == 20000


def test_op_mix_trims_and_flushes(sim: Any) -> None:  # noqa: F811
    rig = Rig(sim, depth=9)
    cfg, res = worker_cfg(rig, io_count=20000, read_pct=50, trim_pct=20, flush_pct=10)
    assert rig.lib.idma_worker_run(rig.q, cfg, res, rig.ffi.NULL) == 0
    assert res.reads + res.writes + res.trims + res.flushes == res.ios == 20000
    for got, share in ((res.trims, 0.2), (res.flushes, 0.1), (res.reads, 0.35),
                       (res.writes, 0.35)):
        assert abs(got / 20000 - share) < 0.02
    info = rig.info()                       # what the controller fetched
    assert (info.fetched, info.reads, info.writes) == (20000, res.reads, res.writes)
    assert [res.op_ios[k] for k in range(4)] == [res.reads, res.writes, res.trims, res.flushes]
    assert res.op_bytes[2] == res.trims * LBA and res.op_bytes[3] == 0
    assert res.bytes == (res.reads + res.writes) * LBA


def test_trim_range_is_the_slot_buffer(sim: Any) -> None:  # noqa: F811
    rig = Rig(sim, depth=2)
    cfg, res = worker_cfg(rig, qd=1, io_count=1, trim_pct=100, random=0, lba_start=77,
                          lba_count=1000, block_lbas=4)
    assert rig.lib.idma_worker_run(rig.q, cfg, res, rig.ffi.NULL) == 0
    assert res.trims == 1
    sqe = bytes(rig.sq[:64])
    assert sqe[0] == 0x09 and struct.unpack_from("<II", sqe, 40) == (0, 1 << 2)   # NR 0, AD
    prp1, = struct.unpack_from("<Q", sqe, 24)
    assert prp1 == cfg.buf
    assert struct.unpack("<IIQ", _read(prp1, 16)) == (0, 4, 77)   # attrs, LBAs, SLBA


def test_rate_iops_caps_without_spinning(sim: Any) -> None:  # noqa: F811
    rig = Rig(sim, depth=9)
    cfg, res = worker_cfg(rig, duration_ns=int(1.3e9), rate_iops=2000)
    cpu = time.thread_time()
    assert rig.lib.idma_worker_run(rig.q, cfg, res, rig.ffi.NULL) == 0
    cpu = time.thread_time() - cpu
    elapsed = res.elapsed_ns / 1e9
    assert res.ios <= 2000 * elapsed + 1
    assert res.ios >= 0.5 * 2000 * elapsed          # paced, not stalled
    assert cpu < 0.5 * elapsed, (cpu, elapsed)      # it slept for its tokens
    series = [res.series[i] for i in range(res.nseries)]
    assert res.nseries == 2 and sum(s.ios for s in series) == res.ios
    assert series[0].ios <= 2001 and sum(s.bytes for s in series) == res.bytes
    assert all(s.lat_sum_ns > 0 for s in series)


@pytest.mark.parametrize("fields", [
    {"nbs": 2, "bs_lbas": [1, 8], "bs_pct": [50, 40], "block_lbas": 8},    # sum 90
    {"nbs": 1, "bs_lbas": [16], "bs_pct": [100], "block_lbas": 8},         # > block_lbas
    {"trim_pct": 60, "flush_pct": 50},
    {"trim_pct": 10, "verify": 1},
])
def test_worker_refuses_bad_mixes(sim: Any, fields: dict[str, Any]) -> None:  # noqa: F811
    rig = Rig(sim, depth=9)
    cfg, res = worker_cfg(rig, io_count=10, **fields)
    assert rig.lib.idma_worker_run(rig.q, cfg, res, rig.ffi.NULL) == rig.lib.IDMA_EINVAL


# ---- the Python layer ----------------------------------------------------------------------

class TrimSim(MediaSim):
    """MediaSim that also executes Dataset Management (deallocate: the ranges read back
    zeroes) and Flush, and records both."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks, read_bad=set(), write_bad=set())
        self.trimmed: list[tuple[int, int]] = []
        self.flushes = 0

    def _execute(self, q: dict[str, Any], sqe: bytes) -> None:
        cdw0, = struct.unpack_from("<I", sqe, 0)
        if cdw0 & 0xFF == 0x09:
            prp1, = struct.unpack_from("<Q", sqe, 24)
            nr = (struct.unpack_from("<I", sqe, 40)[0] & 0xFF) + 1
            for k in range(nr):
                _, nlb, slba = struct.unpack("<IIQ", _read(prp1 + 16 * k, 16))
                self.media[slba * LBA:(slba + nlb) * LBA] = bytes(nlb * LBA)
                self.trimmed.append((slba, nlb))
            self._post(q, cdw0 >> 16, 0)
            return
        if cdw0 & 0xFF == 0x00:
            self.flushes += 1
        super()._execute(q, sqe)


@pytest.fixture
def trim_ns() -> Iterator[tuple[SimNs, TrimSim]]:
    dev = TrimSim(2048)
    dev.start()
    dev.media[:] = b"\xa5" * len(dev.media)
    yield SimNs(SimCtrl(dev), 2048), dev
    dev.stop()


def test_randtrim_zeroes_only_the_region(trim_ns: tuple[SimNs, TrimSim]) -> None:
    ns, dev = trim_ns
    w = perf.Workload(rw="randtrim", bssplit=[(4096, 50), (16384, 50)], iodepth=8, runtime=0,
                      ios=300, offset=256 * LBA, size=512 * LBA)
    res = perf.run(ns, w)                   # type: ignore[arg-type]
    assert res.ok and res.ops["trim"].ios == 300 == len(dev.trimmed)
    assert all(256 <= s and s + n <= 768 for s, n in dev.trimmed)
    for s, n in dev.trimmed:
        assert not any(dev.media[s * LBA:(s + n) * LBA])
    assert dev.media[:256 * LBA] == b"\xa5" * 256 * LBA       # outside: untouched
    assert dev.media[768 * LBA:] == b"\xa5" * (2048 - 768) * LBA
    assert sum(res.bs_ios.values()) == 300 and set(res.bs_ios) == {4096, 16384}
    assert res.ops["trim"].bytes == sum(n for _, n in dev.trimmed) * LBA
    d = res.to_dict()
    assert d["trim"]["total_ios"] == 300 and d["read"]["total_ios"] == 0
    assert d["trim"]["lat_ns"]["percentile"]["50.000000"] > 0
    assert d["jobs"][0]["trim"]["total_ios"] == 300
    json.dumps(d)


def test_flush_mix_and_series(trim_ns: tuple[SimNs, TrimSim]) -> None:
    ns, dev = trim_ns
    w = perf.Workload(rw="randrw", flush_pct=25, iodepth=4, runtime=0, ios=400, numjobs=2)
    res = perf.run(ns, w)                   # type: ignore[arg-type]
    assert res.ok and res.ops["sync"].ios == dev.flushes
    assert abs(dev.flushes / 800 - 0.25) < 0.08
    assert res.ops["read"].ios + res.ops["write"].ios + dev.flushes == res.ios == 800
    assert sum(s.ios for s in res.series) == 800
    assert sum(s.bytes for s in res.series) == res.bytes
    d = res.to_dict()
    assert d["sync"]["total_ios"] == dev.flushes and len(d["jobs"]) == 2
    assert d["read"]["bw"] == round(res.ops["read"].bytes / 1024 / res.seconds)


def test_two_namespaces_results_each_and_combined(trim_ns: tuple[SimNs, TrimSim]) -> None:
    ns1, dev = trim_ns
    ns2 = SimNs(ns1.ctrl, 2048)
    ns2.nsid = 2
    w = perf.Workload(rw="randread", iodepth=4, runtime=0, ios=300)
    multi = perf.run_many([ns1, ns2], w)    # type: ignore[list-item]
    assert set(multi.namespaces) == {1, 2}
    assert [r.ios for r in multi.namespaces.values()] == [300, 300]
    assert multi.combined.ios == 600 and len(multi.combined.jobs) == 2 and not multi.problems
    assert ns1.ctrl.io_queues == {}         # every queue given back


class FakeNs:
    def __init__(self) -> None:
        self.nsid, self.blocks, self.lba_size, self.capacity = 1, 1024, 4096, 1024 * 4096
        self.ms, self.extended = 0, False           # no metadata
        self.ctrl = type("C", (), {"max_transfer": 128 << 10,
                                   "cap": type("Cap", (), {"mqes": 64})()})()


@pytest.mark.parametrize(("kw", "message"), [
    ({"bssplit": [(4096, 50), (8192, 40)]}, "--bssplit percentages add up to 90, not 100"),
    ({"bssplit": [(4096, 50), (6000, 50)]}, "--bssplit 6000 is not a multiple of the 4096"),
    ({"bssplit": [(4096, 50), (1 << 20, 50)]}, "--bssplit 1048576 exceeds the largest"),
    ({"trim_pct": 70, "flush_pct": 40}, "--trim_pct 70 + --flush_pct 40 exceed 100"),
    ({"rw": "randtrim", "verify": True}, "--verify checks fixed-size blocks"),
    ({"offset": 1023 * 4096, "size": 8192}, "whose size is 4194304 bytes"),
    ({"offset": 4 << 20}, "namespace 1, whose size is 4194304 bytes"),
    ({"size": 1000}, "--offset/--size must be multiples of 4096 bytes"),
])
def test_workload_errors_name_the_option(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as e:
        perf.check_workload(FakeNs(), perf.Workload(**kw))  # type: ignore[arg-type]
    assert message in str(e.value)


def test_bssplit_syntax() -> None:
    assert perf.parse_bssplit("4k/50:128k/50") == [(4096, 50), (131072, 50)]
    assert perf.parse_bssplit("512/10:1m/90") == [(512, 10), (1 << 20, 90)]
    for bad in ("4k", "4k/x", "4q/50", "4k/50:"):
        with pytest.raises(ValueError, match="--bssplit"):
            perf.parse_bssplit(bad)


def test_cli_options() -> None:
    a = build_parser().parse_args(
        ["perf", "00:04.0", "-n", "1,2", "--bssplit", "4k/50:128k/50", "--trim_pct", "10",
         "--flush-pct", "5", "--rate_iops", "100", "--offset", "1m", "--size", "8m"])
    assert (a.nsids, a.bssplit, a.trim_pct, a.flush_pct, a.rate_iops) == \
        ([1, 2], [(4096, 50), (131072, 50)], 10, 5, 100)
    assert (a.offset, a.size) == (1 << 20, 8 << 20)
    assert build_parser().parse_args(["perf", "00:04.0", "-n", "3", "--rw", "randtrim"]).rw \
        == "randtrim"


def test_spin_only_reaches_the_workload_and_needs_polling() -> None:
    from iommu_dma.cli.perf import workload

    args = build_parser().parse_args(["perf", "00:04.0", "-n", "1", "--spin-only"])
    w = workload(args)
    assert w.spin_only and w.wait == "poll"
    perf.check_mix(w)
    assert not workload(build_parser().parse_args(["perf", "00:04.0", "-n", "1"])).spin_only
    with pytest.raises(ValueError, match="--spin-only is for --wait poll; --wait interrupt"):
        perf.check_mix(perf.Workload(wait="interrupt", spin_only=True))


@pytest.mark.parametrize("argv", [["--bssplit", "4k:8k"], ["--trim_pct", "101"],
                                  ["-n", "1,1"], ["--rate_iops", "-3"]])
def test_cli_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["perf", "00:04.0", "-n", "1", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("usage:") is False



@pytest.mark.parametrize("fmt", ["normal", "json"])
def test_cli_runs_two_namespaces(trim_ns: tuple[SimNs, TrimSim], fmt: str,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from contextlib import contextmanager

    from iommu_dma.cli import perf as cli_perf
    from iommu_dma.cli.main import main

    ns1, _ = trim_ns
    ns2 = SimNs(ns1.ctrl, 2048)
    ns2.nsid = 2
    ctrl: Any = ns1.ctrl
    ctrl.namespace = {1: ns1, 2: ns2}.get

    @contextmanager
    def controller(bdf: str) -> Iterator[Any]:
        yield ctrl

    monkeypatch.setattr(cli_perf, "controller", controller)
    argv = ["perf", "00:04.0", "-n", "1,2", "--rw", "randrw", "--trim_pct", "10",
            "--bssplit", "4k/50:8k/50", "--iodepth", "2", "--runtime", "0.5", "--force",
            "-o", fmt]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "nsid 1,2: rw=randrw rwmixread=50 bssplit=4096/50:8192/50 trim_pct=10" in err
    if fmt == "json":
        j = json.loads(out)
        per = j["namespaces"]
        assert j["ios"] == per["1"]["ios"] + per["2"]["ios"] > 0
        assert j["trim"]["total_ios"] > 0 and len(j["jobs"]) == 2
        assert sum(s["ios"] for s in j["series"]) == j["ios"]
        assert sum(j["bssplit_ios"].values()) == j["ios"]
    else:
        assert out.startswith("namespace 1:\n") and "\ncombined:\n" in out
        assert "I/Os of 8192 bytes: " in out and "\ntrim " in out


def test_metadata_namespaces_are_refused_by_name() -> None:
    """The worker moves data only: a format with metadata is refused, naming the layout and
    the reformat command, before anything is sent."""
    ns = FakeNs()
    ns.ms, ns.extended = 16, True
    ns.ctrl.bdf = "0000:00:0b.0"
    with pytest.raises(ValueError, match=r"namespace 1 carries 16 bytes of metadata per block "
                                         r"\(extended LBAs\); the I/O worker moves data only.*"
                                         r"iommu-dma format 0000:00:0b.0 -n 1 --lbaf N"):
        perf.check_workload(ns, perf.Workload(rw="randread", runtime=1))  # type: ignore[arg-type]

"""`perf` under injected media errors (the "faults" bench): QEMU's blkdebug fails reads of LBAs
1000, 5000, 12000 and writes of LBA 3000 of controller 0's namespace 1 (4096-byte blocks).

perf at QD32 with verify goes on through them: each failed I/O is listed by LBA, blocks,
read/write and the spec's status name, every other I/O completes and verifies, and the run
fails (exit status 1, result not ok) with a summary naming them."""

from __future__ import annotations

import pytest

from iommu_dma import Controller
from iommu_dma.nvme import perf
from iommu_dma.testing.bench import Bench
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

BLOCK = 4096
SIZE = 12288 * BLOCK                # LBAs 0..12287: every injected LBA, more passes per second
READ_ERROR = "Unrecovered Read Error"
WRITE_FAULT = "Write Fault"
EXPECTED = {("read", 1000): (READ_ERROR, 2, 0x81), ("read", 5000): (READ_ERROR, 2, 0x81),
            ("read", 12000): (READ_ERROR, 2, 0x81), ("write", 3000): (WRITE_FAULT, 2, 0x80)}


def test_bench_injects_the_errors_this_file_expects(idma_bench: Bench,
                                                    any_driver: None) -> None:
    ns1 = idma_bench.controllers[0].namespaces[0]
    assert ns1.lba_size == BLOCK and ns1.size >= SIZE
    assert ns1.read_errors == (1000, 5000, 12000) and ns1.write_errors == (3000,)


def check_failed(failed: list[dict[str, object]], errors: int, passes: float) -> None:
    """Each listed failure is an injected one with its status; after enough sequential passes
    over the range (half reads, half writes, at random) every injected LBA is hit."""
    seen = {}
    for f in failed:
        key = (f["op"], f["lba"])
        assert key in EXPECTED, f"not an injected error: {f}"
        name, sct, sc = EXPECTED[key]                   # type: ignore[index]
        assert (f["name"], f["sct"], f["sc"], f["blocks"]) == (name, sct, sc, 1), f
        assert str(f["status"]).startswith(f"{name} (SCT {sct:#x}, SC {sc:#04x}"), f
        seen[key] = f["count"]
    assert seen and sum(seen.values()) == errors        # type: ignore[arg-type]
    if passes >= 6:                                     # a miss: 1 in 64 per LBA at most
        assert set(seen) == set(EXPECTED), seen


def test_perf_cli_reports_each_failed_io_and_exits_1(cli: Cli, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    with Controller.open(bdf) as c:
        assert c.identify.sn == "IDMAF000"
    r = cli("perf", bdf, "-n", "1", "--rw", "rw", "--iodepth", "32", "--verify", "--size", SIZE,
            "--runtime", "15", "--force", "-o", "json")
    print(r.text, r.err, sep="\n")
    assert r.rc == 1, r.err
    assert "Traceback" not in r.err
    j = r.json()
    assert j["ok"] is False and j["timed_out"] is False
    assert j["verify_failures"] == 0 and j["failed_ios_not_listed"] == 0
    assert j["ios"] >= 12288, j["ios"]                  # at least a pass over the range
    assert 0 < j["errors"] < j["ios"] // 100
    check_failed(j["failed_ios"], j["errors"], j["ios"] / 12288)
    assert j["bytes"] == (j["ios"] - j["errors"]) * BLOCK   # all the others completed
    last = r.err.splitlines()[-1]
    assert last.startswith(f"iommu-dma: error: perf: {j['errors']} I/O error(s): "), last
    for (op, lba), (name, _, _) in EXPECTED.items():
        assert f"{op} LBA {lba} (1 block): {name} (SCT 0x2, " in last, last
    assert len(j["problems"]) == 1                      # errors only: no timeout, no mismatch


def test_perf_cli_table_lists_the_failed_ios(cli: Cli, vfio_bdfs: list[str]) -> None:
    r = cli("perf", vfio_bdfs[0], "-n", "1", "--rw", "read", "--iodepth", "32", "--offset",
            4096 * BLOCK, "--size", 2048 * BLOCK, "--runtime", "3")
    print(r.text, r.err, sep="\n")
    assert r.rc == 1, r.err
    lines = r.text.splitlines()
    at = next(i for i, t in enumerate(lines) if t.startswith("Failed I/Os: "))
    assert lines[at + 1].split() == ["Op", "LBA", "Blocks", "Times", "Status"]
    row = lines[at + 3].split(None, 4)
    assert row[:3] == ["read", "5000", "1"] and row[4].startswith(f"{READ_ERROR} (SCT 0x2, "), row
    assert lines[at] == f"Failed I/Os: {row[3]} of {lines[at].split()[4]} (the others completed)"
    assert len(lines) == at + 4                         # only LBA 5000 in 4096..6143


def test_perf_api_lists_failed_ios_per_job(vfio_bdfs: list[str]) -> None:
    """Two jobs, each verifying its own half of the range; a fixed number of I/Os."""
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(1)
        w = perf.Workload(rw="rw", iodepth=32, runtime=0, ios=6 * 6144, numjobs=2,
                          verify=True, size=SIZE)
        res = perf.run(ns, w)
        # the controller works on afterwards, around the injected LBAs
        assert len(ns.read(999, 1)) == BLOCK and len(ns.read(1001, 1)) == BLOCK
    print(res.to_dict())
    assert not res.ok and not res.timed_out and res.ios == 2 * 6 * 6144
    assert res.verify_failures == 0 and res.failed_ios_not_listed == 0
    check_failed([f.to_dict() for f in res.failed_ios], res.errors, 6)
    assert res.bytes == (res.ios - res.errors) * BLOCK
    jobs = [j for j in res.jobs if isinstance(j, perf.JobResult)]
    assert len(jobs) == 2
    assert {f.lba for f in jobs[0].failed_ios} == {1000, 3000, 5000}   # LBAs 0..6143
    assert {f.lba for f in jobs[1].failed_ios} == {12000}              # LBAs 6144..12287
    assert res.problems == [perf.errors_phrase(res.errors, res.failed_ios, 0)]
    assert all(isinstance(f.error.name, str) for f in res.failed_ios)


def test_plain_read_run_counts_bytes_series_and_errors(vfio_bdfs: list[str]) -> None:
    """A run of reads only, of one size, without verify (the worker's plain path, whose bytes
    and per-second figures are derived from its I/O and error counts): sequential over LBAs
    4096..6143, so LBA 5000 fails once a pass."""
    with Controller.open(vfio_bdfs[0]) as c:
        ns = c.namespace(1)
        w = perf.Workload(rw="read", iodepth=16, runtime=0, ios=3 * 2048,
                          offset=4096 * BLOCK, size=2048 * BLOCK)
        res = perf.run(ns, w)
    assert res.ios == 3 * 2048 and res.errors == 3, (res.ios, res.errors)
    assert [(f.lba, f.count, f.error.name) for f in res.failed_ios] == [(5000, 3, READ_ERROR)]
    assert res.bytes == (res.ios - res.errors) * BLOCK
    assert sum(s.ios for s in res.series) == res.ios
    assert sum(s.bytes for s in res.series) == res.bytes

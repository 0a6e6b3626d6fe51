"""The ioworker's depth on the bench's emulated controller: block-size splits, trims and flushes,
the IOPS cap, the per-second series, regions and two namespaces in one run.

Assertions are statistics and counts, never speed: the split is checked within a tolerance
over thousands of I/Os; the cap is an upper bound computed from the worker's own count and its
own elapsed time (far below what the bench reaches); trimmed blocks are checked to read back
zeroes in the namespace's backing image (discard=unmap punches holes), blocks beside them to
keep what was written. Figures are printed (-rP).

This file owns ns1 LBAs 15360..16383 of the default bench."""

from __future__ import annotations

from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.nvme import perf
from iommu_dma.testing.bench import image_path
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm

BLOCK = 4096
FIRST, COUNT = 15360, 1024          # ns1 LBAs this file owns
OFFSET, SIZE = FIRST * BLOCK, COUNT * BLOCK


def image_bytes(images: Path, nsid: int, offset: int, length: int) -> bytes:
    with open(image_path(images, 0, nsid), "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_bssplit_sizes_follow_their_weights(ctrl: Controller) -> None:
    w = perf.Workload(rw="randread", bssplit=[(4096, 70), (65536, 30)], iodepth=8, runtime=0,
                      ios=3000, offset=OFFSET, size=SIZE)
    res = perf.run(ctrl.namespace(1), w)
    print(f"bssplit 4k/70:64k/30 QD8: {res.bs_ios} in {res.seconds:.2f} s, "
          f"{res.iops:.0f} IOPS, {res.mbps:.1f} MB/s")
    assert res.ok and res.ios == 3000, res.problems
    assert set(res.bs_ios) == {4096, 65536} and sum(res.bs_ios.values()) == 3000
    assert abs(res.bs_ios[4096] / 3000 - 0.7) < 0.04
    assert res.bytes == res.bs_ios[4096] * 4096 + res.bs_ios[65536] * 65536
    assert res.ops["read"].ios == 3000 and res.ops["read"].bytes == res.bytes


def test_rate_iops_caps_each_job(ctrl: Controller) -> None:
    cap = 150                               # the bench does thousands at QD4
    w = perf.Workload(rw="randread", iodepth=4, runtime=2.5, numjobs=2, rate_iops=cap,
                      offset=OFFSET, size=SIZE)
    res = perf.run(ctrl.namespace(1), w)
    jobs = [j for j in res.jobs if isinstance(j, perf.JobResult)]
    print(f"rate_iops {cap} x 2 jobs: " + ", ".join(
        f"{j.ios} I/Os in {j.elapsed_ns / 1e9:.2f} s" for j in jobs))
    assert res.ok and len(jobs) == 2, res.problems
    for j in jobs:
        assert 0 < j.ios <= cap * j.elapsed_ns / 1e9 + 1     # its own count, its own time
    assert sum(s.ios for s in res.series) == res.ios
    assert len(res.series) in (3, 4)        # seconds 0, 1, 2 (and the drain's)


def test_trimmed_blocks_read_back_zeroes_in_the_image(ctrl: Controller,
                                                      idma_bench_images: Path) -> None:
    ns = ctrl.namespace(1)
    pattern = bytes(range(256)) * (64 * BLOCK // 256)
    ns.write(FIRST, pattern + pattern)      # 128 blocks of data
    ns.flush()
    assert image_bytes(idma_bench_images, 1, FIRST * BLOCK, 64 * BLOCK) == pattern
    w = perf.Workload(rw="trim", bs=16384, iodepth=4, runtime=0, ios=16,
                      offset=FIRST * BLOCK, size=64 * BLOCK)    # the first 64 blocks, once
    res = perf.run(ns, w)
    print(f"trim 16k x 16: {res.ops['trim'].ios} trims, mean "
          f"{res.ops['trim'].lat_mean_ns / 1000:.1f} us")
    assert res.ok and res.ops["trim"].ios == 16 and res.ios == 16, res.problems
    assert res.ops["trim"].bytes == 64 * BLOCK
    assert image_bytes(idma_bench_images, 1, FIRST * BLOCK, 64 * BLOCK) == bytes(64 * BLOCK)
    assert ns.read(FIRST, 64) == bytes(64 * BLOCK)
    assert image_bytes(idma_bench_images, 1, (FIRST + 64) * BLOCK, 64 * BLOCK) == pattern


def test_mix_of_reads_writes_trims_and_flushes(ctrl: Controller) -> None:
    w = perf.Workload(rw="randrw", trim_pct=20, flush_pct=10, iodepth=8, runtime=0, ios=2000,
                      offset=OFFSET, size=SIZE)
    res = perf.run(ctrl.namespace(1), w)
    counts = {k: v.ios for k, v in res.ops.items()}
    print(f"randrw trim 20% flush 10%: {counts}")
    assert res.ok and sum(counts.values()) == res.ios == 2000, res.problems
    assert abs(counts["trim"] / 2000 - 0.2) < 0.05 and abs(counts["sync"] / 2000 - 0.1) < 0.04
    assert counts["read"] > 0 and counts["write"] > 0


def test_cli_two_namespaces_json(cli: Cli, vfio_bdfs: list[str]) -> None:  # noqa: F811
    bdf = vfio_bdfs[0]
    j = cli.ok("perf", bdf, "-n", "1,2", "--rw", "randread", "--bssplit", "4k/50:16k/50",
               "--iodepth", 4, "--runtime", 2, "--size", "4m", "-o", "json").json()
    per = j["namespaces"]
    print(f"-n 1,2: ns1 {per['1']['iops']:.0f} IOPS, ns2 {per['2']['iops']:.0f} IOPS, "
          f"combined {j['iops']:.0f}; series {[s['ios'] for s in j['series']]}")
    assert set(per) == {"1", "2"} and j["ios"] == per["1"]["ios"] + per["2"]["ios"] > 0
    assert j["read"]["total_ios"] == j["ios"] and j["write"]["total_ios"] == 0
    assert len(j["jobs"]) == 2 and j["read"]["lat_ns"]["percentile"]["99.000000"] > 0
    assert sum(s["ios"] for s in j["series"]) == j["ios"]
    assert j["workload"]["bssplit"] == [[4096, 50], [16384, 50]]
    cli.fails("perf", bdf, "-n", 1, "--offset", "1g", "--runtime", 1,
              message="whose size is 67108864 bytes")
    cli.fails("perf", bdf, "-n", 1, "--bssplit", "4k/50:8k/40", "--runtime", 1,
              message="add up to 90, not 100")

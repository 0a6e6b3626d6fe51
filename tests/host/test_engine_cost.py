"""The simulated controller of native/sim/ and the engine-cost benchmark built on it.

The engine built with IDMA_SIM_DEVICE (iommu_dma._native_sim) hands every doorbell write to a
controller that completes each command at once in the caller's thread. These tests drive that
build directly through its own ffi/lib (whatever engine IOMMU_DMA_NATIVE selects for the rest of
the suite) and check that the controller really completes what the engine submits: every CID
reaped once, counts right, phase tags across ring wraps, a full CQ held back. Then that
`python -m benchmarks.engine_cost` runs under callgrind and prints a figure (no threshold: the
figure is a measurement, not a test).
"""

from __future__ import annotations

import importlib
import json
import mmap
import random
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks import engine_cost

PAGE = 4096
BAR_SIZE = 16384
QID = 1


@pytest.fixture(scope="module")
def sim() -> Any:
    """The iommu_dma._native_sim module (built by the benchmark's helper when stale)."""
    engine_cost.ensure_sim_build()
    return importlib.import_module("iommu_dma._native_sim")


class Rig:
    """Queue pair qid 1 over anonymous memory, attached to a simulated controller."""

    def __init__(self, sim: Any, depth: int, with_qpair: bool = True) -> None:
        self.ffi, self.lib, self.depth = sim.ffi, sim.lib, depth
        self.maps: list[mmap.mmap] = []
        self.bar, self.bar_addr = self.mem(BAR_SIZE)
        self.sq, self.sq_addr = self.mem(depth * 64)
        self.cq, self.cq_addr = self.mem(depth * 16)
        self.lists, lists_addr = self.mem((depth - 1) * PAGE)
        self.data, self.data_addr = self.mem((depth - 1) * PAGE)
        ffi, lib = self.ffi, self.lib
        self.table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
        assert lib.idma_maptable_add(self.table, self.data_addr, (depth - 1) * PAGE) == 0
        self.dev = ffi.gc(lib.idma_sim_new(ffi.cast("uint8_t *", self.bar_addr), BAR_SIZE, 0),
                          lib.idma_sim_free)
        assert self.dev != ffi.NULL
        assert lib.idma_sim_attach(self.dev, QID, ffi.cast("void *", self.sq_addr),
                                   ffi.cast("void *", self.cq_addr), depth) == 0
        self.q = ffi.NULL
        if with_qpair:
            q = lib.idma_qpair_new(QID, depth, ffi.cast("void *", self.sq_addr),
                                   ffi.cast("void *", self.cq_addr),
                                   ffi.cast("uint8_t *", self.bar_addr), BAR_SIZE, 0, PAGE,
                                   ffi.cast("void *", lists_addr), depth - 1, self.table)
            assert q != ffi.NULL
            self.q = ffi.gc(q, lib.idma_qpair_free)

    def mem(self, size: int) -> tuple[mmap.mmap, int]:
        m = mmap.mmap(-1, (size + PAGE - 1) // PAGE * PAGE)
        self.maps.append(m)
        return m, int(self.ffi.cast("uintptr_t", self.ffi.from_buffer(m)))

    def info(self) -> Any:
        out = self.ffi.new("struct idma_sim_queue_info *")
        assert self.lib.idma_sim_queue_info(self.dev, QID, out) == 0
        return out

    def qinfo(self) -> Any:
        out = self.ffi.new("struct idma_qpair_info *")
        self.lib.idma_qpair_get_info(self.q, out)
        return out

    def submit_reads(self, tags: list[int]) -> int:
        n = len(tags)
        cmds = self.ffi.new("struct idma_sqe[]", n)
        ios = self.ffi.new("struct idma_io[]", n)
        for i, tag in enumerate(tags):
            cmds[i].cdw0 = 0x02                     # Read
            cmds[i].nsid = 1
            cmds[i].cdw10 = tag * 8
            slot = (tag - 1) % (self.depth - 1)
            ios[i].buf, ios[i].len, ios[i].tag = self.data_addr + slot * PAGE, PAGE, tag
        return int(self.lib.idma_qpair_submit(self.q, cmds, ios, n))

    def poll(self) -> list[tuple[int, int, int]]:
        out = self.ffi.new("struct idma_cpl[]", self.depth)
        n = self.lib.idma_qpair_poll(self.q, out, self.depth)
        assert n >= 0
        return [(int(out[i].tag), int(out[i].cid), int(out[i].status)) for i in range(n)]

    def cqe(self, slot: int) -> tuple[int, int, int, int, int]:
        """(dw0, sq_head, sq_id, cid, status word) of a CQ slot."""
        dw0, _, sq_head, sq_id, cid, status = struct.unpack_from("<IIHHHH", self.cq, slot * 16)
        return dw0, sq_head, sq_id, cid, status


def sqe_cid(rig: Rig, slot: int) -> int:
    return int(struct.unpack_from("<I", rig.sq, slot * 64)[0] >> 16)


def test_every_submitted_command_completes_at_once(sim: Any) -> None:
    rig = Rig(sim, depth=8)
    assert rig.submit_reads([1, 2, 3, 4, 5]) == 5
    info = rig.info()
    assert (info.fetched, info.reads, info.sq_doorbells, info.sq_head) == (5, 5, 1, 5)
    for slot in range(5):                       # posted before the engine looked, as a
        dw0, sq_head, sq_id, cid, status = rig.cqe(slot)    # controller writes them (§4.6):
        assert (dw0, sq_head, sq_id, cid, status) == (      # SQ head after that fetch
            0, slot + 1, QID, sqe_cid(rig, slot), 1)
    assert rig.cqe(5)[4] == 0                   # nothing past what was submitted
    got = rig.poll()
    assert sorted(t for t, _, _ in got) == [1, 2, 3, 4, 5]
    assert [c for _, c, _ in got] == [sqe_cid(rig, s) for s in range(5)]
    assert all(st == 0 for _, _, st in got)
    q = rig.qinfo()
    assert (q.submitted, q.completed, q.spurious, q.free, q.sq_head) == (5, 5, 0, 7, 5)
    assert rig.info().cq_head == 5 and rig.info().cq_doorbells == 1


def test_many_laps_reap_every_cid_once(sim: Any) -> None:
    """Random batch sizes over many laps of a small ring: phase tags flip at each wrap, every
    command comes back exactly once with the CID the engine gave it."""
    rig = Rig(sim, depth=5)
    rng = random.Random(7)
    next_tag, submitted, reaped = 1, 0, []
    for _ in range(300):
        tags = list(range(next_tag, next_tag + rng.randint(1, 4)))
        k = rig.submit_reads(tags)
        assert k == len(tags)                   # everything reaped each round: all free
        next_tag += k
        submitted += k
        got = rig.poll()
        assert len(got) == k and all(st == 0 for _, _, st in got)
        reaped += [t for t, _, _ in got]
    assert reaped == list(range(1, submitted + 1))
    info, q = rig.info(), rig.qinfo()
    assert info.fetched == q.completed == submitted
    assert q.spurious == 0 and q.free == 4 and info.cq_full == 0 and info.bad_doorbells == 0
    assert info.phase == q.phase                # both sides agree after many wraps


def test_full_cq_holds_commands_until_the_head_moves(sim: Any) -> None:
    """The controller keeps one CQ slot empty: with no CQ head doorbell, commands past that
    wait in the SQ and are completed when the head doorbell makes room."""
    rig = Rig(sim, depth=4, with_qpair=False)
    ffi, lib = rig.ffi, rig.lib
    sq_db = ffi.cast("uint32_t *", rig.bar_addr + lib.idma_sq_doorbell_offset(QID, 0))
    cq_db = ffi.cast("uint32_t *", rig.bar_addr + lib.idma_cq_doorbell_offset(QID, 0))
    for slot in range(4):
        struct.pack_into("<I", rig.sq, slot * 64, 0x02 | (0x100 + slot) << 16)
    lib.idma_sim_doorbell(sq_db, 3)             # 3 commands: the CQ (4 slots) is then full
    assert rig.info().fetched == 3 and rig.info().cq_full == 0
    struct.pack_into("<I", rig.sq, 3 * 64, 0x02 | 0x103 << 16)
    lib.idma_sim_doorbell(sq_db, 0)             # a 4th: no room until the head moves
    info = rig.info()
    assert (info.fetched, info.cq_full, info.sq_head, info.sq_tail) == (3, 1, 3, 0)
    assert int(ffi.cast("uint32_t *", sq_db)[0]) == 0       # the store itself happened
    lib.idma_sim_doorbell(cq_db, 2)             # two CQEs consumed
    info = rig.info()
    assert (info.fetched, info.sq_head, info.cq_tail, info.phase) == (4, 0, 0, 0)
    assert rig.cqe(3)[3:] == (0x103, 1)         # CID, phase 1: last slot of the first lap
    lib.idma_sim_doorbell(sq_db, 9)             # not a ring position: ignored and counted
    assert rig.info().bad_doorbells == 1 and rig.info().fetched == 4


def test_worker_runs_on_the_simulated_controller(sim: Any) -> None:
    rig = Rig(sim, depth=9)
    ffi, lib = rig.ffi, rig.lib
    cfg = ffi.new("struct idma_worker_cfg *")
    cfg.nsid, cfg.lba_size, cfg.block_lbas, cfg.qd, cfg.read_pct = 1, 4096, 1, 8, 100
    cfg.random, cfg.lba_count, cfg.io_count, cfg.seed = 1, 1 << 20, 1000, 1
    cfg.buf, cfg.irq_fd = rig.data_addr, -1
    res = ffi.new("struct idma_worker_result *")
    assert lib.idma_worker_run(rig.q, cfg, res, ffi.NULL) == 0
    assert (res.ios, res.reads, res.errors, res.timed_out) == (1000, 1000, 0, 0)
    info, q = rig.info(), rig.qinfo()
    assert info.fetched == info.reads == q.completed == 1000
    assert q.spurious == 0 and q.free == q.trackers


@pytest.fixture
def callgrind() -> Iterator[None]:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (make setup installs it: Debian valgrind)")
    yield


def test_benchmark_prints_instructions_per_io(callgrind: None) -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks.engine_cost", "--ios", "200"],
                       cwd=engine_cost.ROOT, env=engine_cost.clean_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^RESULT (.*)$", p.stdout, re.M)
    assert m, p.stdout
    figures = json.loads(m.group(1))
    assert set(figures) == {c.name for c in engine_cost.CASES}
    assert all(isinstance(v, float) and v > 0 for v in figures.values()), figures
    assert re.search(r"^C worker QD1\s+[\d.]+\s+<= 200\b", p.stdout, re.M), p.stdout

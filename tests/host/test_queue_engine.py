"""The native queue pair engine against a device simulated in ordinary memory.

Rings, PRP list pages and an 8 KiB "BAR0" live in anonymous mmaps (page aligned, IOVA = VA);
the tests play the controller: read SQEs and doorbells, write CQEs with the phase tag.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from iommu_dma.errors import ClosedError
from iommu_dma.memory import DmaAllocator
from iommu_dma.native import ffi, lib
from iommu_dma.nvme import perf
from iommu_dma.nvme import sqe as S
from iommu_dma.nvme.ioqueue import IoQueue
from iommu_dma.nvme.queue import (
    EALIGN,
    ETIMEDOUT,
    ETOOBIG,
    EUNMAPPED,
    Command,
    Completion,
    QueueError,
    QueuePair,
    WorkerConfig,
    new_progress,
    run_worker,
)
from tests.host.sim_nvme import BAR_SIZE as SIM_BAR_SIZE
from tests.host.sim_nvme import LBA as SIM_LBA
from tests.host.sim_nvme import SimController, SimIommu, attach_queue

PAGE = 4096
DSTRD = 0
BAR0_SIZE = 8192


class Mem:
    """Page-aligned anonymous memory with its address (IOVA = VA)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.cbuf = ffi.from_buffer(self.map)
        self.addr = int(ffi.cast("uintptr_t", self.cbuf))

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.map, off)[0]

    def read(self, addr: int, n: int) -> bytes:
        return bytes(ffi.buffer(ffi.cast("char *", addr), n))

    def write(self, addr: int, data: bytes) -> None:
        ffi.memmove(ffi.cast("char *", addr), data, len(data))


class FakeDevice:
    """Just enough of a controller: consumes SQEs up to the tail doorbell, posts CQEs."""

    def __init__(self, qid: int, depth: int, sq: Mem, cq: Mem, bar: Mem) -> None:
        self.qid, self.depth, self.sq, self.cq, self.bar = qid, depth, sq, cq, bar
        self.sq_head = 0
        self.cq_tail = 0
        self.phase = 1
        self.sqdb = lib.idma_sq_doorbell_offset(qid, DSTRD)
        self.cqdb = lib.idma_cq_doorbell_offset(qid, DSTRD)

    @property
    def sq_tail(self) -> int:
        return self.bar.u32(self.sqdb)

    @property
    def cq_head(self) -> int:
        return self.bar.u32(self.cqdb)

    def fetch(self) -> list[S.Sqe]:
        """Every SQE between our head and the host's tail doorbell."""
        out = []
        tail = self.sq_tail
        while self.sq_head != tail:
            off = self.sq_head * 64
            out.append(S.Sqe.unpack(bytes(self.sq.map[off:off + 64])))
            self.sq_head = (self.sq_head + 1) % self.depth
        return out

    def echo_until(self, stop: threading.Event, period: float) -> None:
        """Complete every fetched command with success, polling every period s, until stop."""
        while not stop.is_set():
            for e in self.fetch():
                self.post(e.cid)
            time.sleep(period)

    def post(self, cid: int, status: int = 0, result: int = 0) -> None:
        """Write a CQE (NVMe 2.0 §4.6) with the current phase, then advance the tail."""
        dw3 = cid | self.phase << 16 | status << 17
        entry = struct.pack("<IIHHI", result, 0, self.sq_head, self.qid, dw3)
        off = self.cq_tail * 16
        self.cq.map[off:off + 12] = entry[:12]
        self.cq.map[off + 12:off + 16] = entry[12:]     # DW3 (phase) last, as a device does
        self.cq_tail += 1
        if self.cq_tail == self.depth:
            self.cq_tail, self.phase = 0, self.phase ^ 1


class Rig:
    def __init__(self, depth: int, qid: int = 1, list_pages: int | None = None,
                 maptable: Any = None) -> None:
        self.sq, self.cq = Mem(depth * 64), Mem(max(depth * 16, PAGE))
        self.bar = Mem(BAR0_SIZE)
        pages = depth - 1 if list_pages is None else list_pages
        self.lists = Mem(max(pages, 1) * PAGE)
        self.qp = QueuePair(qid, depth, self.sq.addr, self.cq.addr, self.bar.addr, BAR0_SIZE,
                            dstrd=DSTRD,
                            list_addr=self.lists.addr if pages else 0, list_pages=pages,
                            maptable=maptable)
        self.dev = FakeDevice(qid, depth, self.sq, self.cq, self.bar)
        self.data = Mem(1 << 20)


@pytest.fixture
def rig() -> Rig:
    return Rig(depth=16)


def test_doorbell_offsets() -> None:
    assert lib.idma_sq_doorbell_offset(0, 0) == 0x1000
    assert lib.idma_cq_doorbell_offset(0, 0) == 0x1004
    assert lib.idma_sq_doorbell_offset(3, 0) == 0x1000 + 6 * 4
    assert lib.idma_cq_doorbell_offset(3, 2) == 0x1000 + 7 * 16


def test_bad_arguments_refused() -> None:
    sq, cq, bar = Mem(PAGE), Mem(PAGE), Mem(BAR0_SIZE)
    b, size = bar.addr, BAR0_SIZE
    with pytest.raises(ValueError, match="depth 1"):
        QueuePair(1, 1, sq.addr, cq.addr, b, size)
    with pytest.raises(ValueError, match="SQ at"):
        QueuePair(1, 8, sq.addr + 64, cq.addr, b, size)
    with pytest.raises(ValueError, match="page size 6000"):
        QueuePair(1, 8, sq.addr, cq.addr, b, size, page_size=6000)
    with pytest.raises(ValueError, match="3 PRP list pages for 7 trackers"):
        QueuePair(1, 8, sq.addr, cq.addr, b, size, list_addr=sq.addr, list_pages=3)


def test_submit_fills_ring_cids_prps_and_rings_once(rig: Rig) -> None:
    d = rig.data.addr
    cmds = [Command(S.read(1, 0, 1), d, 512, 100),                 # one page: PRP1 only
            Command(S.write(1, 8, 16), d + PAGE, 2 * PAGE, 101),    # two pages: PRP2 is data
            Command(S.read(1, 64, 24), d + 4 * PAGE + 0x200, 3 * PAGE, 102),   # a PRP list
            Command(S.flush(1), 0, 0, 103)]                         # no data
    assert rig.qp.submit(cmds) == 4
    info = rig.qp.info()
    assert info["sq_doorbells"] == 1 and rig.dev.sq_tail == 4 == info["sq_tail"]
    got = rig.dev.fetch()
    assert [e.opcode for e in got] == [S.OPC_READ, S.OPC_WRITE, S.OPC_READ, S.OPC_FLUSH]
    assert len({e.cid for e in got}) == 4 and all(e.cid < 15 for e in got)   # generation 0
    assert (got[0].prp1, got[0].prp2) == (d, 0)
    assert (got[1].prp1, got[1].prp2) == (d + PAGE, d + 2 * PAGE)
    assert got[2].prp1 == d + 4 * PAGE + 0x200
    lst = got[2].prp2
    assert lst % PAGE == 0 and rig.lists.addr <= lst < rig.lists.addr + rig.lists.size
    entries = struct.unpack("<3Q", rig.dev.sq.read(lst, 24))
    assert entries == (d + 5 * PAGE, d + 6 * PAGE, d + 7 * PAGE)
    assert (got[3].prp1, got[3].prp2) == (0, 0)
    # the rest of each SQE is the caller's
    assert (got[1].nsid, got[1].cdw10, got[1].cdw12) == (1, 8, 15)


def test_poll_returns_tags_results_and_status(rig: Rig) -> None:
    d = rig.data.addr
    rig.qp.submit([Command(S.read(1, i, 1), d, 512, 1000 + i) for i in range(3)])
    got = rig.dev.fetch()
    assert rig.qp.poll() == []                       # nothing posted yet
    err = S.make_status(0x81, S.SCT_MEDIA, dnr=True, more=True)    # unrecovered read error
    rig.dev.post(got[1].cid, status=err)
    rig.dev.post(got[0].cid, result=0xABCD)
    cpl = rig.qp.poll()
    assert cpl == [Completion(1001, 0, got[1].cid, err),
                   Completion(1000, 0xABCD, got[0].cid, 0)]
    st = cpl[0].decoded()
    assert (st.sc, st.sct, st.more, st.dnr, st.crd) == (0x81, 2, True, True, 0)
    assert not cpl[0].ok and cpl[1].ok
    assert rig.dev.cq_head == 2 and rig.qp.info()["cq_doorbells"] == 1
    assert rig.qp.inflight == 1
    rig.dev.post(got[2].cid)
    assert [c.tag for c in rig.qp.poll()] == [1002]
    info = rig.qp.info()
    assert info["cq_doorbells"] == 2 and info["sq_head"] == 3 and info["free"] == 15


def test_poll_max_leaves_the_rest(rig: Rig) -> None:
    rig.qp.submit([Command(S.flush(1), 0, 0, i) for i in range(5)])
    for e in rig.dev.fetch():
        rig.dev.post(e.cid)
    assert [c.tag for c in rig.qp.poll(2)] == [0, 1]
    assert rig.dev.cq_head == 2
    assert [c.tag for c in rig.qp.poll()] == [2, 3, 4]
    assert rig.dev.cq_head == 5


def test_phase_wraps_over_several_laps() -> None:
    r = Rig(depth=4)
    tags: list[int] = []
    next_tag = 0
    for lap in range(7):                         # 7 * 5 = 35 commands over a 4-entry ring
        batch = [Command(S.flush(1), 0, 0, next_tag + i) for i in range(5)]
        next_tag += 5
        while batch:
            n = r.qp.submit(batch)
            assert n <= 3
            batch = batch[n:]
            for e in r.dev.fetch():
                r.dev.post(e.cid, result=lap)
            tags += [c.tag for c in r.qp.poll()]
            assert r.dev.cq_head == r.dev.cq_tail
    assert tags == list(range(35))
    info = r.qp.info()
    assert info["completed"] == 35 and info["phase"] == (1 if (35 // 4) % 2 == 0 else 0)
    assert info["sq_tail"] == 35 % 4 == info["cq_head"]


def test_back_pressure_partial_submit_loses_nothing() -> None:
    r = Rig(depth=8)                             # 7 trackers
    cmds = [Command(S.read(1, i, 1), r.data.addr + i * 512, 512, i) for i in range(20)]
    assert r.qp.submit(cmds) == 7
    assert r.qp.submit(cmds[7:]) == 0            # full: nothing taken, nothing lost
    assert r.qp.info()["sq_doorbells"] == 1      # a call that queued nothing does not ring
    seen: list[int] = []
    pending = cmds[7:]
    while len(seen) < 20:
        got = r.dev.fetch()
        for e in got:
            r.dev.post(e.cid)
        seen += [c.tag for c in r.qp.poll()]
        pending = pending[r.qp.submit(pending):]
    assert sorted(seen) == list(range(20)) and not pending and r.qp.inflight == 0


def test_unmapped_buffer_refused_before_the_device() -> None:
    table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
    r = Rig(depth=8, maptable=table)
    d = r.data.addr
    assert lib.idma_maptable_add(table, d, 64 * 1024) == 0
    good = Command(S.read(1, 0, 8), d, PAGE, 1)
    crossing = Command(S.read(1, 0, 8), d + 60 * 1024, 8 * 1024, 2)   # runs past the mapping
    with pytest.raises(QueueError) as exc:
        r.qp.submit([good, crossing])
    assert exc.value.rc == EUNMAPPED == lib.IDMA_EUNMAPPED and exc.value.index == 1
    info = r.qp.info()
    assert info["sq_tail"] == 0 and info["sq_doorbells"] == 0 and info["free"] == 7
    assert r.dev.sq_tail == 0
    assert r.qp.submit([good]) == 1


def test_misaligned_and_too_big_refused() -> None:
    r = Rig(depth=4, list_pages=0)               # no PRP lists: at most two pages
    with pytest.raises(QueueError) as exc:
        r.qp.submit([Command(S.read(1, 0, 1), r.data.addr + 2, 512, 0)])
    assert exc.value.rc == EALIGN
    with pytest.raises(QueueError) as exc:
        r.qp.submit([Command(S.read(1, 0, 24), r.data.addr, 3 * PAGE, 0)])
    assert exc.value.rc == ETOOBIG
    assert r.qp.submit([Command(S.read(1, 0, 16), r.data.addr, 2 * PAGE, 0)]) == 1


def test_two_mib_transfer_uses_one_list_page(rig: Rig) -> None:
    big = Mem(2 << 20)
    assert rig.qp.submit([Command(S.read(1, 0, 512), big.addr, 2 << 20, 7)]) == 1
    e = rig.dev.fetch()[0]
    assert e.prp1 == big.addr
    entries = struct.unpack("<511Q", rig.dev.sq.read(e.prp2, 511 * 8))
    assert entries == tuple(big.addr + i * PAGE for i in range(1, 512))


def test_spurious_cid_is_skipped(rig: Rig) -> None:
    rig.qp.submit([Command(S.flush(1), 0, 0, 5)])
    e = rig.dev.fetch()[0]
    rig.dev.post(14)                             # a CID not in flight
    rig.dev.post(e.cid)
    assert [c.tag for c in rig.qp.poll()] == [5]
    assert rig.qp.info()["spurious"] == 1 and rig.dev.cq_head == 2


def test_wait_times_out_and_caps_min(rig: Rig) -> None:
    assert rig.qp.wait(5, timeout=0.0) == []     # nothing in flight: returns at once
    rig.qp.submit([Command(S.flush(1), 0, 0, 1)])
    t0 = time.monotonic()
    assert rig.qp.wait(1, timeout=0.05) == []
    assert 0.04 < time.monotonic() - t0 < 1.0


def test_wait_releases_the_gil(rig: Rig) -> None:
    """A Python thread plays the device while the C busy-wait runs: only possible when
    cffi released the GIL around the call."""
    rig.qp.submit([Command(S.flush(1), 0, 0, i) for i in range(4)])

    def device() -> None:
        time.sleep(0.05)
        for e in rig.dev.fetch():
            rig.dev.post(e.cid)

    t = threading.Thread(target=device)
    t.start()
    got = rig.qp.wait(4, timeout=5.0)
    t.join()
    assert sorted(c.tag for c in got) == [0, 1, 2, 3]


def test_run_helper_submits_everything() -> None:
    r = Rig(depth=4)
    stop = threading.Event()
    t = threading.Thread(target=r.dev.echo_until, args=(stop, 0.0005))
    t.start()
    try:
        got = r.qp.run([Command(S.flush(1), 0, 0, i) for i in range(10)], timeout=10)
    finally:
        stop.set()
        t.join()
    assert sorted(c.tag for c in got) == list(range(10))


# ---- worker helpers ----

def test_pattern_fill_and_check() -> None:
    lba_size, n = 512, 4
    buf = ffi.new("uint64_t[]", lba_size * n // 8)
    lib.idma_pattern_fill(buf, 1000, n, lba_size, 0xFEED)
    assert buf[0] == 0xFEED ^ (1000 << 16)
    assert buf[lba_size // 8 + 3] == 0xFEED ^ (1001 << 16 | 3)
    first = ffi.new("uint64_t *")
    assert lib.idma_pattern_check(buf, 1000, n, lba_size, 0xFEED, first) == 0
    assert lib.idma_pattern_check(buf, 1001, n, lba_size, 0xFEED, first) == n  # shifted
    buf[2 * lba_size // 8 + 10] ^= 1                                          # LBA 1002
    assert lib.idma_pattern_check(buf, 1000, n, lba_size, 0xFEED, first) == 1
    assert first[0] == 1002
    assert lib.idma_pattern_check(buf, 1000, n, lba_size, 0xBEEF, first) == n  # other seed


def test_hist_buckets_are_log_linear() -> None:
    assert [lib.idma_hist_bucket(v) for v in (0, 1, 31)] == [0, 1, 31]
    assert lib.idma_hist_bucket(32) == 32 and lib.idma_hist_bucket(63) == 63
    assert lib.idma_hist_bucket(64) == 64 and lib.idma_hist_bucket(65) == 64
    assert lib.idma_hist_bucket(2**64 - 1) == lib.IDMA_HIST_BUCKETS - 1
    prev_high = -1
    for i in range(lib.IDMA_HIST_BUCKETS):       # buckets tile the whole 64-bit range
        low, high = lib.idma_hist_low(i), lib.idma_hist_high(i)
        assert low == prev_high + 1 and high >= low
        assert lib.idma_hist_bucket(low) == i == lib.idma_hist_bucket(high)
        if low >= 64:
            assert (high - low + 1) / low <= 1 / 32     # ~3 % resolution
        prev_high = high
    assert prev_high == 2**64 - 1


def hist_of(values: list[int]) -> Any:
    h = ffi.new("uint64_t[]", lib.IDMA_HIST_BUCKETS)
    for v in values:
        h[lib.idma_hist_bucket(v)] += 1
    return h


def test_hist_percentiles_nearest_rank() -> None:
    values = list(range(1, 1001))                # 1..1000 ns
    h = hist_of(values)
    for pct, exact in ((50.0, 500), (99.0, 990), (99.9, 999), (100.0, 1000)):
        got = lib.idma_hist_percentile(h, pct, 1000)
        b = lib.idma_hist_bucket(exact)
        assert got == min(lib.idma_hist_high(b), 1000)
        assert exact <= got <= exact * 1.04
    assert lib.idma_hist_percentile(hist_of([]), 50.0, 0) == 0
    one = hist_of([123456])
    assert lib.idma_hist_percentile(one, 99.9, 123456) == 123456   # capped at max


def test_hist_summarize() -> None:
    res = ffi.new("struct idma_worker_result *")
    values = [1000] * 990 + [50000] * 9 + [2000000]
    for v in values:
        res.hist[lib.idma_hist_bucket(v)] += 1
    res.lat_min_ns, res.lat_max_ns = 1000, 2000000
    lib.idma_hist_summarize(res, sum(values))
    assert res.lat_avg_ns == sum(values) // len(values)
    assert res.lat_p50_ns == lib.idma_hist_high(lib.idma_hist_bucket(1000))
    assert res.lat_p99_ns == lib.idma_hist_high(lib.idma_hist_bucket(1000))
    assert res.lat_p999_ns == lib.idma_hist_high(lib.idma_hist_bucket(50000))


# ---- the worker loop against a simulated NVM device thread ----

class DiskDevice:
    """A device thread executing Read/Write against an in-memory namespace via the PRPs."""

    def __init__(self, rig: Rig, lba_size: int, nlbas: int, fail_lba: int = -1) -> None:
        self.rig, self.lba_size, self.fail_lba = rig, lba_size, fail_lba
        self.disk = bytearray(lba_size * nlbas)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ops = 0

    def __enter__(self) -> DiskDevice:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _segments(self, e: S.Sqe, length: int) -> Iterator[tuple[int, int]]:
        """(address, bytes) of the data, following PRP1, PRP2 and the PRP list."""
        first = min(PAGE - e.prp1 % PAGE, length)
        yield e.prp1, first
        left = length - first
        if left == 0:
            return
        if left <= PAGE:
            yield e.prp2, left
            return
        n = (left + PAGE - 1) // PAGE
        for i, page in enumerate(struct.unpack(f"<{n}Q", self.rig.sq.read(e.prp2, 8 * n))):
            yield page, min(PAGE, left - i * PAGE)

    def _execute(self, e: S.Sqe) -> int:
        slba, nlb = e.cdw10 | e.cdw11 << 32, (e.cdw12 & 0xFFFF) + 1
        if slba <= self.fail_lba < slba + nlb:
            return S.make_status(0x81, S.SCT_MEDIA)
        pos = slba * self.lba_size
        for addr, n in self._segments(e, nlb * self.lba_size):
            if e.opcode == S.OPC_WRITE:
                self.disk[pos:pos + n] = self.rig.sq.read(addr, n)
            else:
                self.rig.sq.write(addr, bytes(self.disk[pos:pos + n]))
            pos += n
        return 0

    def _run(self) -> None:
        dev = self.rig.dev
        while not self.stop.is_set():
            got = dev.fetch()
            for e in got:
                dev.post(e.cid, status=self._execute(e))
                self.ops += 1
            if not got:
                time.sleep(0.0001)


def test_worker_write_then_verify_reads() -> None:
    lba, blk, qd, nlbas = 512, 16, 4, 256       # 8 KiB I/Os: PRP1 + PRP2
    r = Rig(depth=8)
    buf = Mem(qd * blk * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr,
                       block_lbas=blk, qd=qd, read_pct=0, verify=True, io_count=nlbas // blk,
                       seed=42)
    with DiskDevice(r, lba, nlbas) as dev:
        res = run_worker(r.qp, cfg)
        assert res.rc == 0 and res.writes == 16 and res.errors == 0
        assert res.bytes == nlbas * lba
        first = ffi.new("uint64_t *")
        assert lib.idma_pattern_check(ffi.from_buffer(dev.disk), 0, nlbas, lba, 42, first) == 0
        cfg.read_pct, cfg.random, cfg.verify_all, cfg.io_count = 100, True, True, 200
        res = run_worker(r.qp, cfg)
        assert res.rc == 0 and res.reads == 200 and res.verify_failures == 0
        dev.disk[5 * lba + 7] ^= 0xFF                              # corrupt LBA 5
        cfg.random, cfg.io_count = False, 16
        res = run_worker(r.qp, cfg)
        assert res.verify_failures == 1 and res.first_verify_lba == 5
    assert res.lat_min_ns <= res.lat_p50_ns <= res.lat_p99_ns <= res.lat_max_ns
    assert sum(res.hist.values()) == res.ios


def test_worker_mixed_random_with_list_prps_and_errors() -> None:
    lba, blk, qd, nlbas = 512, 24, 6, 24 * 32    # 12 KiB I/Os at an offset: a PRP list
    r = Rig(depth=8)
    buf = Mem(qd * blk * lba + PAGE)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr + 512,
                       block_lbas=blk, qd=qd, read_pct=50, random=True, verify=True,
                       io_count=300, seed=7)
    with DiskDevice(r, lba, nlbas, fail_lba=24 * 3 + 1):
        res = run_worker(r.qp, cfg)
    assert res.rc == 0 and res.ios == 300 == res.reads + res.writes
    assert res.verify_failures == 0 and res.reads > 0 and res.writes > 0
    assert res.errors > 0 and res.first_error_lba == 24 * 3
    assert S.decode_status(res.first_error_status).sct == S.SCT_MEDIA
    assert res.bytes == (300 - res.errors) * blk * lba
    assert r.qp.inflight == 0


def test_worker_progress_and_stop_from_another_thread() -> None:
    lba, nlbas = 512, 64
    r = Rig(depth=4)
    buf = Mem(3 * lba)
    prog = new_progress()
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr, qd=3,
                       read_pct=70, duration=30.0)
    out: list[Any] = []
    with DiskDevice(r, lba, nlbas):
        t = threading.Thread(target=lambda: out.append(run_worker(r.qp, cfg, prog)))
        t.start()
        deadline = time.monotonic() + 10
        while prog.ios < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = prog.ios
        prog.stop = 1
        t.join(10)
    assert not t.is_alive() and seen >= 50
    res = out[0]
    assert res.rc == 0 and res.ios >= seen and prog.running == 0 and prog.ios == res.ios
    assert res.elapsed_ns < 30e9 and r.qp.inflight == 0


def test_worker_refuses_bad_config_and_reports_unmapped() -> None:
    r = Rig(depth=4)
    buf = Mem(PAGE)
    with pytest.raises(QueueError):              # qd larger than the trackers
        run_worker(r.qp, WorkerConfig(nsid=1, lba_size=512, lba_count=8, buf_addr=buf.addr,
                                      qd=4, io_count=1))
    table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
    r2 = Rig(depth=4, maptable=table)
    res = run_worker(r2.qp, WorkerConfig(nsid=1, lba_size=512, lba_count=8,
                                         buf_addr=buf.addr, io_count=4))
    assert res.rc == EUNMAPPED and res.ios == 0 and r2.dev.sq_tail == 0


def test_worker_needs_an_idle_queue_and_times_out_on_a_silent_device() -> None:
    r = Rig(depth=4)
    buf = Mem(PAGE)
    cfg = WorkerConfig(nsid=1, lba_size=512, lba_count=8, buf_addr=buf.addr, qd=2,
                       io_count=4, io_timeout=0.05)
    r.qp.submit([Command(S.flush(1), 0, 0, 99)])
    with pytest.raises(QueueError):              # someone else's command is in flight
        run_worker(r.qp, cfg)
    r.dev.post(r.dev.fetch()[0].cid)
    assert [c.tag for c in r.qp.poll()] == [99]
    res = run_worker(r.qp, cfg)                  # nobody answers
    assert res.rc == ETIMEDOUT and res.timed_out and res.ios == 0 and r.qp.inflight == 2


# ---- shadow doorbells, deferred CQ head, batch fast path ----

class Shadow:
    """The Doorbell Buffer Config pages (NVMe Base 2.0 §5.8) as the fake controller sees them."""

    def __init__(self, qid: int) -> None:
        self.db, self.ei = Mem(PAGE), Mem(PAGE)
        self.sq_off = lib.idma_sq_doorbell_offset(qid, DSTRD) - 0x1000
        self.cq_off = lib.idma_cq_doorbell_offset(qid, DSTRD) - 0x1000

    def sq_tail(self) -> int:
        return self.db.u32(self.sq_off)

    def cq_head(self) -> int:
        return self.db.u32(self.cq_off)

    def set_sq_ei(self, v: int) -> None:
        struct.pack_into("<I", self.ei.map, self.sq_off, v)

    def set_cq_ei(self, v: int) -> None:
        struct.pack_into("<I", self.ei.map, self.cq_off, v)


def test_shadow_doorbells_follow_the_eventidx_rule() -> None:
    r = Rig(depth=16, qid=3)
    sh = Shadow(3)
    sh.set_sq_ei(9)                                 # stale EventIdx of an earlier queue
    r.qp.set_shadow(sh.db.addr, sh.ei.addr)
    d = r.data.addr
    r.qp.submit([Command(S.read(1, 0, 1), d, 512, 1)])
    # the first doorbell after set_shadow always reaches BAR0, the shadow holds the tail too
    assert sh.sq_tail() == 1 == r.dev.sq_tail
    got = r.dev.fetch()
    sh.set_sq_ei(1)                                 # controller saw tail 1 and went idle
    r.qp.submit([Command(S.read(1, 1, 1), d, 512, 2)])     # 1 -> 2 passes EventIdx 1: ring
    assert sh.sq_tail() == 2 == r.dev.sq_tail
    got += r.dev.fetch()
    sh.set_sq_ei(5)                                 # controller still busy, will re-read
    r.qp.submit([Command(S.read(1, 2, 1), d, 512, 3)])     # 2 -> 3 does not pass 5: shadow only
    assert sh.sq_tail() == 3 and r.dev.sq_tail == 2
    info = r.qp.info()
    assert info["shadow"] == 1 and info["sq_doorbells"] == 3 and info["sq_mmio"] == 2
    # CQ head: shadow always, BAR0 only when the head passes the CQ EventIdx
    sh.set_cq_ei(7)
    r.dev.post(got[0].cid)
    assert [c.tag for c in r.qp.poll()] == [1]
    assert sh.cq_head() == 1 and r.dev.cq_head == 0
    sh.set_cq_ei(1)
    r.dev.post(got[1].cid)
    assert [c.tag for c in r.qp.poll()] == [2]
    assert sh.cq_head() == 2 and r.dev.cq_head == 2
    # back to MMIO only: BAR0 gets the current head
    r.qp.set_shadow(0, 0)
    assert r.qp.info()["shadow"] == 0


def test_shadow_need_event_across_the_ring_wrap() -> None:
    r = Rig(depth=4)
    sh = Shadow(1)
    r.qp.set_shadow(sh.db.addr, sh.ei.addr)
    d = r.data.addr
    for i in range(3):                              # tail 0 -> 3
        r.qp.submit([Command(S.read(1, i, 1), d, 512, i)])
        r.dev.post(r.dev.fetch()[0].cid)
        r.qp.poll()
        sh.set_sq_ei(r.dev.sq_tail)                 # idle controller: EventIdx = seen tail
    before = r.qp.info()["sq_mmio"]
    sh.set_sq_ei(3)
    r.qp.submit([Command(S.read(1, 9, 1), d, 512, 9)])     # 3 -> 0 wraps past EventIdx 3: ring
    assert r.qp.info()["sq_mmio"] == before + 1 and r.dev.sq_tail == 0


def test_shadow_mmio_always_and_bad_pages() -> None:
    r = Rig(depth=8, qid=0)
    sh = Shadow(0)
    with pytest.raises(QueueError):
        r.qp.set_shadow(sh.db.addr + 4, sh.ei.addr)     # §5.8: page aligned
    with pytest.raises(QueueError):
        r.qp.set_shadow(sh.db.addr, 0)
    r.qp.set_shadow(sh.db.addr, sh.ei.addr, mmio_always=True)
    sh.set_sq_ei(6)
    for i in range(3):
        r.qp.submit([Command(S.flush(1), 0, 0, i)])
    assert r.dev.sq_tail == 3 == sh.sq_tail() and r.qp.info()["sq_mmio"] == 3


def test_deferred_cq_head_never_lets_the_controller_see_a_full_cq() -> None:
    r = Rig(depth=8)                                # 7 trackers
    r.qp.set_cq_batch(4)
    d = r.data.addr
    done = 0
    for _ in range(20):
        n = r.qp.submit([Command(S.read(1, k, 1), d, 512, k) for k in range(3)])
        # controller's view: entries it posted since the last head it was told
        got = r.dev.fetch()
        for e in got:
            used = (r.dev.cq_tail - r.dev.cq_head) % r.dev.depth
            assert used < r.dev.depth - 1           # room to post (CQ not full, §3.3.1.2)
            r.dev.post(e.cid)
        done += len(r.qp.poll())
        assert n == 3
    info = r.qp.info()
    assert done == 60 and info["cq_mmio"] < info["cq_doorbells"] == 20
    r.qp.set_cq_batch(0)                            # back to eager: BAR0 catches up
    assert r.dev.cq_head == info["cq_head"]


def test_submit_rw_and_wait_tags_fast_path() -> None:
    from array import array

    from iommu_dma.nvme.queue import BatchIo

    r = Rig(depth=16)
    b = BatchIo(r.qp, 1, 512, r.data.addr, 8, nlb=2, lba_capacity=16)
    b.lbas[:] = array("Q", range(100, 116))
    assert b.submit(8) == 8
    got = r.dev.fetch()
    assert [(e.opcode, e.nsid, e.cdw10, e.cdw12) for e in got] == \
        [(S.OPC_READ, 1, 100 + i, 1) for i in range(8)]
    assert [e.prp1 for e in got] == [r.data.addr + i * 1024 for i in range(8)]
    for e in got[:5]:
        r.dev.post(e.cid, status=S.make_status(0x81, S.SCT_MEDIA) if e.cdw10 == 102 else 0)
    n = b.reap(1, 0.5)
    assert n == 5 and sorted(b.tags[:n]) == [0, 1, 2, 3, 4] and b.errors(n) == 1
    assert b.submit(n) == 5 and b.pos == 13
    assert [e.cdw10 for e in r.dev.fetch()] == [108, 109, 110, 111, 112]
    assert b.reap(1, 0.01) == 0                     # times out, nothing lost
    assert r.qp.inflight == 8
    with pytest.raises(QueueError):
        BatchIo(r.qp, 1, 512, 0x12, 8).submit(1)    # misaligned buffer: refused


def test_worker_spin_only_and_fast_clock() -> None:
    lba, qd = 512, 2
    r = Rig(depth=8)
    buf = Mem(qd * lba)
    with DiskDevice(r, lba, 64):
        for spin_only in (True, False):
            cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=64, buf_addr=buf.addr, qd=qd,
                               io_count=50, random=True, spin_only=spin_only,
                               idle_spin=1e-5, idle_sleep=1e-5)
            t0 = time.monotonic()
            res = run_worker(r.qp, cfg)
            wall = time.monotonic() - t0
            assert res.rc == 0 and res.ios == 50
            assert 0 < res.elapsed_ns <= wall * 1e9 * 1.05 + 1e6


# ---- the worker under media errors: each failed I/O listed, the others go on ----

READ_ERROR = S.make_status(0x81, S.SCT_MEDIA)       # Unrecovered Read Error
WRITE_FAULT = S.make_status(0x80, S.SCT_MEDIA)


class MediaDevice(DiskDevice):
    """Reads covering a read_bad LBA fail with Unrecovered Read Error, writes covering a
    write_bad LBA with Write Fault (torn: they leave garbage in the block); logs each failure
    as (opcode, slba, nlb, status)."""

    def __init__(self, rig: Rig, lba_size: int, nlbas: int, read_bad: set[int] | None = None,
                 write_bad: set[int] | None = None) -> None:
        super().__init__(rig, lba_size, nlbas)
        self.read_bad, self.write_bad = read_bad or set(), write_bad or set()
        self.failed: list[tuple[int, int, int, int]] = []

    def _execute(self, e: S.Sqe) -> int:
        slba, nlb = e.cdw10 | e.cdw11 << 32, (e.cdw12 & 0xFFFF) + 1
        bad = self.read_bad if e.opcode == S.OPC_READ else self.write_bad
        if any(slba <= lba < slba + nlb for lba in bad):
            status = READ_ERROR if e.opcode == S.OPC_READ else WRITE_FAULT
            if e.opcode == S.OPC_WRITE:
                pos = slba * self.lba_size
                self.disk[pos:pos + nlb * self.lba_size] = b"\x5a" * (nlb * self.lba_size)
            self.failed.append((e.opcode, slba, nlb, status))
            return status
        return super()._execute(e)


def listed(res: Any) -> Counter[tuple[int, int, int, int]]:
    return Counter({(f.opcode, f.lba, f.blocks, f.status): f.count for f in res.failed_ios})


def test_worker_lists_each_failed_io_by_lba_and_status_and_goes_on() -> None:
    lba, blk, qd, nlbas = 512, 4, 8, 4 * 64
    r = Rig(depth=16)
    buf = Mem(qd * blk * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr,
                       block_lbas=blk, qd=qd, read_pct=0, verify=True, io_count=64, seed=5)
    with MediaDevice(r, lba, nlbas, read_bad={41, 101, 202}, write_bad={130}) as dev:
        res = perf.run_worker(r.qp, cfg)            # every block written: one Write Fault
        assert res.rc == 0 and res.ios == 64 and res.errors == 1
        assert listed(res) == Counter({(S.OPC_WRITE, 128, blk, WRITE_FAULT): 1})
        cfg.read_pct, cfg.random, cfg.io_count = 60, True, 3000
        res = perf.run_worker(r.qp, cfg)
        assert res.rc == 0 and res.ios == 3000 and r.qp.inflight == 0
        assert listed(res) == Counter(dev.failed[1:])   # each one, by command and status
        assert res.errors == len(dev.failed) - 1 == sum(f.count for f in res.failed_ios)
        assert {f.lba for f in res.failed_ios} == {40, 100, 200, 128}
        assert res.failed_ios_not_listed == 0 and res.verify_failures == 0
        assert res.bytes == (3000 - res.errors) * blk * lba
        # the failed I/Os the worker listed, in the words of the spec
        names = {(f.op, f.lba): f.status_name for f in res.failed_ios}
        assert names[("read", 40)] == "Unrecovered Read Error (SCT 0x2, SC 0x81)"
        assert names[("write", 128)] == "Write Fault (SCT 0x2, SC 0x80)"
        assert str(next(f for f in res.failed_ios if f.lba == 100 and f.count > 1)) \
            .startswith("read LBA 100 (4 blocks): Unrecovered Read Error (SCT 0x2, SC 0x81), ")


def test_worker_failed_verify_read_is_an_error_not_a_mismatch() -> None:
    lba, nlbas = 512, 64
    r = Rig(depth=8)
    buf = Mem(4 * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr, qd=4,
                       read_pct=0, verify=True, io_count=nlbas, seed=3)
    with MediaDevice(r, lba, nlbas, read_bad={7, 30}) as dev:
        assert perf.run_worker(r.qp, cfg).errors == 0
        cfg.read_pct, cfg.verify_all, cfg.io_count = 100, True, 3 * nlbas
        res = perf.run_worker(r.qp, cfg)            # three passes, every read checked
    assert res.rc == 0 and res.reads == 3 * nlbas and res.errors == 6
    assert res.verify_failures == 0                 # the poisoned buffers were not checked
    assert listed(res) == Counter({(S.OPC_READ, 7, 1, READ_ERROR): 3,
                                   (S.OPC_READ, 30, 1, READ_ERROR): 3}) == Counter(dev.failed)


def test_worker_does_not_verify_a_block_whose_write_failed() -> None:
    """A torn write leaves garbage; its block is not checked until a write of it succeeds."""
    lba, nlbas = 512, 32
    r = Rig(depth=8)
    buf = Mem(4 * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr, qd=4,
                       read_pct=0, verify=True, io_count=nlbas, seed=11)
    with MediaDevice(r, lba, nlbas) as dev:
        assert perf.run_worker(r.qp, cfg).errors == 0     # the pattern everywhere
        dev.write_bad = {9}
        cfg.read_pct, cfg.verify_all, cfg.random, cfg.io_count = 50, True, True, 2000
        res = perf.run_worker(r.qp, cfg)
        assert res.rc == 0 and res.errors > 0 and res.verify_failures == 0
        assert res.verify_skipped > 0 and {f.lba for f in res.failed_ios} == {9}
        # every read checked: block 9 holds the torn write's garbage
        cfg.read_pct, cfg.random, cfg.io_count = 100, False, nlbas
        res = perf.run_worker(r.qp, cfg)
        assert res.verify_failures == 1 and res.first_verify_lba == 9
        # a write of block 9 that succeeds makes it checkable again, in the same run
        dev.write_bad = set()
        cfg.read_pct, cfg.verify_all, cfg.random, cfg.io_count = 50, False, True, 2000
        res = perf.run_worker(r.qp, cfg)
        assert res.rc == 0 and res.errors == 0 and res.verify_failures == 0
        assert res.verify_skipped == 0


def test_worker_failed_list_is_bounded() -> None:
    lba, nlbas = 512, 400
    r = Rig(depth=8)
    buf = Mem(4 * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr, qd=4,
                       io_count=2 * nlbas)
    with MediaDevice(r, lba, nlbas, read_bad=set(range(nlbas))):
        res = perf.run_worker(r.qp, cfg)            # every read fails, each LBA twice
    assert res.rc == 0 and res.ios == res.errors == 2 * nlbas and res.bytes == 0
    assert len(res.failed_ios) == lib.IDMA_WORKER_MAX_FAILED == 256
    assert [f.lba for f in res.failed_ios] == list(range(256))
    assert all(f.count == 2 for f in res.failed_ios)
    assert res.failed_ios_not_listed == 2 * (nlbas - 256)
    raw = ffi.new("struct idma_worker_result *")
    assert len(raw.failed) == 256                   # the C array the list is read from
    r2 = perf.combine([res, res])
    assert r2.failed_ios_not_listed == 4 * (nlbas - 256) and len(r2.failed_ios) == 256
    assert all(f.count == 4 for f in r2.failed_ios)
    assert r2.problems == [perf.errors_phrase(4 * nlbas, r2.failed_ios, 4 * (nlbas - 256))]
    assert r2.problems[0].startswith("1600 I/O error(s): read LBA 0 (1 block): Unrecovered "
                                     "Read Error (SCT 0x2, SC 0x81), 4 times; read LBA 1 ")
    assert r2.problems[0].endswith("(and 248 more listed in failed_ios, 576 more not listed)")
    assert not r2.ok and r2.to_dict()["failed_ios_not_listed"] == 576


# ---- perf and the CLI over the simulated controller (tests/host/sim_nvme.py) ----

class MediaSim(SimController):
    """Like QEMU's blkdebug: reads covering a read_bad LBA fail with Unrecovered Read Error,
    writes covering a write_bad LBA with Write Fault, and move nothing."""

    def __init__(self, blocks: int, read_bad: set[int], write_bad: set[int]) -> None:
        super().__init__(blocks)
        self.read_bad, self.write_bad = read_bad, write_bad

    def _execute(self, q: dict[str, Any], sqe: bytes) -> None:
        cdw0, = struct.unpack_from("<I", sqe, 0)
        slba, = struct.unpack_from("<Q", sqe, 40)
        nlb = (struct.unpack_from("<I", sqe, 48)[0] & 0xFFFF) + 1
        opcode = cdw0 & 0xFF
        bad = self.read_bad if opcode == S.OPC_READ else self.write_bad if \
            opcode == S.OPC_WRITE else set()
        if any(slba <= lba < slba + nlb for lba in bad):
            self._post(q, cdw0 >> 16, READ_ERROR if opcode == S.OPC_READ else WRITE_FAULT)
            return
        super()._execute(q, sqe)

    def _post(self, q: dict[str, Any], cid: int, status: int) -> None:
        """SimController._post, with DW3 (CID, phase, status) stored in one 32-bit write, as a
        device's CQE write is: a memmove may copy it a byte at a time, and backwards (as
        ASan's does), so the engine could see the new phase with the old CID."""
        dw3 = cid | q["phase"] << 16 | status << 17
        at = q["cq"] + q["tail"] * 16
        ctypes.memmove(at, struct.pack("<IIHH", 0, 0, q["head"], q["qid"]), 12)
        ctypes.c_uint32.from_address(at + 12).value = dw3      # the phase tag last
        q["tail"] += 1
        if q["tail"] == q["depth"]:
            q["tail"], q["phase"] = 0, q["phase"] ^ 1


class SimCtrl:
    """What PerfRun uses of a Controller, over the simulated IOMMU and controller."""

    def __init__(self, dev: SimController) -> None:
        self.dev, self.iommu = dev, SimIommu()
        self.mem = DmaAllocator(self.iommu, window_size=1 << 30, hugepages=False)
        self.bdf, self.cap, self.max_transfer = "0000:00:04.0", SimpleNamespace(mqes=64), 1 << 20
        self.max_io_queues, self.io_queues, self.next_qid = 4, {}, 1  # type: ignore[var-annotated]

    def create_io_queue(self, depth: int) -> IoQueue:
        q = IoQueue(self.next_qid, depth, self.mem, self.dev.bar_addr, SIM_BAR_SIZE, dstrd=0,
                    page_size=PAGE, max_transfer=self.max_transfer,
                    maptable=self.iommu.maptable)
        self.next_qid += 1                  # the simulator serves a qid for good: a new one
        attach_queue(self.dev, q)
        self.io_queues[q.qid] = q
        return q

    def delete_io_queue(self, qid: int) -> None:
        self.io_queues.pop(qid).close(ClosedError(f"I/O queue {qid} deleted"), device_quiet=True)

    def alloc(self, size: int) -> Any:
        return self.mem.alloc(size)


class SimNs:
    def __init__(self, ctrl: SimCtrl, blocks: int) -> None:
        self.ctrl, self.nsid, self.lba_size, self.blocks = ctrl, 1, SIM_LBA, blocks
        self.capacity = blocks * SIM_LBA
        self.ms = 0                     # no metadata


@pytest.fixture
def faulty_ns() -> Iterator[SimNs]:
    dev = MediaSim(2048, read_bad={100, 500, 1200}, write_bad={300}).start()
    yield SimNs(SimCtrl(dev), 2048)
    dev.stop()


def check_faulty_result(res: perf.PerfResult) -> None:
    assert res.ios == 6 * 2048 and res.verify_failures == 0 and not res.timed_out
    assert res.errors > 0 and not res.ok and res.failed_ios_not_listed == 0
    assert res.errors == sum(f.count for f in res.failed_ios)
    assert res.bytes == (res.ios - res.errors) * SIM_LBA
    got = {(f.op, f.lba): f.status_name for f in res.failed_ios}
    assert got == {("read", 100): "Unrecovered Read Error (SCT 0x2, SC 0x81)",
                   ("read", 500): "Unrecovered Read Error (SCT 0x2, SC 0x81)",
                   ("read", 1200): "Unrecovered Read Error (SCT 0x2, SC 0x81)",
                   ("write", 300): "Write Fault (SCT 0x2, SC 0x80)"}


def test_perf_run_reports_each_failed_io(faulty_ns: SimNs) -> None:
    w = perf.Workload(rw="rw", iodepth=32, runtime=0, ios=6 * 1024, numjobs=2, verify=True)
    res = perf.run(faulty_ns, w)                    # type: ignore[arg-type]
    check_faulty_result(res)
    assert len(res.problems) == 1 and res.problems[0].startswith(f"{res.errors} I/O error(s): ")
    assert "read LBA 100 (1 block): Unrecovered Read Error (SCT 0x2, SC 0x81)" \
        in res.problems[0]
    jobs = [j for j in res.jobs if isinstance(j, perf.JobResult)]
    assert len(jobs) == 2 and sum(j.errors for j in jobs) == res.errors
    assert [f.lba for f in res.failed_ios] == [100, 300, 500, 1200]
    assert faulty_ns.ctrl.io_queues == {}           # queues and buffers given back


@pytest.mark.parametrize("fmt", ["normal", "json"])
def test_perf_cli_lists_failed_ios_and_exits_1(faulty_ns: SimNs, fmt: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from iommu_dma.cli import perf as cli_perf
    from iommu_dma.cli.main import main

    @contextmanager
    def namespace(bdf: str, nsid: int) -> Iterator[SimNs]:
        yield faulty_ns

    def workload(args: Any) -> perf.Workload:         # the CLI runs for a time: fix the count
        return perf.Workload(rw=args.rw, iodepth=args.iodepth, runtime=0, ios=6 * 1024,
                             numjobs=args.numjobs, verify=args.verify)

    monkeypatch.setattr(cli_perf, "namespace", namespace)
    monkeypatch.setattr(cli_perf, "workload", workload)
    argv = ["perf", "00:04.0", "-n", "1", "--rw", "rw", "--iodepth", "32", "--numjobs", "2",
            "--verify", "--force", "-o", fmt]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]
    assert last.startswith("iommu-dma: error: perf: ") and " I/O error(s): " in last
    assert "write LBA 300 (1 block): Write Fault (SCT 0x2, SC 0x80)" in last
    if fmt == "json":
        j = json.loads(out)
        assert j["ok"] is False and j["verify_failures"] == 0 and j["ios"] == 6 * 2048
        assert [(f["op"], f["lba"], f["status"]) for f in j["failed_ios"]] == [
            ("read", 100, "Unrecovered Read Error (SCT 0x2, SC 0x81)"),
            ("write", 300, "Write Fault (SCT 0x2, SC 0x80)"),
            ("read", 500, "Unrecovered Read Error (SCT 0x2, SC 0x81)"),
            ("read", 1200, "Unrecovered Read Error (SCT 0x2, SC 0x81)")]
        assert j["failed_ios_not_listed"] == 0 and j["errors"] == sum(
            f["count"] for f in j["failed_ios"])
    else:
        lines = out.splitlines()
        at = lines.index(next(t for t in lines if t.startswith("Failed I/Os: ")))
        assert lines[at + 1].split() == ["Op", "LBA", "Blocks", "Times", "Status"]
        rows = [t.split(None, 4) for t in lines[at + 3:at + 7]]
        assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
            ("read", "100", "1", "Unrecovered Read Error (SCT 0x2, SC 0x81)"),
            ("write", "300", "1", "Write Fault (SCT 0x2, SC 0x80)"),
            ("read", "500", "1", "Unrecovered Read Error (SCT 0x2, SC 0x81)"),
            ("read", "1200", "1", "Unrecovered Read Error (SCT 0x2, SC 0x81)")]
        errors = sum(int(r[3]) for r in rows)
        assert lines[at] == f"Failed I/Os: {errors} of {6 * 2048} (the others completed)"
        assert all(re.fullmatch(r"\d+ read\(s\) not verified: a write of their block had "
                                r"failed, so its content is unknown", t)
                   for t in lines[at + 7:])


def test_sgl_queue_sends_one_data_block_descriptor(rig: Rig) -> None:
    """PSDT 01b and an SGL Data Block descriptor (address, 32-bit length, identifier 0) in
    DPTR (NVMe Base 2.0 §4.1.2); commands without data keep PSDT 0; PRPs again after."""
    d = rig.data.addr
    rig.qp.set_sgl(True)
    assert rig.qp.info()["sgl"] == 1
    cmds = [Command(S.read(1, 64, 24), d + 0x200, 3 * PAGE, 1),   # would need a PRP list
            Command(S.flush(1), 0, 0, 2)]
    assert rig.qp.submit(cmds) == 2
    got = rig.dev.fetch()
    assert (got[0].psdt, got[0].prp1, got[0].prp2) == (1, d + 0x200, 3 * PAGE)
    assert (got[1].psdt, got[1].prp1, got[1].prp2) == (0, 0, 0)
    from iommu_dma.nvme.queue import BatchIo

    batch = BatchIo(rig.qp, 1, 4096, d, 1, nlb=2, lba_capacity=1)
    assert batch.submit(1) == 1                                  # the fast path too
    e = rig.dev.fetch()[0]
    assert (e.psdt, e.prp1, e.prp2) == (1, d, 8192)
    rig.qp.set_sgl(False)
    rig.qp.submit([Command(S.read(1, 0, 1), d, 512, 4)])
    e = rig.dev.fetch()[0]
    assert (e.psdt, e.prp1, e.prp2) == (0, d, 0)


def test_sgl_refused_on_the_admin_queue() -> None:
    r = Rig(depth=4, qid=0)
    with pytest.raises(QueueError):
        r.qp.set_sgl(True)


def test_metadata_pointer_is_checked_like_the_data() -> None:
    """MPTR (§4.2) carries the checked metadata buffer; an unmapped or misaligned one is
    refused before the device sees anything; without metadata MPTR is 0 whatever the SQE held."""
    table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
    r = Rig(depth=8, maptable=table)
    d = r.data.addr
    assert lib.idma_maptable_add(table, d, 64 * 1024) == 0
    meta = d + 32 * 1024
    assert r.qp.submit([Command(S.read(1, 0, 1), d, PAGE, 1, "", meta, 8)]) == 1
    e = r.dev.fetch()[0]
    assert (e.mptr, e.prp1) == (meta, d)
    stray = S.read(1, 0, 1)
    stray.mptr = 0xDEAD000
    assert r.qp.submit([Command(stray, d, PAGE, 2)]) == 1
    assert r.dev.fetch()[0].mptr == 0
    for addr, rc in ((d + 64 * 1024 - 4, EUNMAPPED), (meta + 2, EALIGN)):
        with pytest.raises(QueueError) as exc:
            r.qp.submit([Command(S.read(1, 0, 1), d, PAGE, 3, "", addr, 8)])
        assert exc.value.rc == rc
    assert r.dev.sq_tail == 2


def test_mapping_cache_forgets_a_removed_mapping() -> None:
    """The queue caches the mapping that covered its last buffer; removing it (or any other
    change to the table) invalidates the cache before the next command is checked."""
    table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
    r = Rig(depth=8, maptable=table)
    d = r.data.addr
    assert lib.idma_maptable_add(table, d, 64 * 1024) == 0
    assert lib.idma_maptable_add(table, d + 64 * 1024, 64 * 1024) == 0
    assert r.qp.submit([Command(S.read(1, 0, 1), d, PAGE, 1)]) == 1        # caches [d, +64K)
    assert r.qp.submit([Command(S.read(1, 0, 2), d + 62 * 1024, 2 * PAGE, 2)]) == 1  # spans both
    assert lib.idma_maptable_remove(table, d, 64 * 1024) == 0
    with pytest.raises(QueueError) as exc:
        r.qp.submit([Command(S.read(1, 0, 1), d + PAGE, PAGE, 3)])
    assert exc.value.rc == EUNMAPPED
    assert r.qp.submit([Command(S.read(1, 0, 1), d + 64 * 1024, PAGE, 4)]) == 1
    assert lib.idma_maptable_add(table, d, 64 * 1024) == 0
    assert r.qp.submit([Command(S.read(1, 0, 1), d + PAGE, PAGE, 5)]) == 1

"""The engine against a controller that misbehaves, and callers that misuse it.

Each test names the rule it holds the engine to: doorbells inside BAR0 (§3.1.3), CIDs with a
generation, values read from a CQE bounded before use (§4.6), unused PRP entries cleared
(§4.1.1), large transfers over chained PRP list pages, counts bounded, one owner per queue pair,
a thread-safe refcounted maptable, a race-free fast clock and an honest worker verify.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from array import array

import pytest

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.native import ffi, lib
from iommu_dma.nvme import sqe as S
from iommu_dma.nvme.queue import (
    EBUSY,
    MAX_DEPTH,
    BatchIo,
    Command,
    QueueConfigError,
    QueueError,
    QueuePair,
    WorkerConfig,
    prp_list_pages,
    run_worker,
)
from tests.host.test_queue_engine import PAGE, DiskDevice, FakeDevice, Mem, Rig

PER_PAGE = PAGE // 8


def post_raw(dev: FakeDevice, cid: int, *, sq_head: int | None = None, sq_id: int | None = None,
             status: int = 0) -> None:
    """Post a CQE (NVMe Base 2.0 §4.6) with chosen SQ head / SQ id fields."""
    dw3 = cid | dev.phase << 16 | status << 17
    head = dev.sq_head if sq_head is None else sq_head
    sqid = dev.qid if sq_id is None else sq_id
    off = dev.cq_tail * 16
    dev.cq.map[off:off + 16] = struct.pack("<IIHHI", 0, 0, head, sqid, dw3)
    dev.cq_tail += 1
    if dev.cq_tail == dev.depth:
        dev.cq_tail, dev.phase = 0, dev.phase ^ 1


def walk_prps(sqe: S.Sqe, length: int) -> list[int]:
    """Data page addresses a controller reads from PRP1, PRP2 and chained list pages (§4.1.1)."""
    pages = [sqe.prp1]
    left = length - min(PAGE - sqe.prp1 % PAGE, length)
    if left <= 0:
        return pages
    if left <= PAGE:
        return pages + [sqe.prp2]
    entry = sqe.prp2
    while left > 0:
        slot = (entry % PAGE) // 8
        value = struct.unpack("<Q", bytes(ffi.buffer(ffi.cast("char *", entry), 8)))[0]
        if slot == PER_PAGE - 1 and left > PAGE:    # last slot of a full page: chain pointer
            entry = value
            continue
        pages.append(value)
        left -= PAGE
        entry += 8
    return pages


# ---- 1. doorbells bounded by BAR0 ----

def test_doorbell_beyond_bar0_is_refused_with_its_reason() -> None:
    sq, cq, bar = Mem(PAGE), Mem(PAGE), Mem(0x4000)
    with pytest.raises(QueueConfigError) as exc:
        QueuePair(5, 8, sq.addr, cq.addr, bar.addr, 0x4000, dstrd=15)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, IommuDmaError)
    cq_db = 0x1000 + 11 * (4 << 15)
    assert str(exc.value) == (f"queue 5: doorbell at {cq_db:#x} is beyond the 0x4000-byte "
                              "BAR0 (CAP.DSTRD=15)")
    # exactly fitting: CQ doorbell of queue 1 at 0x100c, 4 bytes
    QueuePair(1, 8, sq.addr, cq.addr, bar.addr, 0x1010).close()
    with pytest.raises(QueueConfigError):
        QueuePair(1, 8, sq.addr, cq.addr, bar.addr, 0x100F)


def test_engine_itself_refuses_doorbells_outside_bar0() -> None:
    sq, cq, bar = Mem(PAGE), Mem(PAGE), Mem(0x2000)

    def new(qid: int, size: int, dstrd: int = 0) -> object:
        return lib.idma_qpair_new(qid, 8, ffi.cast("void *", sq.addr), ffi.cast("void *", cq.addr),
                                  ffi.cast("uint8_t *", bar.addr), size, dstrd, PAGE, ffi.NULL, 0,
                                  ffi.NULL)
    assert new(1, 0x100F) == ffi.NULL
    q = new(1, 0x1010)
    assert q != ffi.NULL
    lib.idma_qpair_free(q)
    assert new(0xFFFF, 0x2000, 15) == ffi.NULL
    # 64-bit offsets: with DSTRD 15 the largest queue's doorbell is past 4 GiB
    assert lib.idma_cq_doorbell_offset(0xFFFF, 15) == 0x1000 + 0x1FFFF * (4 << 15)


# ---- 2. CIDs carry a generation; CQE fields are bounded ----

def test_depth_is_capped_at_4096() -> None:
    assert MAX_DEPTH == 4096
    sq, cq, bar = Mem(4097 * 64), Mem(4097 * 16), Mem(0x2000)
    with pytest.raises(QueueConfigError, match="depth 4097"):
        QueuePair(1, 4097, sq.addr, cq.addr, bar.addr, 0x2000)
    q = lib.idma_qpair_new(1, 4097, ffi.cast("void *", sq.addr), ffi.cast("void *", cq.addr),
                           ffi.cast("uint8_t *", bar.addr), 0x2000, 0, PAGE, ffi.NULL, 0, ffi.NULL)
    assert q == ffi.NULL
    QueuePair(1, 4096, sq.addr, cq.addr, bar.addr, 0x2000).close()


def test_reused_tracker_gets_a_new_generation_and_stale_cid_is_dropped() -> None:
    r = Rig(depth=2)                                # one tracker: every command reuses it
    cids = []
    for i in range(18):
        assert r.qp.submit([Command(S.flush(1), tag=i)]) == 1
        cid = r.dev.fetch()[0].cid
        cids.append(cid)
        if i:
            post_raw(r.dev, cids[i - 1])            # late duplicate of the previous command
            assert r.qp.poll() == [] and r.qp.inflight == 1
        r.dev.post(cid)
        assert [c.tag for c in r.qp.poll()] == [i]
    assert [c & 0xFFF for c in cids] == [0] * 18
    assert [c >> 12 for c in cids] == [i % 16 for i in range(18)]
    assert r.qp.info()["spurious"] == 17


def test_duplicate_cqe_never_completes_twice(rig: Rig) -> None:
    rig.qp.submit([Command(S.flush(1), tag=t) for t in (1, 2)])
    a, b = rig.dev.fetch()
    rig.dev.post(a.cid)
    rig.dev.post(a.cid)                             # same CID again, b still in flight
    assert [c.tag for c in rig.qp.poll()] == [1]
    assert rig.qp.inflight == 1 and rig.qp.info()["spurious"] == 1
    rig.dev.post(b.cid)
    assert [c.tag for c in rig.qp.poll()] == [2]


def test_cqe_with_sq_head_or_sq_id_out_of_range_is_dropped(rig: Rig) -> None:
    rig.qp.submit([Command(S.flush(1), tag=7)])
    e = rig.dev.fetch()[0]
    post_raw(rig.dev, e.cid, sq_head=16)            # depth 16: not a ring position
    post_raw(rig.dev, e.cid, sq_head=0xFFFF)
    post_raw(rig.dev, e.cid, sq_id=rig.dev.qid + 1)  # another queue's SQ
    post_raw(rig.dev, e.cid | 0x800)                # tracker index past the trackers
    assert rig.qp.poll() == [] and rig.qp.inflight == 1
    info = rig.qp.info()
    assert info["spurious"] == 4 and info["sq_head"] == 0 and info["cq_head"] == 4
    rig.dev.post(e.cid)
    assert [c.tag for c in rig.qp.poll()] == [7]


def test_flooded_cq_is_consumed_at_most_depth_entries_per_poll() -> None:
    r = Rig(depth=8)
    for _ in range(7):
        post_raw(r.dev, 0x0FFF)                     # garbage the engine must skip
    assert r.qp.poll() == []
    assert r.qp.info()["spurious"] == 7 and r.dev.cq_head == 7


@pytest.fixture
def rig() -> Rig:
    return Rig(depth=16)


# ---- 3. unused PRP entries are cleared ----

def test_prp_build_zeroes_the_rest_of_the_last_list_page() -> None:
    slots = 2 * PER_PAGE
    lst = ffi.new("uint64_t[]", [0xDEAD0000 + i for i in range(slots)])
    prp1, prp2 = ffi.new("uint64_t *"), ffi.new("uint64_t *", 0x5A5A)
    assert lib.idma_prp_build(0x100000, 4 * PAGE, PAGE, lst, 0x7000000, slots, prp1, prp2) == 3
    assert [lst[i] for i in range(3)] == [0x101000, 0x102000, 0x103000]
    assert all(lst[i] == 0 for i in range(3, PER_PAGE))
    assert lst[PER_PAGE] == 0xDEAD0000 + PER_PAGE   # other list pages: untouched
    assert lib.idma_prp_build(0x100000, 100, PAGE, lst, 0x7000000, slots, prp1, prp2) == 0
    assert prp2[0] == 0                             # PRP2 unused: 0, not a stale pointer


def test_shorter_command_on_a_reused_tracker_leaves_no_stale_prp_entries() -> None:
    r = Rig(depth=2, list_pages=1)                  # one tracker, one list page
    big, d = Mem(64 * PAGE), r.data.addr
    r.qp.submit([Command(S.read(1, 0, 32 * 8), big.addr, 32 * PAGE, 1)])
    e = r.dev.fetch()[0]
    r.dev.post(e.cid)
    r.qp.poll()
    r.qp.submit([Command(S.read(1, 0, 3 * 8), d, 3 * PAGE, 2)])
    e = r.dev.fetch()[0]
    entries = struct.unpack(f"<{PER_PAGE}Q", r.sq.read(e.prp2, PAGE))
    assert entries[:2] == (d + PAGE, d + 2 * PAGE)
    assert entries[2:] == (0,) * (PER_PAGE - 2)     # was: the big command's pages


# ---- 4. large I/O over chained PRP list pages ----

@pytest.mark.parametrize("size, pages", [(0, 0), (512, 0), (PAGE, 0), (2 * PAGE, 1),
                                         (2 << 20, 1), ((2 << 20) + PAGE, 2), (8 << 20, 5)])
def test_prp_list_pages(size: int, pages: int) -> None:
    assert prp_list_pages(size, PAGE) == pages


@pytest.mark.parametrize("size", [3 * PAGE, 512 * PAGE, 513 * PAGE, 1023 * PAGE, 8 << 20,
                                  (8 << 20) + 4])
def test_prp_list_pages_is_exactly_enough_at_every_offset(size: int) -> None:
    need = prp_list_pages(size, PAGE)
    worst = 0
    for off in (0, 4, 0x200, PAGE - 4):
        slots = need * PER_PAGE
        lst = ffi.new("uint64_t[]", max(slots, 1))
        p1, p2 = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        assert lib.idma_prp_build(0x1000000 + off, size, PAGE, lst, 0x7000000, slots, p1, p2) >= 0
        fewer = (need - 1) * PER_PAGE
        worst = max(worst, lib.idma_prp_build(0x1000000 + off, size, PAGE, lst, 0x7000000,
                                              fewer, p1, p2) < 0)
    assert worst                                    # one page fewer fails at some offset


def test_eight_mib_transfer_chains_list_pages() -> None:
    size, off = 8 << 20, 0x200
    pages = prp_list_pages(size, PAGE)
    r = Rig(depth=4, list_pages=3 * pages)
    big = Mem(size + PAGE)
    assert r.qp.submit([Command(S.read(1, 0, size // 512), big.addr + off, size, 1)]) == 1
    e = r.dev.fetch()[0]
    got = walk_prps(e, size)
    want = [big.addr + off] + [big.addr + i * PAGE for i in range(1, size // PAGE + 1)]
    assert got == want and len(got) == 2049
    r.dev.post(e.cid)
    assert [c.tag for c in r.qp.poll()] == [1]
    over = (pages * (PER_PAGE - 1) + 3) * PAGE      # one list entry more than 5 pages hold
    with pytest.raises(QueueError) as exc:          # (refused before the device sees it)
        r.qp.submit([Command(S.read(1, 0, 8), big.addr, over, 2)])
    assert exc.value.rc == lib.IDMA_ETOOBIG


# ---- 5. counts bounded ----

def test_batch_submit_bounds_n() -> None:
    r = Rig(depth=16)
    b = BatchIo(r.qp, 1, 512, r.data.addr, 4, lba_capacity=8)
    for n in (-1, 5, 1000):
        with pytest.raises(ValueError, match="0..4"):
            b.submit(n)
    assert b.submit(0) == 0 and b.submit(4) == 4 and r.qp.inflight == 4


def test_native_counts_larger_than_the_trackers_stay_inside_the_engine() -> None:
    r = Rig(depth=4)
    n = 1000
    lbas, tags = ffi.new("uint64_t[]", n), ffi.new("uint64_t[]", n)
    got = lib.idma_qpair_submit_rw(r.qp.cdata, 2, 1, 1, 512, lbas, tags, n, r.data.addr, 0)
    assert got == 3
    for e in r.dev.fetch():
        r.dev.post(e.cid)
    out = ffi.new("struct idma_cpl[]", n)
    assert lib.idma_qpair_wait(r.qp.cdata, out, n, n, 0) == 3
    st = ffi.new("uint16_t[]", 1)
    assert lib.idma_qpair_wait_tags(r.qp.cdata, tags, st, 1, 5, 0) == 0
    assert lib.idma_qpair_poll(r.qp.cdata, ffi.NULL, 4) == lib.IDMA_EINVAL


# ---- 6. one owner per queue pair ----

def test_two_threads_on_one_queue_pair_get_ebusy_never_corruption() -> None:
    r = Rig(depth=16)
    stop = threading.Event()
    completed: list[int] = []
    busy: list[QueueError] = []
    other: list[BaseException] = []
    lock = threading.Lock()

    def user(base: int) -> None:
        tag = base
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(busy) < 20:
            try:
                tag += r.qp.submit([Command(S.flush(1), tag=tag)])
                got = r.qp.wait(1, timeout=0.002)
                with lock:
                    completed.extend(c.tag for c in got)
            except QueueError as e:
                if e.rc != EBUSY:
                    raise
                busy.append(e)
            except BaseException as e:              # pragma: no cover - reported below
                other.append(e)
                return

    dev = threading.Thread(target=r.dev.echo_until, args=(stop, 0.0002))
    users = [threading.Thread(target=user, args=(k << 32,)) for k in (1, 2)]
    dev.start()
    for t in users:
        t.start()
    for t in users:
        t.join()
    deadline = time.monotonic() + 30                # generous: a loaded machine is slow
    while r.qp.inflight and time.monotonic() < deadline:
        completed.extend(c.tag for c in r.qp.wait(1, timeout=0.01))
    stop.set()
    dev.join()
    assert not other and busy
    assert str(busy[0]) .startswith("queue pair 1 is being used by another thread at the same "
                                    "time; give each thread its own queue pair or lock around it")
    info = r.qp.info()
    assert len(completed) == len(set(completed)) == info["completed"] == info["submitted"]
    assert r.qp.inflight == 0 and info["free"] == 15 and info["spurious"] == 0


def test_worker_refuses_a_queue_pair_another_thread_is_in() -> None:
    r = Rig(depth=4)
    buf = Mem(PAGE)
    r.qp.submit([Command(S.flush(1), tag=1)])
    waiter = threading.Thread(target=lambda: r.qp.wait(1, timeout=0.5))
    waiter.start()
    time.sleep(0.1)
    with pytest.raises(QueueError) as exc:
        run_worker(r.qp, WorkerConfig(nsid=1, lba_size=512, lba_count=8, buf_addr=buf.addr,
                                      io_count=1))
    waiter.join()
    assert exc.value.rc == EBUSY


def test_closing_a_queue_pair_ends_a_running_worker_before_freeing_it() -> None:
    """Close while the C worker runs on the queue pair (a device that never answers): the
    worker leaves at its next poll, then the engine state is freed (ASan checks the order)."""
    r = Rig(depth=4)
    buf = Mem(PAGE)
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            run_worker(r.qp, WorkerConfig(nsid=1, lba_size=512, lba_count=8, buf_addr=buf.addr,
                                          qd=2, duration=30.0, io_timeout=30.0))
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.3)                                 # the worker is waiting on its I/O
    r.qp.close()
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)
    with pytest.raises(ClosedError):
        r.qp.submit([Command(S.flush(1), tag=1)])


# ---- 7. refcounted maptable ----

def test_queue_pair_keeps_the_maptable_alive() -> None:
    table = lib.idma_maptable_new()
    assert lib.idma_maptable_refs(table) == 1
    r = Rig(depth=4, maptable=table)
    assert lib.idma_maptable_refs(table) == 2
    assert lib.idma_maptable_add(table, r.data.addr, PAGE) == 0
    lib.idma_maptable_free(table)                   # the container closes: drops its ref
    assert lib.idma_maptable_refs(table) == 1
    assert r.qp.submit([Command(S.read(1, 0, 1), r.data.addr, 512, 1)]) == 1
    with pytest.raises(QueueError) as exc:
        r.qp.submit([Command(S.read(1, 0, 1), r.data.addr + PAGE, 512, 2)])
    assert exc.value.rc == lib.IDMA_EUNMAPPED
    r.qp.close()                                    # last ref: freed (ASan checks it)
    assert r.qp.inflight == 0
    with pytest.raises(IommuDmaError, match="closed"):
        r.qp.poll()


# ---- 8. fast clock calibrated once ----

CLOCK_SCRIPT = """
import threading
from iommu_dma.native import lib
go = threading.Barrier(8)
out = []
def run():
    go.wait()
    a = [lib.idma_fast_ns() for _ in range(2000)]
    out.append((a, lib.idma_now_ns()))
ts = [threading.Thread(target=run) for _ in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
for a, now in out:
    assert all(x <= y for x, y in zip(a, a[1:])), "fast clock went backwards"
    assert abs(a[-1] - now) < 5_000_000, (a[-1], now)
print("ok")
"""


def test_fast_clock_calibrates_once_under_concurrent_first_use() -> None:
    """First calls from 8 threads at once (a fresh process): one calibration, every thread
    reads a monotonic clock that agrees with CLOCK_MONOTONIC."""
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", CLOCK_SCRIPT], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# ---- 9. worker verify cannot pass on a read that moved no data ----

class LazyDevice(DiskDevice):
    """Completes every read successfully without writing its data."""

    def _execute(self, e: S.Sqe) -> int:
        if e.opcode == S.OPC_READ:
            return 0
        return super()._execute(e)


def test_worker_verify_fails_when_a_read_moves_no_data() -> None:
    lba, blk, qd, nlbas = 512, 8, 2, 64
    r = Rig(depth=4)
    buf = Mem(qd * blk * lba)
    cfg = WorkerConfig(nsid=1, lba_size=lba, lba_count=nlbas, buf_addr=buf.addr,
                       block_lbas=blk, qd=qd, read_pct=0, verify=True, io_count=nlbas // blk,
                       seed=9)
    with DiskDevice(r, lba, nlbas) as honest:
        assert run_worker(r.qp, cfg).writes == 8
        cfg.read_pct, cfg.verify_all, cfg.io_count = 100, True, 8
        res = run_worker(r.qp, cfg)                 # real reads: buffers hold good data
        assert res.reads == 8 and res.verify_failures == 0
        disk = honest.disk
    with LazyDevice(r, lba, nlbas) as lazy:
        lazy.disk[:] = disk
        res = run_worker(r.qp, cfg)                 # same blocks, nothing moved
    assert res.rc == 0 and res.reads == 8 and res.errors == 0
    assert res.verify_failures == 8 * blk


def test_poison_is_never_the_expected_data() -> None:
    buf = ffi.new("uint64_t[]", 512 // 8 * 4)
    for seed in (0, 1, 2**64 - 1, 0x123456789):
        lib.idma_pattern_poison(buf, 77, 4, 512, seed)
        assert lib.idma_pattern_check(buf, 77, 4, 512, seed, ffi.NULL) == 4
        lib.idma_pattern_fill(buf, 77, 4, 512, seed)
        assert lib.idma_pattern_check(buf, 77, 4, 512, seed, ffi.NULL) == 0


# ---- 10. error and command types ----

def test_queue_error_is_an_iommu_dma_error_and_command_is_a_record(rig: Rig) -> None:
    e = QueueError(lib.IDMA_EUNMAPPED, 3)
    assert isinstance(e, IommuDmaError) and (e.rc, e.index) == (lib.IDMA_EUNMAPPED, 3)
    assert "command 3" in str(e)
    c = Command(S.flush(1))
    assert (c.addr, c.length, c.tag, c.what) == (0, 0, 0, "")
    assert Command._fields == ("sqe", "addr", "length", "tag", "what", "meta_addr", "meta_length")
    assert rig.qp.submit([c._replace(tag=42, what="flush")]) == 1
    rig.dev.post(rig.dev.fetch()[0].cid)
    assert [x.tag for x in rig.qp.poll()] == [42]
    with pytest.raises(QueueError) as exc:
        rig.qp.submit([Command(S.read(1, 0, 1), rig.data.addr + 2, 512, 1)])
    assert exc.value.index == 0 and exc.value.rc == lib.IDMA_EALIGN


def test_batch_io_tags_array_type() -> None:
    r = Rig(depth=8)
    b = BatchIo(r.qp, 1, 512, r.data.addr, 2, lba_capacity=4)
    b.lbas[:] = array("Q", [5, 6, 7, 8])
    assert b.submit(2) == 2 and [e.cdw10 for e in r.dev.fetch()] == [5, 6]

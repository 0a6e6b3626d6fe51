"""Thin Python wrapper around the native NVMe queue pair engine and I/O worker.

All memory (rings, PRP list pages, data buffers) is allocated and DMA-mapped by the caller;
this module only takes raw integer addresses (IOVA = VA). Calls into the engine release the
GIL (cffi API mode does that for every out-of-line call), so poll/wait/run_worker can run in
one thread while other Python threads keep running.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.native import ffi, lib
from iommu_dma.nvme.sqe import SQE_SIZE, Sqe, Status, decode_status

# Return codes (native/queue.h enum idma_rc).
EINVAL: int = lib.IDMA_EINVAL
EUNMAPPED: int = lib.IDMA_EUNMAPPED
EALIGN: int = lib.IDMA_EALIGN
ETOOBIG: int = lib.IDMA_ETOOBIG
ETIMEDOUT: int = lib.IDMA_ETIMEDOUT
ENOMEM: int = lib.IDMA_ENOMEM
EBUSY: int = lib.IDMA_EBUSY
ECLOSED: int = lib.IDMA_ECLOSED

MAX_DEPTH: int = lib.IDMA_MAX_DEPTH         # CID = 4-bit generation << 12 | tracker index
CID_INDEX_BITS: int = lib.IDMA_CID_INDEX_BITS

_RC_NAMES = {EINVAL: "invalid argument", EUNMAPPED: "data buffer not DMA-mapped",
             EALIGN: "data buffer not dword aligned", ETOOBIG: "transfer too large for PRP list",
             ETIMEDOUT: "I/O timed out", ENOMEM: "out of memory",
             EBUSY: "queue pair in use by another thread", ECLOSED: "queue pair closed"}

SqeLike = Union[Sqe, bytes, bytearray, memoryview, Any]   # Any: a cffi "struct idma_sqe"


class Command(NamedTuple):
    """One command for QueuePair.submit: the SQE (CID and, with a data buffer, PRP1/PRP2 are
    filled in by the engine), its data buffer (IOVA = VA; length 0: none, PRPs kept as given),
    the caller's tag returned in the completion, a description for messages, and its separate
    metadata buffer (MPTR; meta_length 0: none, MPTR is 0)."""

    sqe: SqeLike
    addr: int = 0
    length: int = 0
    tag: int = 0
    what: str = ""
    meta_addr: int = 0
    meta_length: int = 0


class QueueError(IommuDmaError):
    """The engine refused a call; .rc is the idma_rc, .index the refused command (or -1)."""

    def __init__(self, rc: int, index: int = -1, *, qid: int | None = None) -> None:
        self.rc = rc
        self.index = index
        self.qid = qid
        if rc == EBUSY:
            who = f"queue pair {qid}" if qid is not None else "the queue pair"
            super().__init__(f"{who} is being used by another thread at the same time; give "
                             f"each thread its own queue pair or lock around it [rc {rc}]")
            return
        where = f" (command {index})" if index >= 0 else ""
        super().__init__(f"{_RC_NAMES.get(rc, 'error')}{where} [rc {rc}]")


class QueueConfigError(IommuDmaError, ValueError):
    """QueuePair arguments the engine cannot use (the message names the problem)."""


def prp_list_pages(max_transfer: int, page_size: int) -> int:
    """PRP list pages one tracker needs for a transfer of max_transfer bytes starting at any
    dword-aligned offset (NVMe Base 2.0 §4.1.1): PRP1 covers the rest of the first page, the
    others are list entries, and each full list page but the last gives its final entry to the
    pointer to the next list page."""
    if max_transfer <= 0:
        return 0
    data_pages = (page_size - 4 + max_transfer + page_size - 1) // page_size  # worst offset
    entries = data_pages - 1                    # PRP1 is in the SQE
    if entries <= 1:
        return 0                                # PRP2 is a data pointer (or unused)
    per_page = page_size // 8
    return (entries - 1 + per_page - 2) // (per_page - 1)


@dataclass(frozen=True)
class Completion:
    """One reaped CQE: caller's tag, DW0 result, CID and the 15-bit status field."""

    tag: int
    result: int
    cid: int
    status: int

    @property
    def ok(self) -> bool:
        return self.status & 0x7FF == 0     # SCT and SC zero

    def decoded(self) -> Status:
        return decode_status(self.status)


def _sqe_bytes(sqe: SqeLike) -> bytes:
    if isinstance(sqe, Sqe):
        return sqe.pack()
    if isinstance(sqe, (bytes, bytearray, memoryview)):
        data = bytes(sqe)
    else:                                   # cffi struct idma_sqe (or pointer to one)
        data = bytes(ffi.buffer(sqe, SQE_SIZE))
    if len(data) != SQE_SIZE:
        raise ValueError(f"an SQE is {SQE_SIZE} bytes, got {len(data)}")
    return data


def _check_queue_args(qid: int, depth: int, sq_addr: int, cq_addr: int, bar0_size: int,
                      dstrd: int, page_size: int, list_addr: int, list_pages: int) -> None:
    """Raise QueueConfigError naming the first argument idma_qpair_new would refuse."""
    where = f"queue {qid}"
    if not 0 <= qid <= 0xFFFF:
        raise QueueConfigError(f"{where}: the queue identifier is 16 bits")
    if not 2 <= depth <= MAX_DEPTH:
        raise QueueConfigError(f"{where}: depth {depth} is outside 2..{MAX_DEPTH} (a CID holds "
                               f"a {CID_INDEX_BITS}-bit tracker index)")
    if page_size < 4096 or page_size & (page_size - 1):
        raise QueueConfigError(f"{where}: page size {page_size} is not a power of two >= 4096 "
                               "(CC.MPS)")
    if not 0 <= dstrd <= 15:
        raise QueueConfigError(f"{where}: CAP.DSTRD {dstrd} is outside 0..15")
    for name, addr in (("SQ", sq_addr), ("CQ", cq_addr), ("PRP list area", list_addr)):
        if addr % page_size:
            raise QueueConfigError(f"{where}: {name} at {addr:#x} is not aligned to the "
                                   f"{page_size}-byte page")
    if not sq_addr or not cq_addr:
        raise QueueConfigError(f"{where}: SQ and CQ need memory")
    doorbell = int(lib.idma_cq_doorbell_offset(qid, dstrd))     # the higher of the two
    if doorbell + 4 > bar0_size:
        raise QueueConfigError(f"{where}: doorbell at {doorbell:#x} is beyond the "
                               f"{bar0_size:#x}-byte BAR0 (CAP.DSTRD={dstrd})")
    if list_addr and list_pages < depth - 1:
        raise QueueConfigError(f"{where}: {list_pages} PRP list pages for {depth - 1} "
                               "trackers (at least one each)")


class QueuePair:
    """One NVMe submission/completion queue pair over caller-provided DMA memory.

    Single owner: one thread at a time may call submit/poll/wait (a second thread entering
    at the same time gets QueueError with rc EBUSY); share a QueuePair only behind a lock."""

    def __init__(self, qid: int, depth: int, sq_addr: int, cq_addr: int, bar0_addr: int,
                 bar0_size: int, *, dstrd: int = 0, page_size: int = 4096, list_addr: int = 0,
                 list_pages: int = 0, maptable: Any = None) -> None:
        """sq_addr/cq_addr: page-aligned zeroed rings of depth entries (2..4096);
        bar0_addr/bar0_size: mapped BAR0, which must hold this queue's doorbells;
        list_addr: list_pages page-aligned PRP list pages (split between depth-1 trackers);
        maptable: a `struct idma_maptable *` or None (no mapped-range check); the queue pair
        holds a reference to it until close()."""
        _check_queue_args(qid, depth, sq_addr, cq_addr, bar0_size, dstrd, page_size,
                          list_addr, list_pages)
        table = maptable if maptable is not None else ffi.NULL
        q = lib.idma_qpair_new(qid, depth, ffi.cast("void *", sq_addr),
                               ffi.cast("void *", cq_addr), ffi.cast("uint8_t *", bar0_addr),
                               bar0_size, dstrd, page_size, ffi.cast("void *", list_addr),
                               list_pages, table)
        if q == ffi.NULL:
            raise QueueConfigError(f"queue {qid}: the engine refused the queue arguments "
                                   f"(depth {depth}, page size {page_size}, list pages "
                                   f"{list_pages}) or is out of memory")
        self._q = ffi.gc(q, lib.idma_qpair_free)
        self.qid = qid
        self.depth = depth
        self._cpl = ffi.new("struct idma_cpl[]", depth)

    def close(self) -> None:
        """Free the engine state now (drops its maptable reference); the rings and list pages
        stay the caller's. Further calls on this object fail."""
        q = self._q
        if q == ffi.NULL:
            return
        lib.idma_qpair_quiesce(q)       # a worker still running on it ends first
        self._q = ffi.NULL
        ffi.release(q)                  # runs idma_qpair_free

    def _error(self, rc: int, index: int = -1) -> Exception:
        if self._q == ffi.NULL or rc == ECLOSED:
            return ClosedError(f"queue pair {self.qid}")
        return QueueError(rc, index, qid=self.qid)

    @property
    def cdata(self) -> Any:
        """The `struct idma_qpair *` (for native callers such as the worker)."""
        return self._q

    @property
    def trackers(self) -> int:
        return self.depth - 1

    @property
    def inflight(self) -> int:
        return int(lib.idma_qpair_inflight(self._q))

    def info(self) -> dict[str, int]:
        out = ffi.new("struct idma_qpair_info *")
        lib.idma_qpair_get_info(self._q, out)
        return {name: int(getattr(out, name)) for name, _ in ffi.typeof(out[0]).fields}

    def submit(self, cmds: Sequence[Command]) -> int:
        """Queue Command records; returns how many were accepted (fewer than given when
        trackers run out: poll, then resubmit the rest). Raises QueueError when a command is
        refused (nothing of the call is queued then)."""
        n = len(cmds)
        if n == 0:
            return 0
        sqes = ffi.new("struct idma_sqe[]", n)
        ios = ffi.new("struct idma_io[]", n)
        raw = ffi.buffer(sqes)
        for i, c in enumerate(cmds):
            raw[i * SQE_SIZE:(i + 1) * SQE_SIZE] = _sqe_bytes(c.sqe)
            ios[i].buf, ios[i].len, ios[i].tag = c.addr, c.length, c.tag
            ios[i].mbuf, ios[i].mlen = c.meta_addr, c.meta_length
        rc = lib.idma_qpair_submit(self._q, sqes, ios, n)
        if rc < 0:
            raise self._error(rc, lib.idma_qpair_bad_index(self._q))
        return int(rc)

    def find_cid(self, tag: int) -> int | None:
        """The CID the engine gave the in-flight command of tag (None if none is in flight)."""
        cid = int(lib.idma_qpair_find_cid(self._q, tag))
        return None if cid < 0 else cid

    def submit_unchecked(self, cmds: Sequence[Command]) -> int:
        """UNSAFE: queue SQEs exactly as given (their PRP1/PRP2, MPTR and PSDT reach the device
        unchecked; addr and length are ignored). Only for showing what the IOMMU does with a
        pointer nothing mapped. Returns how many were accepted, like submit()."""
        n = len(cmds)
        if n == 0:
            return 0
        sqes = ffi.new("struct idma_sqe[]", n)
        tags = ffi.new("uint64_t[]", [c.tag for c in cmds])
        raw = ffi.buffer(sqes)
        for i, c in enumerate(cmds):
            raw[i * SQE_SIZE:(i + 1) * SQE_SIZE] = _sqe_bytes(c.sqe)
        rc = lib.idma_qpair_submit_unchecked(self._q, sqes, tags, n)
        if rc < 0:
            raise self._error(rc)
        return int(rc)

    def set_shadow(self, shadow_addr: int, eventidx_addr: int, *,
                   mmio_always: bool = False) -> None:
        """Use shadow doorbells (Doorbell Buffer Config, NVMe Base 2.0 §5.8) at the two
        page-aligned pages given to the controller; 0, 0 goes back to MMIO doorbells only.
        mmio_always: also write BAR0 on every doorbell (for the admin queue)."""
        rc = lib.idma_qpair_set_shadow(self._q, ffi.cast("uint32_t *", shadow_addr),
                                       ffi.cast("uint32_t *", eventidx_addr), int(mmio_always))
        if rc < 0:
            raise self._error(rc)

    def set_sgl(self, sgl: bool) -> None:
        """Describe the data of this (I/O) queue's commands with one SGL Data Block descriptor
        (PSDT 01b, NVMe Base 2.0 §4.1.2) instead of PRPs; False: PRPs again."""
        rc = lib.idma_qpair_set_sgl(self._q, int(sgl))
        if rc < 0:
            raise self._error(rc)

    def set_cq_batch(self, batch: int) -> None:
        """Defer CQ head MMIO writes up to batch consumed entries (never letting the
        controller see a full CQ); 0 or 1: one CQ head write per poll."""
        lib.idma_qpair_set_cq_batch(self._q, batch)

    def _poll_to(self, out: Any, max_cpl: int) -> int:
        """Reap up to max_cpl completions into out (no waiting); the count."""
        n = lib.idma_qpair_poll(self._q, out, max_cpl)
        if n < 0:
            raise self._error(n)        # a closed pair (NULL) reads as ClosedError
        return int(n)

    def _wait_to(self, out: Any, max_cpl: int, min_cpl: int, timeout: float) -> int:
        """Busy-poll into out until min_cpl completions or timeout seconds; the count."""
        ns = min(int(timeout * 1e9), 2**64 - 1) if timeout >= 0 else 2**64 - 1
        n = lib.idma_qpair_wait(self._q, out, max_cpl, max(0, min(min_cpl, max_cpl)), ns)
        if n < 0:
            raise self._error(n)
        return int(n)

    @staticmethod
    def _completions(out: Any, n: int) -> list[Completion]:
        return [Completion(int(out[i].tag), int(out[i].result), int(out[i].cid),
                           int(out[i].status)) for i in range(n)]

    # poll() and wait() reap into an array of their own: the engine's in-use flag covers only
    # the C call, and a shared array could be refilled by another thread before it is read.

    def poll(self, max_cpl: int | None = None) -> list[Completion]:
        """Reap what has completed, without waiting (GIL released inside)."""
        m = self.depth if max_cpl is None else max(0, min(max_cpl, self.depth))
        out = ffi.new("struct idma_cpl[]", max(m, 1))
        return self._completions(out, self._poll_to(out, m))

    def wait(self, min_cpl: int = 1, timeout: float = 1.0,
             max_cpl: int | None = None) -> list[Completion]:
        """Busy-poll in C (GIL released) until min_cpl completions (capped at the commands in
        flight) or timeout seconds; may return fewer on timeout."""
        m = self.depth if max_cpl is None else max(0, min(max_cpl, self.depth))
        out = ffi.new("struct idma_cpl[]", max(m, 1))
        return self._completions(out, self._wait_to(out, m, min_cpl, timeout))

    # Reaping that survives an exception raised between the engine call and its use (Ctrl-C's
    # KeyboardInterrupt arrives exactly there when it came during the wait): the engine writes
    # completions into `reaped`, whose entries hold tag 0 when free (tags start at 1), so what
    # was reaped can always be found again: the entries with a non-zero tag form a prefix.

    @property
    def reaped(self) -> Any:
        """The `struct idma_cpl[depth]` reap_into/wait_into fill (tag 0 = free entry); for a
        caller that serializes its own use of the queue pair (IoQueue holds its lock)."""
        return self._cpl

    def reap_into(self) -> int:
        """Reap what has completed into `reaped`; the count. Call only when `reaped` is free."""
        return self._poll_to(self._cpl, self.depth)

    def wait_into(self, min_cpl: int, timeout: float) -> int:
        """Like wait(), into `reaped`; the count."""
        return self._wait_to(self._cpl, self.depth, min_cpl, timeout)

    def run(self, cmds: Iterable[Command], timeout: float = 5.0) -> list[Completion]:
        """Submit every command (waiting for trackers as needed) and wait for all of them."""
        todo = list(cmds)
        done: list[Completion] = []
        deadline = time.monotonic() + timeout
        while todo or self.inflight:
            if todo:
                todo = todo[self.submit(todo):]
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueError(ETIMEDOUT)
            done += self.wait(1, left)
        return done


class BatchIo:
    """Fast path for Python-driven reads/writes: one native call submits n commands from an
    array of LBAs and tags (buffer of tag t: buf_addr + t * nlb * lba_size), one native call
    reaps into preallocated tag/status arrays. No Python object per I/O.

        b = BatchIo(qp, nsid, lba_size, buf_addr, slots=32)
        b.lbas[:] = ...                   # array('Q'): LBAs the next submits consume in order
        n = b.reap(1)                     # b.tags[:n], b.status[:n] (0 = success)
        b.submit(n)                       # resubmit the slots in b.tags[:n] (or b.submit_all())
    """

    def __init__(self, qpair: QueuePair, nsid: int, lba_size: int, buf_addr: int, slots: int,
                 *, nlb: int = 1, opcode: int = 0x02, lba_capacity: int = 1 << 16) -> None:
        from array import array

        self.qpair, self.nsid, self.nlb, self.opcode = qpair, nsid, nlb, opcode
        self.lba_size, self.buf_addr, self.slots = lba_size, buf_addr, slots
        self.stride = nlb * lba_size
        self.lbas = array("Q", bytes(8 * lba_capacity))
        self.tags = array("Q", range(slots))
        self.status = array("H", bytes(2 * slots))
        self._lba_p = ffi.from_buffer("uint64_t[]", self.lbas)
        self._tag_p = ffi.from_buffer("uint64_t[]", self.tags)
        self._st_p = ffi.from_buffer("uint16_t[]", self.status)
        self._zero = bytes(2 * slots)
        self.pos = 0                    # next unused entry of lbas

    def submit(self, n: int) -> int:
        """Submit the slots b.tags[:n] with the next n LBAs of b.lbas (wrapping to the start
        when fewer than n are left). Returns how many were queued. 0 <= n <= slots."""
        if not 0 <= n <= self.slots or n > len(self.lbas):
            raise ValueError(f"BatchIo.submit({n}): n must be within 0..{self.slots} (slots)")
        if self.pos + n > len(self.lbas):
            self.pos = 0
        rc = lib.idma_qpair_submit_rw(self.qpair._q, self.opcode, self.nsid, self.nlb,
                                      self.lba_size, self._lba_p + self.pos, self._tag_p, n,
                                      self.buf_addr, self.stride)
        if rc < 0:
            raise self.qpair._error(rc, lib.idma_qpair_bad_index(self.qpair._q))
        self.pos += rc
        return int(rc)

    def reap(self, min_cpl: int = 1, timeout: float = 1.0) -> int:
        """Wait (GIL released) for at least min_cpl completions; their tags and statuses are
        in b.tags[:n] and b.status[:n]. Returns n."""
        n = lib.idma_qpair_wait_tags(self.qpair._q, self._tag_p, self._st_p, self.slots,
                                     max(0, min_cpl), max(0, int(timeout * 1e9)))
        if n < 0:
            raise self.qpair._error(n)
        return int(n)

    def errors(self, n: int) -> int:
        """How many of the last n reaped completions carry a non-zero status."""
        if self.status.tobytes()[:2 * n] == self._zero[:2 * n]:
            return 0
        return sum(1 for s in self.status[:n] if s)


# ---- worker ----

@dataclass
class WorkerConfig:
    """Parameters of the native I/O worker (native/worker.h struct idma_worker_cfg)."""

    nsid: int
    lba_size: int
    lba_count: int
    buf_addr: int                   # DMA area of qd * block_lbas * lba_size bytes
    lba_start: int = 0
    block_lbas: int = 1
    qd: int = 1
    read_pct: int = 100
    random: bool = False
    verify: bool = False
    verify_all: bool = False
    duration: float = 0.0           # seconds (0 = no time limit)
    io_count: int = 0               # 0 = no count limit
    seed: int = 1
    io_timeout: float = 30.0
    spin_only: bool = False         # False: sleep while waiting when the host CPU is contended
    idle_spin: float = 0.0          # seconds of spinning before sleeping (0 = 50 us; with
                                    # irq_fd: 0 = sleep at once, > 0 = hybrid spin)
    idle_sleep: float = 0.0         # sleep step (0 = 20 us)
    irq_fd: int = -1                # the queue's MSI-X eventfd to sleep on while waiting
                                    # (interrupt/hybrid queue: q.irq.fd); -1 = poll

    @property
    def buffer_bytes(self) -> int:
        return self.qd * self.block_lbas * self.lba_size


@dataclass
class WorkerResult:
    """Outcome of one worker run; latencies in ns, hist maps bucket low bound -> count."""

    rc: int
    ios: int
    reads: int
    writes: int
    bytes: int
    errors: int
    first_error_status: int
    first_error_opcode: int
    first_error_lba: int
    verify_failures: int
    first_verify_lba: int
    elapsed_ns: int
    timed_out: bool
    lat_min_ns: int
    lat_avg_ns: int
    lat_p50_ns: int
    lat_p99_ns: int
    lat_p999_ns: int
    lat_max_ns: int
    hist: dict[int, int] = field(default_factory=dict)

    @property
    def iops(self) -> float:
        return self.ios * 1e9 / self.elapsed_ns if self.elapsed_ns else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes * 1e3 / self.elapsed_ns if self.elapsed_ns else 0.0


def _cfg_struct(c: WorkerConfig) -> Any:
    cfg = ffi.new("struct idma_worker_cfg *")
    cfg.nsid, cfg.lba_size, cfg.block_lbas, cfg.qd = c.nsid, c.lba_size, c.block_lbas, c.qd
    cfg.read_pct, cfg.random, cfg.verify = c.read_pct, int(c.random), int(c.verify)
    cfg.verify_all = int(c.verify_all)
    cfg.lba_start, cfg.lba_count = c.lba_start, c.lba_count
    cfg.duration_ns, cfg.io_count = int(c.duration * 1e9), c.io_count
    cfg.seed, cfg.buf, cfg.io_timeout_ns = c.seed, c.buf_addr, int(c.io_timeout * 1e9)
    cfg.spin_only = int(c.spin_only)
    cfg.idle_spin_ns, cfg.idle_sleep_ns = int(c.idle_spin * 1e9), int(c.idle_sleep * 1e9)
    cfg.irq_fd = c.irq_fd if c.irq_fd >= 0 else -1     # 0 is a valid fd: -1 = none
    return cfg


def _result(r: Any) -> WorkerResult:
    scalars = {name: int(getattr(r, name)) for name in WorkerResult.__dataclass_fields__
               if name not in ("hist", "timed_out")}
    hist = {int(lib.idma_hist_low(i)): int(r.hist[i])
            for i in range(lib.IDMA_HIST_BUCKETS) if r.hist[i]}
    return WorkerResult(**scalars, timed_out=bool(r.timed_out), hist=hist)


def new_progress() -> Any:
    """A `struct idma_worker_progress *` that another thread may read (ios, bytes, errors,
    verify_failures, elapsed_ns, running) and set .stop = 1 on to end the run early."""
    return ffi.new("struct idma_worker_progress *")


def run_worker(qpair: QueuePair, config: WorkerConfig, progress: Any = None) -> WorkerResult:
    """Run the native worker loop on qpair until done (GIL released for the whole run).
    Raises QueueError for a refused configuration or a queue pair another thread is using;
    I/O errors are reported in the result."""
    cfg = _cfg_struct(config)
    res = ffi.new("struct idma_worker_result *")
    rc = lib.idma_worker_run(qpair.cdata, cfg, res, progress if progress is not None else ffi.NULL)
    if rc in (EINVAL, EBUSY, ECLOSED):       # ECLOSED: the queue was closed during the run
        raise qpair._error(rc)
    return _result(res)

"""A queue pair with its DMA memory, futures for commands, back-pressure and device ownership.

Used for the admin queue (qid 0) and each I/O queue. A future's result() reaps its queue
until the command completes: by polling the CQ, or (a queue with an interrupt, see
interrupts.py) by sleeping on its MSI-X vector, or by polling a bounded time first (hybrid).

Thread model: an IoQueue may be shared by threads. One lock guards its state and every call
into the engine (which releases the GIL); a thread waiting for its command polls in slices of
at most POLL_SLICE seconds and releases the lock in between, so other threads submit and reap
meanwhile (a completion reaped by one thread resolves another thread's future). With an
interrupt, one waiting thread at a time sleeps on the vector (without the lock) and reaps
when it fires; the others sleep on a condition it notifies when it has handled completions.
Done-callbacks run after the lock is released, in the thread that ended the command.

Ownership (NVMe Base 2.0 §3.3.1: the controller may access a command's memory until it posts
the completion): the commands of one submission share a lease on the memory they point at,
which lives until the queue drops the last of them: when its completion is reaped, or when
the queue is torn down after the device can no longer touch it (queue deleted, controller
disabled or gone). A DmaBuffer freed while a lease on it lives is quarantined; other buffer
objects are kept referenced (and their buffer export held) for as long; a view of a DmaBuffer
leases the DmaBuffer too.

Interruption (Ctrl-C's KeyboardInterrupt, raised between any two Python calls): every step that
moves a command between "queued", "in flight" and "done" is recorded so that the next call on
the queue finishes it (_recover): reaped completions stay in the engine's output array until
handled, a submission in progress is settled from the engine's in-flight count, and handling a
completion twice is harmless. The worst an interrupt can do is leave a buffer quarantined;
it never frees memory the device may still write, nor loses or duplicates a command.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.memory import DmaAllocator, DmaBuffer, owning_buffer
from iommu_dma.nvme.interrupts import QueueInterrupt
from iommu_dma.nvme.queue import (
    EUNMAPPED,
    Command,
    Completion,
    QueueError,
    QueuePair,
    prp_list_pages,
)
from iommu_dma.nvme.recovery import RecoveryPolicy, retry_delay, should_retry
from iommu_dma.nvme.sqe import SQE_SIZE, Sqe
from iommu_dma.nvme.status import ControllerFailedError, NvmeError, NvmeTimeoutError

log = logging.getLogger(__name__)

CQE_SIZE = 16
POLL_SLICE = 0.001          # longest a waiter holds the queue lock inside the engine
IRQ_SLICE = 0.05            # longest a waiter sleeps on an interrupt before looking around
EXPIRY_CHECK = 0.01         # how often process() looks for commands past their deadline
QUEUE_DEFAULT = -1.0        # a submission's timeout: the queue's policy decides


class NotMappedError(IommuDmaError):
    """A data buffer is not DMA-mapped; the command was not sent."""


class _Lease:
    """The device's hold on the memory of one submission's commands: the owner (a DmaBuffer,
    or any buffer object whose export is held so it cannot be resized; a tuple of them for
    data and metadata) stays the device's for as long as this object lives, i.e. until the
    queue drops the last of those commands."""

    __slots__ = ("owner", "views", "__weakref__")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.views = [memoryview(o) for o in _owners(owner)  # type: ignore[arg-type]
                      if not isinstance(o, DmaBuffer)]


def _owners(owner: object) -> tuple[object, ...]:
    return owner if isinstance(owner, tuple) else (owner,)


@dataclass(eq=False)
class PendingCommand:
    """One command the queue holds: queued, in flight, or waiting for a retry; what the
    recovery (Controller) is handed when it times out."""

    cmd: Command
    future: IoFuture
    lease: _Lease | None = None          # the device's hold on the command's data memory
    retries: int = 0
    timeout: float | None = None         # seconds per attempt (None: no limit)
    deadline: float = math.inf           # monotonic time the current attempt expires
    not_before: float = 0.0              # a delayed retry (CRD) is sent from then on
    timed_out: bool = False              # past its deadline: recovery owns it
    tag: int = 0                         # the engine's tag while in flight


class IoFuture:
    """The outcome of one submitted command: DW0 result, or NvmeError for an error status."""

    __slots__ = ("_queue", "what", "completion", "_error", "_callbacks")

    def __init__(self, queue: IoQueue, what: str) -> None:
        self._queue = queue
        self.what = what
        self.completion: Completion | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[IoFuture], object]] | None = None

    def done(self) -> bool:
        return self.completion is not None or self._error is not None

    def exception(self) -> BaseException | None:
        """The error the command ended with (None if it succeeded or is still running)."""
        return self._error

    def _finish(self, cpl: Completion | None, error: BaseException | None = None) -> None:
        """Called with the queue lock held; callbacks run once it is released."""
        self.completion, self._error = cpl, error
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            self._queue._due.extend((fn, self) for fn in callbacks)

    def add_done_callback(self, fn: Callable[[IoFuture], object]) -> None:
        """Call fn(future) when the command ends (at once if it has), like
        concurrent.futures.Future. It runs in the thread that reaps the completion (or ends
        the command: a reset, close), after the queue's lock is released, so it may submit
        more commands; it should be quick. An exception it raises is logged."""
        with self._queue._lock:
            if not self.done():
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    def expire(self, waited: float | None = None) -> None:
        """Give up waiting: the command counts as timed out now (after `waited` seconds, for
        its error text) and goes to recovery; done() once that has settled it."""
        self._queue._expire(self, waited)

    def wait(self, timeout: float | None = None) -> bool:
        """Poll the queue until this command completes or timeout seconds pass; done()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        step = self._queue.wait_slice
        while not self.done():
            left = step if deadline is None else min(deadline - time.monotonic(), step)
            if left <= 0:
                return False
            try:
                self._queue.process(timeout=left)
            except IommuDmaError:       # e.g. the queue closed: this command's own error
                if not self.done():     # wins once it has one
                    raise
        return True

    def result(self, timeout: float | None = None) -> int:
        """Wait for this command; DW0 of its completion, or its error. A command not done
        within timeout seconds is treated as timed out: it is aborted and, if it does not come
        back, the controller is reset (see RecoveryPolicy); it then fails with
        NvmeTimeoutError. Its memory stays the device's until then."""
        if not self.wait(timeout):
            self.expire(timeout)
        if not self.done():
            raise NvmeTimeoutError(
                f"{self.what}: no completion within {timeout} s on queue {self._queue.qid}; "
                "the command is still owned by the device (its buffer is quarantined until "
                "the controller completes it or is reset)")
        if self._error is not None:
            raise self._error
        assert self.completion is not None
        return self.completion.result


class IoQueue:
    """SQ and CQ rings, PRP list pages per tracker, and the native engine driving them."""

    def __init__(self, qid: int, depth: int, allocator: DmaAllocator, bar0_addr: int,
                 bar0_size: int, *, dstrd: int, page_size: int, max_transfer: int,
                 maptable: object, shadow: tuple[int, int] | None = None,
                 policy: RecoveryPolicy | None = None, irq: QueueInterrupt | None = None
                 ) -> None:
        """max_transfer: the largest data transfer of one command (sizes the PRP lists);
        shadow: (shadow doorbell page, EventIdx page) addresses when the controller has
        Doorbell Buffer Config enabled (NVMe Base 2.0 §5.8); irq: the MSI-X vector its CQ
        signals (None: polled), which the queue owns from now on."""
        self.qid = qid
        self.depth = depth
        self.allocator = allocator
        self.max_transfer = max_transfer
        self.policy = policy if policy is not None else RecoveryPolicy()
        # this queue's own command deadline in seconds (None: no limit); QUEUE_DEFAULT: the
        # policy's (io_timeout, or admin_timeout for the admin queue)
        self.timeout: float | None = QUEUE_DEFAULT
        # Called (without the queue lock) with commands past their deadline: the controller
        # aborts them or resets. Without it, they stay with the device until they complete.
        self.on_timeout: Callable[[IoQueue, list[PendingCommand]], None] | None = None
        self.irq = irq
        self.loop: object | None = None        # the asyncio loop that reaps it (aio.py)
        self.watch: Callable[[], None] | None = None   # told when a command is awaited
        # called once, after the lock is released, when the queue closes (e.g. an event
        # loop stops watching its interrupt)
        self.on_close: list[Callable[[IoQueue], None]] = []
        pages_each = max(1, prp_list_pages(max_transfer, page_size))
        self._memory: list[DmaBuffer] = []
        self.sq_mem = self._zeroed(depth * SQE_SIZE, page_size)
        self.cq_mem = self._zeroed(depth * CQE_SIZE, page_size)
        self.lists = self._zeroed((depth - 1) * pages_each * page_size, page_size)
        self.sgl = False                        # data pointers: SGL (True) or PRPs
        self._engine_args: dict[str, Any] = dict(
            bar0_addr=bar0_addr, bar0_size=bar0_size, dstrd=dstrd, page_size=page_size,
            list_pages=(depth - 1) * pages_each, maptable=maptable)
        try:
            self.qpair = self._new_qpair(shadow)
        except BaseException:
            self._free_memory()
            if irq is not None:
                irq.close()
            raise
        self._lock = threading.Lock()
        self._due: deque[tuple[Callable[[IoFuture], object], IoFuture]] = deque()
        self._sleeper = threading.Lock()        # held by the one thread asleep on the irq
        self._wakeup = threading.Condition(self._lock)   # the other waiters sleep on this
        self._handled = 0                       # completions handled so far (wakeup test)
        self._tags = itertools.count(1)
        self._inflight: dict[int, PendingCommand] = {}
        self._backlog: deque[PendingCommand] = deque()
        # (engine in-flight count before, commands, tags) while a submission is in progress
        self._submitting: tuple[int, list[PendingCommand], list[int]] | None = None
        self._abandoned: list[PendingCommand] = []
        self._orphans: list[PendingCommand] = []     # failed while the device may hold them
        self._delayed: list[PendingCommand] = []     # retries waiting for their CRD delay
        self._next_expiry = 0.0
        self._paused = False                   # a controller reset owns the rings
        self.closed = False
        self._close_error: BaseException | None = None
        self.unknown_completions = 0

    def _new_qpair(self, shadow: tuple[int, int] | None) -> QueuePair:
        a = self._engine_args
        q = QueuePair(self.qid, self.depth, self.sq_mem.addr, self.cq_mem.addr,
                      a["bar0_addr"], a["bar0_size"], dstrd=a["dstrd"],
                      page_size=a["page_size"], list_addr=self.lists.addr,
                      list_pages=a["list_pages"], maptable=a["maptable"])
        if shadow is not None:
            q.set_shadow(*shadow)
        if self.sgl:
            q.set_sgl(True)
        return q

    def use_sgl(self, sgl: bool = True) -> None:
        """Describe data with an SGL (True) or PRPs (False) from the next command on; kept
        across controller resets. Only for I/O queues of a controller that supports SGLs
        (Controller.create_io_queue(sgl=True) checks Identify SGLS)."""
        with self._lock:
            self._check_open()
            self.qpair.set_sgl(sgl)
            self.sgl = sgl

    def _zeroed(self, size: int, align: int) -> DmaBuffer:
        buf = self.allocator.alloc(size, align)
        ctypes.memset(buf.addr, 0, size)
        self._memory.append(buf)
        return buf

    def _free_memory(self) -> None:
        for mem in self._memory:
            mem.free()
        self._memory.clear()

    def _check_open(self) -> None:
        if self.closed and isinstance(self._close_error, ControllerFailedError):
            raise self._close_error.again()         # e.g. DeviceGoneError, a ClosedError
        if self.closed:
            raise ClosedError(f"I/O queue {self.qid}" if self.qid else "the admin queue")

    def _run_due(self) -> None:
        """Run the done-callbacks of commands that ended while the lock was held (called
        after releasing it, so a callback may use the queue; an interrupted run leaves the
        rest for the next call)."""
        due = self._due
        while due:
            try:
                fn, future = due.popleft()
            except IndexError:          # another thread took the last one
                return
            _run_callback(fn, future)

    # ---- submission ---------------------------------------------------------------------

    def submit(self, sqe: Sqe, addr: int = 0, length: int = 0, what: str = "",
               owner: object = None, timeout: float | None = QUEUE_DEFAULT, *,
               meta_addr: int = 0, meta_length: int = 0) -> IoFuture:
        """Queue one command (the device sees it at the next doorbell write); meta_addr /
        meta_length: its separate metadata buffer (MPTR), which owner must then cover too
        (a tuple of the data and metadata owners)."""
        cmd = Command(sqe, addr, length, 0, what, meta_addr, meta_length)
        return self.submit_many([cmd], owner, timeout)[0]

    def submit_many(self, cmds: Sequence[Command], owner: object = None,
                    timeout: float | None = QUEUE_DEFAULT) -> list[IoFuture]:
        """Queue commands with one doorbell write; what does not fit waits in a backlog that
        is sent as completions free trackers (back-pressure, nothing dropped). owner: the
        object the commands' data pointers point into (a DmaBuffer, or any buffer object):
        it belongs to the device until each command's completion is reaped. timeout: seconds
        each command may be in flight before it is recovered (default: the policy's; None:
        no limit)."""
        if timeout == QUEUE_DEFAULT:
            timeout = self.timeout
        if timeout == QUEUE_DEFAULT:
            timeout = self.policy.timeout_for(self.qid)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout}")
        with self._lock:
            self._check_open()
            items = [PendingCommand(c, IoFuture(self, c.what or _describe(c.sqe)), timeout=timeout)
                     for c in cmds]
            if owner is not None and items:
                lease = _Lease(owner)
                for o in _owners(owner):
                    buf = owning_buffer(o)      # also for a view of a DmaBuffer
                    if buf is not None:
                        buf._allocator.device_acquire(buf, lease)
                for p in items:
                    p.lease = lease
            self._backlog.extend(items)
            self._send_backlog()
        self._run_due()
        return [p.future for p in items]

    def submit_unchecked(self, sqe: Sqe, what: str = "") -> IoFuture:
        """UNSAFE, for tests of the IOMMU: send sqe with its PRP1/PRP2, MPTR and PSDT exactly
        as given, without the mapped-range check every other path applies. The device may
        then aim DMA at memory nobody mapped; the IOMMU is what stops it."""
        with self._lock:
            self._check_open()
            self._recover()
            p = PendingCommand(Command(sqe, 0, 0, next(self._tags), what), IoFuture(self, what or
                                                                            _describe(sqe)))
            self._submitting = (self.qpair.inflight, [p], [p.cmd.tag])
            if self.qpair.submit_unchecked([p.cmd]) == 0:
                self._submitting = None
                raise IommuDmaError(f"{p.future.what}: queue {self.qid} has no free entry")
            self._settle_submit()
        return p.future

    @staticmethod
    def _release(p: PendingCommand) -> None:
        """The device is done with p's memory: p lets go of its lease."""
        p.lease = None

    def _send_backlog(self) -> None:
        while self._backlog and not self._paused:
            batch = list(self._backlog)
            tags = [next(self._tags) for _ in batch]
            self._submitting = (self.qpair.inflight, batch, tags)
            try:
                self.qpair.submit([p.cmd._replace(tag=t) for p, t in zip(batch, tags)])
            except QueueError as e:             # refused: nothing of the call was queued
                self._submitting = None
                bad = batch[e.index] if e.index >= 0 else batch[0]
                self._backlog.remove(bad)
                self._release(bad)              # never reached the device
                bad.future._finish(None, _refusal(e, bad))
                continue
            self._settle_submit()
            return

    def _settle_submit(self) -> None:
        """Move what the engine accepted from the backlog to in flight (idempotent)."""
        if self._submitting is None:
            return
        before, batch, tags = self._submitting
        sent = self.qpair.inflight - before     # no reaping since: callers _recover() first
        now = time.monotonic()
        for p, t in zip(batch[:sent], tags[:sent]):
            self._inflight[t] = p
            p.tag = t
            p.deadline = now + p.timeout if p.timeout is not None else math.inf
            if self._backlog and self._backlog[0] is p:
                self._backlog.popleft()
        self._submitting = None

    def _recover(self) -> None:
        """Finish what an exception interrupted in a previous call (see the module text)."""
        self._settle_submit()
        self._handle_reaped()

    # ---- completion ----------------------------------------------------------------------

    @property
    def wait_slice(self) -> float:
        """Longest single wait of a waiting thread before it looks around again."""
        return IRQ_SLICE if self.irq is not None and self.irq.mode != "poll" else POLL_SLICE

    def process(self, timeout: float = 0.0) -> int:
        """Reap completions (waiting up to timeout for at least one: polling, or sleeping on
        the interrupt), resolve their futures, retry what may be retried, send backlog, and
        hand commands past their deadline to the recovery (on_timeout); returns how many
        completed."""
        irq = self.irq
        spin = timeout if irq is None or irq.mode == "poll" else min(timeout, irq.spin)
        n, expired, idle, seen = self._reap(spin)
        if n == 0 and not idle and timeout > spin and irq is not None:
            self._sleep(timeout - spin, seen)
            n, expired2, idle, _ = self._reap(0.0)
            expired += expired2
        if idle and timeout > 0:
            time.sleep(min(timeout, POLL_SLICE))   # nothing to poll: a reset or a retry delay
        self._run_due()
        if expired and self.on_timeout is not None:
            self.on_timeout(self, expired)
        return n

    def _reap(self, spin: float) -> tuple[int, list[PendingCommand], bool, int]:
        """Reap (polling up to spin seconds for one completion) and handle what came back;
        (completions, commands past their deadline, nothing to wait for, handled count)."""
        n, expired, idle = 0, [], False
        with self._lock:
            self._check_open()
            self._recover()
            if self._paused:
                idle = True
            else:
                if spin > 0 and self._inflight:
                    self.qpair.wait_into(1, spin)
                else:
                    self.qpair.reap_into()
                    idle = not self._inflight
                n = self._handle_reaped()
                self._release_delayed()
                self._send_backlog()
                expired = self._expired()
            return n, expired, idle, self._handled

    def _sleep(self, timeout: float, seen: int) -> None:
        """Sleep until completions arrive or timeout (see the module text): the first waiter
        sleeps on the interrupt, the others on the condition. `seen`: the handled count the
        caller saw; if it moved since, something completed and nobody sleeps."""
        irq = self.irq
        assert irq is not None
        if not self._sleeper.acquire(blocking=False):
            with self._lock:
                if self._handled == seen and not self.closed:
                    self._wakeup.wait(timeout)
            return
        try:
            with self._lock:
                if self._handled != seen or self.closed:
                    return
            irq.wait(timeout)
        finally:
            self._sleeper.release()
            with self._lock:
                if self.closed:
                    irq.close()
                self._wakeup.notify_all()       # another waiter takes over the interrupt

    def _expired(self) -> list[PendingCommand]:
        """In-flight commands past their deadline, marked timed out (checked every
        EXPIRY_CHECK seconds at most)."""
        now = time.monotonic()
        if now < self._next_expiry:
            return []
        self._next_expiry = now + EXPIRY_CHECK
        out = [p for p in self._inflight.values() if p.deadline <= now and not p.timed_out]
        for p in out:
            p.timed_out = True
        return out

    def _expire(self, future: IoFuture, waited: float | None = None) -> None:
        """The caller stopped waiting for future: it is timed out now, also if its completion
        is about to be reaped. Not yet sent (backlog, retry delay): it fails with
        NvmeTimeoutError at once. In flight: it goes to the recovery (on_timeout)."""
        expired: list[PendingCommand] = []
        with self._lock:
            if self.closed or future.done():
                return
            for queue in (self._backlog, self._delayed):
                p = next((p for p in queue if p.future is future), None)
                if p is not None:
                    queue.remove(p)
                    self._release(p)
                    p.future._finish(None, NvmeTimeoutError(
                        f"{future.what}: not sent within its timeout (queue {self.qid} full or "
                        "a retry delay running)"))
                    break
            for p in self._inflight.values():
                if p.future is future and not p.timed_out:
                    p.timed_out = True
                    p.timeout = waited
                    expired.append(p)
        self._run_due()
        if expired and self.on_timeout is not None:
            self.on_timeout(self, expired)

    def _release_delayed(self) -> None:
        if not self._delayed:
            return
        now = time.monotonic()
        due = [p for p in self._delayed if p.not_before <= now]
        for p in due:
            self._delayed.remove(p)
            self._backlog.append(p)

    def _handle_reaped(self) -> int:
        """Complete every entry the engine wrote to its output array, then free the entries
        from the last to the first (so that the used entries always form a prefix)."""
        out = self.qpair.reaped
        n = 0
        while n < self.depth and out[n].tag:
            e = out[n]
            self._complete(Completion(int(e.tag), int(e.result), int(e.cid), int(e.status)))
            n += 1
        for i in range(n - 1, -1, -1):
            out[i].tag = 0
        if n and self.irq is not None:
            self._handled += n
            self._wakeup.notify_all()
        return n

    def _complete(self, cpl: Completion) -> None:
        """Resolve the command of one completion; safe to repeat for the same completion (it
        leaves the in-flight table only once resolved, so an interrupt in between leaves it
        for the next call to resolve again)."""
        p = self._inflight.get(cpl.tag)
        if p is None:                   # handled already, or a tag we never used
            self.unknown_completions += 1
            return
        self._resolve(p, cpl)
        del self._inflight[cpl.tag]

    def _resolve(self, p: PendingCommand, cpl: Completion) -> None:
        if p.timed_out:                 # came back after its deadline (aborted, or late)
            status = "success" if cpl.ok else NvmeError(cpl.status, "").name
            p.future._finish(cpl, NvmeTimeoutError(
                f"{p.future.what}: timed out after {p.timeout} s on queue {self.qid}; it "
                f"completed afterwards ({status}) once the Abort was sent"))
            self._release(p)
            return
        if cpl.ok:
            p.future._finish(cpl)
            self._release(p)
            return
        err = NvmeError(cpl.status, p.future.what)
        if should_retry(err.status, p.retries, self.policy.retries):
            # §4.6.1.2.1: DNR clear, sent again after the delay CRD selects (owner kept)
            if p not in self._backlog and p not in self._delayed:
                p.retries += 1
                p.not_before = time.monotonic() + retry_delay(err.status, self.policy.crdt)
                self._delayed.append(p)
        else:
            p.future._finish(cpl, err)
            self._release(p)

    @property
    def outstanding(self) -> int:
        return len(self._inflight) + len(self._backlog) + len(self._delayed)

    # ---- controller reset ------------------------------------------------------------------

    def command_id(self, p: PendingCommand) -> int | None:
        """The CID of p while it is in flight (for an Abort), else None."""
        with self._lock:
            if self.closed or self._inflight.get(p.tag) is not p:
                return None
            return self.qpair.find_cid(p.tag)

    def give_up(self, p: PendingCommand, error: BaseException) -> None:
        """End p now with error although the device may still hold it (a command that timed
        out while a reset is under way): its memory stays the device's until the controller
        is disabled (fail_in_flight, or close with device_quiet)."""
        with self._lock:
            if self._inflight.get(p.tag) is p:
                del self._inflight[p.tag]
                self._orphans.append(p)
                p.future._finish(None, error)
        self._run_due()

    def pause(self) -> None:
        """Stop touching the rings (a controller reset is about to take them): submissions
        wait in the backlog and process() only sleeps, until resume()."""
        with self._lock:
            self._check_open()
            self._recover()
            self._handle_reaped()
            self._paused = True
        self._run_due()

    def fail_in_flight(self, error: Callable[[PendingCommand], BaseException], *,
                       queued_too: bool = False) -> None:
        """After the controller is disabled (the device can no longer touch this queue's
        memory): end every command in flight with error(p) and release its memory; with
        queued_too, also those not sent yet. Then the rings start empty (reinit())."""
        with self._lock:
            if self.closed:
                return
            self._recover()
            self._handle_reaped()
            ended = list(self._inflight.values())
            if queued_too:
                ended += [*self._backlog, *self._delayed]
                self._backlog.clear()
                self._delayed.clear()
            self._inflight.clear()
            for p in ended:
                self._release(p)
                p.future._finish(None, error(p))
            for p in self._orphans:
                self._release(p)
            self._orphans.clear()
        self._run_due()

    def reinit(self, shadow: tuple[int, int] | None) -> None:
        """Empty rings and a fresh engine queue pair over the same memory (after a reset,
        before the queue is created on the device again)."""
        with self._lock:
            self._check_open()
            assert not self._inflight, "fail_in_flight() first"
            old = self.qpair
            self.qpair = self._new_qpair(shadow)
            old.close()
            ctypes.memset(self.sq_mem.addr, 0, self.sq_mem.size)
            ctypes.memset(self.cq_mem.addr, 0, self.cq_mem.size)

    def resume(self) -> None:
        """Back in service after a reset: send what waited."""
        with self._lock:
            if self.closed:
                return
            self._paused = False
            self._send_backlog()
        self._run_due()

    # ---- teardown ------------------------------------------------------------------------

    def close(self, error: BaseException, *, device_quiet: bool) -> None:
        """Fail every command still queued or in flight with `error` and refuse further use.
        device_quiet: the device can no longer touch this queue's memory (queue deleted,
        controller disabled or gone, or the IOMMU mappings removed): buffers are released
        and the rings freed. Otherwise they stay quarantined for good."""
        with self._lock:
            if self.closed:
                return
            self._recover()
            self.closed = True
            self._close_error = error
            for p in [*self._inflight.values(), *self._backlog, *self._delayed]:
                if device_quiet or p in self._backlog or p in self._delayed:
                    self._release(p)
                else:
                    self._abandoned.append(p)   # keeps its lease: quarantined for good
                p.future._finish(None, error)
            self._inflight.clear()
            self._backlog.clear()
            self._delayed.clear()
            for p in self._orphans:
                if device_quiet:
                    self._release(p)
                else:
                    self._abandoned.append(p)
            self._orphans.clear()
            self.qpair.close()
            if device_quiet:
                self._free_memory()
            self._close_irq()
        self._run_due()
        for hook in self.on_close:
            try:
                hook(self)
            except Exception:
                log.exception("close hook %r of queue %d raised", hook, self.qid)
        self.on_close.clear()

    def _close_irq(self) -> None:
        """Wake the waiters; the descriptor is closed now, or by the sleeper as it leaves."""
        if self.irq is None:
            return
        self._wakeup.notify_all()
        if self._sleeper.acquire(blocking=False):
            self.irq.close()
            self._sleeper.release()
        else:
            self.irq.wake()


def _run_callback(fn: Callable[[IoFuture], object], future: IoFuture) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("done-callback %r of %s raised", fn, future.what)


def _describe(sqe: object) -> str:
    if isinstance(sqe, Sqe):
        return f"opcode {sqe.opcode:#04x} nsid {sqe.nsid}"
    return "command"


def _refusal(e: QueueError, p: PendingCommand) -> IommuDmaError:
    addr, length = p.cmd.addr, p.cmd.length
    if e.rc == EUNMAPPED:
        return NotMappedError(
            f"{p.future.what}: data buffer [{addr:#x}, {addr + length:#x}) is not "
            f"DMA-mapped, command not sent; use memory from Controller.alloc() or register() it")
    return IommuDmaError(f"{p.future.what}: refused before submission: {e}")

"""A queue pair with its DMA memory, futures for commands, and back-pressure handling.

Used for the admin queue (qid 0) and each I/O queue. Completions are reaped by polling: a
future's result() polls its queue until the command completes.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.memory import DmaAllocator, DmaBuffer
from iommu_dma.nvme.queue import EUNMAPPED, Completion, QueueError, QueuePair
from iommu_dma.nvme.sqe import SQE_SIZE, Sqe
from iommu_dma.nvme.status import NvmeError, NvmeTimeoutError

CQE_SIZE = 16
RETRY_LIMIT = 3


class NotMappedError(IommuDmaError):
    """A data buffer is not DMA-mapped; the command was not sent."""


@dataclass
class _Pending:
    sqe: Sqe
    addr: int
    length: int
    future: IoFuture
    retries: int = 0


class IoFuture:
    """The outcome of one submitted command: DW0 result, or NvmeError for an error status."""

    def __init__(self, queue: IoQueue, what: str) -> None:
        self._queue = queue
        self.what = what
        self.completion: Completion | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self.completion is not None or self._error is not None

    def _finish(self, cpl: Completion | None, error: BaseException | None = None) -> None:
        self.completion, self._error = cpl, error

    def result(self, timeout: float | None = None) -> int:
        """Poll the queue until this command completes; DW0 of its completion."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NvmeTimeoutError(f"{self.what}: no completion within {timeout} s on "
                                       f"queue {self._queue.qid}; reset the controller")
            self._queue.process(timeout=min(left, 0.5) if left is not None else 0.5)
        if self._error is not None:
            raise self._error
        assert self.completion is not None
        return self.completion.result


class IoQueue:
    """SQ and CQ rings, one PRP list page per tracker, and the native engine driving them."""

    def __init__(self, qid: int, depth: int, allocator: DmaAllocator, bar0_addr: int, *,
                 dstrd: int, page_size: int, maptable: Any,
                 shadow: tuple[int, int] | None = None) -> None:
        """shadow: (shadow doorbell page, EventIdx page) addresses when the controller has
        Doorbell Buffer Config enabled (NVMe Base 2.0 §5.8)."""
        self.qid = qid
        self.depth = depth
        self.sq_mem = _zeroed(allocator, depth * SQE_SIZE, page_size)
        self.cq_mem = _zeroed(allocator, depth * CQE_SIZE, page_size)
        self.lists = _zeroed(allocator, (depth - 1) * page_size, page_size)
        self.qpair = QueuePair(qid, depth, self.sq_mem.addr, self.cq_mem.addr, bar0_addr,
                               dstrd=dstrd, page_size=page_size, list_addr=self.lists.addr,
                               list_pages=depth - 1, maptable=maptable)
        if shadow is not None:
            self.qpair.set_shadow(*shadow)
        self._tags = itertools.count(1)
        self._inflight: dict[int, _Pending] = {}
        self._backlog: deque[_Pending] = deque()

    def submit(self, sqe: Sqe, addr: int = 0, length: int = 0, what: str = "") -> IoFuture:
        """Queue one command (the device sees it at the next doorbell write)."""
        return self.submit_many([(sqe, addr, length, what)])[0]

    def submit_many(self, cmds: list[tuple[Sqe, int, int, str]]) -> list[IoFuture]:
        """Queue commands with one doorbell write; what does not fit waits in a backlog that
        is sent as completions free trackers (back-pressure, nothing dropped)."""
        items = [_Pending(sqe, addr, length, IoFuture(self, what or _describe(sqe)))
                 for sqe, addr, length, what in cmds]
        self._backlog.extend(items)
        self._send_backlog()
        return [p.future for p in items]

    def _send_backlog(self) -> None:
        if not self._backlog:
            return
        batch = list(self._backlog)
        tags = [next(self._tags) for _ in batch]
        try:
            sent = self.qpair.submit([(p.sqe, p.addr, p.length, t) for p, t in zip(batch, tags)])
        except QueueError as e:
            bad = batch[e.index] if e.index >= 0 else batch[0]
            self._backlog.remove(bad)
            bad.future._finish(None, _refusal(e, bad))
            self._send_backlog()
            return
        for p, t in zip(batch[:sent], tags[:sent]):
            self._inflight[t] = p
            self._backlog.popleft()

    def process(self, timeout: float = 0.0) -> int:
        """Reap completions (waiting up to timeout for at least one), resolve their futures,
        retry retryable statuses, and send backlog; returns how many completed."""
        if timeout > 0 and self._inflight:
            cpls = self.qpair.wait(1, timeout)
        else:
            cpls = self.qpair.poll()
        for c in cpls:
            self._complete(c)
        self._send_backlog()
        return len(cpls)

    def _complete(self, cpl: Completion) -> None:
        p = self._inflight.pop(cpl.tag)
        if cpl.ok:
            p.future._finish(cpl)
            return
        err = NvmeError(cpl.status, p.future.what)
        if err.retryable and p.retries < RETRY_LIMIT:
            p.retries += 1
            self._backlog.append(p)
        else:
            p.future._finish(cpl, err)

    @property
    def outstanding(self) -> int:
        return len(self._inflight) + len(self._backlog)

    def drain(self, timeout: float) -> None:
        """Wait until every submitted command has completed."""
        deadline = time.monotonic() + timeout
        while self.outstanding:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NvmeTimeoutError(f"queue {self.qid}: {self.outstanding} command(s) did "
                                       f"not complete within {timeout} s")
            self.process(timeout=min(left, 0.5))

    def free(self) -> None:
        for mem in (self.sq_mem, self.cq_mem, self.lists):
            mem.free()


def _zeroed(allocator: DmaAllocator, size: int, align: int) -> DmaBuffer:
    buf = allocator.alloc(size, align)
    ctypes.memset(buf.addr, 0, size)
    return buf


def _describe(sqe: Sqe) -> str:
    return f"opcode {sqe.opcode:#04x} nsid {sqe.nsid}"


def _refusal(e: QueueError, p: _Pending) -> IommuDmaError:
    if e.rc == EUNMAPPED:
        return NotMappedError(
            f"{p.future.what}: data buffer [{p.addr:#x}, {p.addr + p.length:#x}) is not "
            f"DMA-mapped, command not sent; use memory from Controller.alloc() or register() it")
    return IommuDmaError(f"{p.future.what}: refused before submission: {e}")

"""asyncio: a queue's completions reaped by an event loop when its MSI-X vector fires.

The queue's interrupt eventfd is registered with the loop (loop.add_reader); each time it
fires, the loop reaps the queue and resolves the commands, whose done-callbacks wake the
awaiting tasks. A timer looks at the queue every TICK seconds while commands are outstanding,
so deadlines (timeouts) and delayed retries are handled even when the device stays silent.
Recovery (Abort, reset) runs in a thread of its own, never blocking the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.native import lib
from iommu_dma.nvme.ioqueue import IoQueue, PendingCommand

log = logging.getLogger(__name__)

TICK = 0.05     # seconds between looks at a queue with outstanding commands


class LoopReaper:
    """Reaps one interrupt-driven queue from one event loop (created in the loop's thread).
    The queue is the loop's alone to reap; other threads may still submit to it."""

    def __init__(self, queue: IoQueue, loop: asyncio.AbstractEventLoop,
                 recover: Callable[[IoQueue, list[PendingCommand]], None]) -> None:
        if queue.irq is None or queue.irq.mode == "poll":
            raise ValueError(f"I/O queue {queue.qid} has no interrupt to watch")
        self.queue = queue
        self.loop = loop
        self.thread = threading.get_ident()
        self._recover = recover
        self._timer: asyncio.TimerHandle | None = None
        self._fd = os.dup(queue.irq.fd)     # the loop's own: closed only once it lets go
        self._detached = False
        queue.on_timeout = self._on_timeout
        queue.on_close.append(self._on_queue_closed)
        queue.loop = loop
        queue.watch = self.watch
        loop.add_reader(self._fd, self._on_interrupt)

    def watch(self) -> None:
        """Commands were submitted: make sure the queue is looked at until they end."""
        if self._timer is None and not self._detached:
            self._timer = self.loop.call_later(TICK, self._tick)

    def _on_interrupt(self) -> None:
        lib.idma_eventfd_wait(self._fd, 0)      # clear the count (non-blocking)
        self._reap()

    def _tick(self) -> None:
        self._timer = None
        self._reap()

    def _reap(self) -> None:
        try:
            self.queue.process(0.0)
        except IommuDmaError:           # closed: the commands already ended with the error
            self._detach()
            return
        if self.queue.outstanding:
            self.watch()

    def _on_timeout(self, queue: IoQueue, expired: list[PendingCommand]) -> None:
        """Abort/reset may take seconds: never in the loop's thread."""
        threading.Thread(target=self._recover, args=(queue, expired), daemon=True,
                         name=f"iommu-dma recovery q{queue.qid}").start()

    def _on_queue_closed(self, queue: IoQueue) -> None:
        """Stop watching; from another thread, the loop does it (it owns its selector)."""
        if threading.get_ident() == self.thread:
            self._detach()
            return
        try:
            self.loop.call_soon_threadsafe(self._detach)
        except RuntimeError:            # the loop is closed: nothing watches any more
            self._detach(in_loop=False)

    def _detach(self, in_loop: bool = True) -> None:
        if self._detached:
            return
        self._detached = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if in_loop and not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        os.close(self._fd)


def completion_future(request: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """An asyncio future that is done when every command of request has ended (it carries
    no value: request.result() is read afterwards)."""
    fut: asyncio.Future[None] = loop.create_future()
    here = threading.get_ident()

    def settle() -> None:
        if not fut.done():          # the awaiting task may have been cancelled
            fut.set_result(None)

    def done(_: object) -> None:
        if threading.get_ident() == here:
            settle()
        else:
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:    # the loop is closed: nobody awaits any more
                pass

    request.add_done_callback(done)
    return fut

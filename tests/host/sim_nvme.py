"""A simulated NVMe I/O controller and IOMMU for host tests of the Python queue layer.

The "IOMMU" is a container stand-in that records mappings in the engine's native range table
(so the engine's mapped-range check is real); the DMA allocator above it is the real one.
The "controller" is a thread that fetches SQEs at the SQ tail doorbell, moves data through the
commands' PRPs (NVMe Base 2.0 §4.1.1) against a bytearray namespace, and posts CQEs with the
phase tag (§4.6). Tests can hold commands back (to make them time out) and release them later.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import time
from typing import Any

from iommu_dma.native import ffi, lib
from iommu_dma.nvme.queue import QueuePair

PAGE = 4096
BAR_SIZE = 16384
LBA = 4096


class SimIommu:
    """What DmaAllocator needs of a Container: ranges, page size, map/unmap, a range table."""

    def __init__(self) -> None:
        self.closed = False
        self.groups = [0]
        self.iova_ranges = [(0, (1 << 47) - 1)]
        self.page_size = PAGE
        self.maptable: Any = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
        self._dependents: list[Any] = []
        self._lock = threading.Lock()

    def _check_open(self) -> None:
        assert not self.closed

    def add_dependent(self, obj: Any) -> None:
        self._dependents.append(obj)

    def remove_dependent(self, obj: Any) -> None:
        self._dependents.remove(obj)

    def check_range(self, addr: int, length: int, op: str = "") -> None:
        pass

    def map(self, addr: int, length: int) -> None:
        with self._lock:
            assert lib.idma_maptable_add(self.maptable, addr, length) == 0

    def unmap(self, addr: int, length: int) -> None:
        with self._lock:
            lib.idma_maptable_remove(self.maptable, addr, length)

    def is_mapped(self, addr: int, length: int) -> bool:
        return bool(lib.idma_maptable_contains(self.maptable, addr, length))


def _read(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


def _write(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


class SimController:
    """Serves I/O queues registered with serve(); Read (02h) and Write (01h) on one namespace."""

    def __init__(self, blocks: int = 4096) -> None:
        self.bar = mmap.mmap(-1, BAR_SIZE)
        self.bar_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.bar))
        self.media = bytearray(blocks * LBA)
        self.blocks = blocks
        self.queues: list[dict[str, Any]] = []
        self.held: list[tuple[dict[str, Any], bytes]] = []
        self.hold_next = 0                     # hold back this many commands (no completion)
        self.fail_lbas: set[int] = set()       # writes starting here fail with Write Fault
        self.fail_status = 0x2 << 8 | 0x80     # ... or with this 15-bit status
        self.commands = 0
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SimController:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)

    def serve(self, qid: int, depth: int, sq_addr: int, cq_addr: int,
              irq_fd: int | None = None) -> None:
        """irq_fd: an eventfd signalled after each posted CQE (as VFIO does for MSI-X)."""
        with self._lock:
            self.queues.append(dict(qid=qid, depth=depth, sq=sq_addr, cq=cq_addr, head=0,
                                    tail=0, phase=1, irq=irq_fd))

    def release_held(self, count: int = 1, timeout: float = 10.0) -> None:
        """Complete the held commands, once `count` of them have been fetched."""
        deadline = time.monotonic() + timeout
        while len(self.held) < count and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._lock:
            held, self.held = self.held, []
            for q, sqe in held:
                self._execute(q, sqe)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                for q in self.queues:
                    self._fetch(q)
            time.sleep(0.0001)

    def _fetch(self, q: dict[str, Any]) -> None:
        off = lib.idma_sq_doorbell_offset(q["qid"], 0)
        tail = struct.unpack_from("<I", self.bar, off)[0]
        while q["head"] != tail:
            sqe = _read(q["sq"] + q["head"] * 64, 64)
            q["head"] = (q["head"] + 1) % q["depth"]
            self.commands += 1
            if self.hold_next:
                self.hold_next -= 1
                self.held.append((q, sqe))
                continue
            self._execute(q, sqe)

    def _execute(self, q: dict[str, Any], sqe: bytes) -> None:
        cdw0, nsid = struct.unpack_from("<II", sqe, 0)
        prp1, prp2 = struct.unpack_from("<QQ", sqe, 24)
        slba, = struct.unpack_from("<Q", sqe, 40)
        nlb = (struct.unpack_from("<I", sqe, 48)[0] & 0xFFFF) + 1
        opcode, cid = cdw0 & 0xFF, cdw0 >> 16
        status = 0
        if opcode in (0x01, 0x02) and slba + nlb > self.blocks:
            status = 0x80                                  # LBA Out of Range
        elif opcode == 0x01 and slba in self.fail_lbas:
            status = self.fail_status                      # Write Fault (SCT 2h)
        elif opcode in (0x01, 0x02):
            pages = self._prp_pages(prp1, prp2, nlb * LBA)
            self._move(opcode, pages, slba * LBA, nlb * LBA)
        self._post(q, cid, status)

    @staticmethod
    def _prp_pages(prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
        first = min(length, PAGE - prp1 % PAGE)
        out, left = [(prp1, first)], length - first
        if left <= 0:
            return out
        if left <= PAGE:
            return [*out, (prp2, left)]
        entry = prp2
        while left > 0:
            addr, = struct.unpack("<Q", _read(entry, 8))
            if entry % PAGE == PAGE - 8 and left > PAGE:     # last slot: next list page
                entry = addr
                continue
            out.append((addr, min(PAGE, left)))
            left -= PAGE
            entry += 8
        return out

    def _move(self, opcode: int, pages: list[tuple[int, int]], pos: int, length: int) -> None:
        for addr, n in pages:
            if opcode == 0x01:
                self.media[pos:pos + n] = _read(addr, n)
            else:
                _write(addr, bytes(self.media[pos:pos + n]))
            pos += n

    def _post(self, q: dict[str, Any], cid: int, status: int) -> None:
        dw3 = cid | q["phase"] << 16 | status << 17
        entry = struct.pack("<IIHHI", 0, 0, q["head"], q["qid"], dw3)
        at = q["cq"] + q["tail"] * 16
        _write(at, entry[:12])
        # the phase tag last, in one 32-bit store (a byte-wise copy could show the new phase
        # with an old CID, e.g. under ASan's memmove)
        ctypes.c_uint32.from_address(at + 12).value = dw3
        q["tail"] += 1
        if q["tail"] == q["depth"]:
            q["tail"], q["phase"] = 0, q["phase"] ^ 1
        if q["irq"] is not None:
            os.eventfd_write(q["irq"], 1)


def attach_queue(dev: SimController, queue: Any, irq_fd: int | None = None) -> None:
    """Let the simulated controller serve an IoQueue (as Create I/O CQ/SQ would)."""
    qp: QueuePair = queue.qpair
    dev.serve(qp.qid, qp.depth, queue.sq_mem.addr, queue.cq_mem.addr, irq_fd)

"""Allocation churn from several threads, shared by the host and VM tests of the allocator."""

from __future__ import annotations

import mmap
import random
import threading

from iommu_dma.memory import DmaAllocator, DmaBuffer

SIZES = (4096, 8192, 65536, 1 << 20)


def churn(mem: DmaAllocator, threads: int = 4, rounds: int = 300) -> list[str]:
    """Threads allocate, free and register at random; returns every overlap of two live
    buffers seen (the allocator handing the same pages out twice) and every exception."""
    live: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def note(buf: DmaBuffer) -> None:
        with lock:
            for addr, size in live.items():
                if addr < buf.addr + buf.size and buf.addr < addr + size:
                    errors.append(f"{buf!r} overlaps a live buffer at {addr:#x}")
            live[buf.addr] = buf.size

    def run(n: int) -> None:
        rng = random.Random(n)
        mine: list[DmaBuffer] = []
        try:
            for i in range(rounds):
                if i % 50 == 0:
                    mem.unregister(mem.register(mmap.mmap(-1, 4 * 4096)))
                if mine and rng.random() < 0.5:
                    buf = mine.pop(rng.randrange(len(mine)))
                    with lock:
                        del live[buf.addr]
                    buf.free()
                    continue
                buf = mem.alloc(rng.choice(SIZES))
                note(buf)
                mine.append(buf)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(repr(e))

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(300)
    return errors

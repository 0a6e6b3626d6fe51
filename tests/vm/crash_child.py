"""The writer that tests/vm/test_crash_restart.py kills with SIGKILL mid-stream.

    python -m tests.vm.crash_child BDF --nsid 1 --first 8192 --count 4096 --run ID --log FILE

Opens the controller, writes each LBA of [first, first + count) once, in an order shuffled by
the run id, one block per command at queue depth --qd (32), each block's bytes given by
block(run, lba, size); after each completed write it appends "LBA\\n" to the log with one
unbuffered os.write (a SIGKILL cannot split it). When every block is written it appends
"done".
"""

from __future__ import annotations

import argparse
import os
import random
import sys

from iommu_dma import Controller


def block(run: str, lba: int, size: int) -> bytes:
    """The content of block lba in run `run` (the same in every process)."""
    head = f"crash-restart run {run} lba {lba}\n".encode()
    return head + random.Random(f"{run}:{lba}").randbytes(size - len(head))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crash_child")
    p.add_argument("bdf")
    p.add_argument("--nsid", type=int, default=1)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--qd", type=int, default=32)
    args = p.parse_args(argv)
    order = list(range(args.first, args.first + args.count))
    random.Random(args.run).shuffle(order)
    todo = iter(order)
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with Controller.open(args.bdf) as ctrl:
        ns = ctrl.namespace(args.nsid)
        bufs = [ctrl.alloc(ns.lba_size) for _ in range(args.qd)]
        inflight = {}

        def start(slot: int) -> None:
            lba = next(todo, None)
            if lba is not None:
                bufs[slot].view[:] = block(args.run, lba, ns.lba_size)
                inflight[slot] = (lba, ns.write_async(lba, bufs[slot], 1))

        for slot in range(args.qd):
            start(slot)
        while inflight:
            ns.queue.process(0.001)
            for slot, (lba, req) in list(inflight.items()):
                if req.done():
                    req.result(0)               # raises the command's error, if any
                    os.write(log, b"%d\n" % lba)
                    del inflight[slot]
                    start(slot)
    os.write(log, b"done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

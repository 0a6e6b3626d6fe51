"""The guest kernel's log from a point on, read through /dev/kmsg (for VM tests that must show
what the kernel logged, e.g. an IOMMU fault, or that it logged nothing alarming)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

# drivers/iommu/intel/dmar.c (6.1), dmar_fault_do_one(): "DMAR: [DMA Write NO_PASID] Request
# device [00:0a.0] fault addr 0x7f0000000000 [fault reason 0x05] PTE Write access is not set"
# (the address is the faulting page; these lines are rate limited: 10 per 5 s)
DMAR_FAULT = re.compile(
    r"DMAR: \[(?P<kind>DMA Read|DMA Write)[^\]]*\] Request device "
    r"\[(?P<source>[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\] fault addr 0x(?P<addr>[0-9a-f]+) "
    r"\[fault reason 0x(?P<reason>[0-9a-f]+)\] ?(?P<why>.*)")


@dataclass(frozen=True)
class Record:
    level: int          # syslog level: 0 emerg .. 3 err, 4 warning .. 7 debug
    text: str

    def __str__(self) -> str:
        return f"<{self.level}> {self.text}"


@dataclass(frozen=True)
class DmarFault:
    kind: str           # "DMA Read" or "DMA Write"
    source: str         # bus:dev.fn, e.g. "00:0a.0"
    addr: int
    reason: int
    why: str
    line: str


def source_id(bdf: str) -> str:
    """The bus:dev.fn the DMAR driver prints for a BDF ("0000:00:0a.0" -> "00:0a.0")."""
    return bdf.split(":", 1)[1] if bdf.count(":") == 2 else bdf


class KernelLog:
    """Records the kernel logs after construction (earlier ones are skipped)."""

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.records: list[Record] = []

    def poll(self) -> list[Record]:
        """Read what arrived since the last call (also kept in self.records)."""
        new = []
        while True:
            try:
                raw = os.read(self._fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:         # EPIPE: records overwritten before we read them
                continue
            head, _, body = raw.decode(errors="replace").partition(";")
            new.append(Record(int(head.split(",")[0]) & 7, body.split("\n")[0]))
        self.records += new
        return new

    def dmar_faults(self) -> list[DmarFault]:
        self.poll()
        out = []
        for r in self.records:
            m = DMAR_FAULT.search(r.text)
            if m:
                out.append(DmarFault(m["kind"], m["source"], int(m["addr"], 16),
                                     int(m["reason"], 16), m["why"].strip(), r.text))
        return out

    def wait_for_fault(self, addr: int, timeout: float) -> list[DmarFault]:
        """The DMAR faults logged so far, waiting up to timeout s for one at addr's page (the
        fault interrupt may be handled after the command's completion was reaped)."""
        deadline = time.monotonic() + timeout
        page = addr & ~0xFFF
        while True:
            faults = self.dmar_faults()
            if any(f.addr == page for f in faults) or time.monotonic() >= deadline:
                return faults
            time.sleep(0.05)

    def text(self) -> str:
        self.poll()
        return "\n".join(map(str, self.records)) or "(nothing)"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KernelLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

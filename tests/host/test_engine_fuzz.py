"""Fuzz the queue engine with an adversarial simulated controller (fixed seed, 4000 steps).

The controller posts correct completions, duplicates, random CIDs, CQEs with an SQ head or SQ
id out of range, and entries whose phase tag is stale (NVMe Base 2.0 §4.6); the host submits
good commands mixed with refused ones (buffer straddling the end of the mapped range, not dword
aligned, too many PRP list entries, huge NLB, zero length). A model predicts every outcome; the
engine must match it exactly: nothing completes twice, nothing completes that was not submitted,
every dropped CQE counts as spurious, in-flight counts agree, refusals carry the right rc and
index. Runs clean under `make test-asan`.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from dataclasses import dataclass, field

import pytest

from iommu_dma.native import ffi, lib
from iommu_dma.nvme import sqe as S
from iommu_dma.nvme.queue import Command, QueueError
from tests.host.test_queue_engine import PAGE, FakeDevice, Mem, Rig

SEED = 0x1D3A2026
STEPS = 4000
DEPTH = 16
MAPPED = 4 << 20                    # the maptable covers [data, data + MAPPED)
LIST_CAPACITY = PAGE // 8           # one list page per tracker: 512 entries


@dataclass
class Cqe:
    valid: bool                     # the engine must accept it (else: spurious)
    tag: int = -1
    status: int = 0


@dataclass
class Model:
    """What the engine must do, derived only from what was submitted and posted."""

    free: int = DEPTH - 1
    submitted_order: deque[int] = field(default_factory=deque)   # accepted, not yet fetched
    device_cids: dict[int, int] = field(default_factory=dict)    # CID -> tag, fetched
    used_cids: list[int] = field(default_factory=list)           # every CID seen (for dups)
    posted: deque[Cqe] = field(default_factory=deque)            # in the CQ, unconsumed
    inflight: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    submitted: int = 0
    completed: int = 0
    spurious: int = 0


class Fuzz:
    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.table = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
        self.rig = Rig(depth=DEPTH, maptable=self.table)
        self.data = Mem(MAPPED + 2 * PAGE)
        assert lib.idma_maptable_add(self.table, self.data.addr, MAPPED) == 0
        self.dev: FakeDevice = self.rig.dev
        self.m = Model()
        self.next_tag = 1

    # ---- host side ----

    def _command(self) -> tuple[Command, int]:
        """A random command and the rc the engine must give it (0 = accepted)."""
        r, d, tag = self.rnd, self.data.addr, self.next_tag
        self.next_tag += 1
        kind = r.choice(["ok", "ok", "ok", "none", "straddle", "misaligned", "toobig"])
        if kind == "none":
            return Command(S.flush(1), 0, 0, tag), 0
        if kind == "straddle":
            n = r.randrange(8, 4 * PAGE, 4)
            return Command(S.read(1, 0, 1), d + MAPPED - r.randrange(4, n, 4), n, tag), \
                lib.IDMA_EUNMAPPED
        if kind == "misaligned":
            return Command(S.read(1, 0, 1), d + r.randrange(1, PAGE) | 1, 512, tag), \
                lib.IDMA_EALIGN
        if kind == "toobig":
            n = (LIST_CAPACITY + 2 + r.randrange(100)) * PAGE
            return Command(S.read(1, 0, 1), d, n, tag), lib.IDMA_ETOOBIG
        n = r.choice([4, 512, PAGE, 2 * PAGE, r.randrange(4, 64 * PAGE, 4)])
        off = r.randrange(0, MAPPED - n + 1, 4)
        return Command(S.write(1, 0, 1), d + off, n, tag), 0

    def _accepted(self, tags: list[int]) -> None:
        for t in tags:
            self.m.submitted_order.append(t)
            self.m.inflight.add(t)
        self.m.free -= len(tags)
        self.m.submitted += len(tags)

    def submit(self) -> None:
        cmds, rcs = zip(*(self._command() for _ in range(self.rnd.randint(1, 6))))
        fit = min(len(cmds), self.m.free)
        bad = next((i for i in range(fit) if rcs[i]), None)
        try:
            got = self.rig.qp.submit(list(cmds))
        except QueueError as e:
            assert bad is not None and (e.rc, e.index) == (rcs[bad], bad)
            return
        assert bad is None and got == fit
        self._accepted([c.tag for c in cmds[:fit]])

    def submit_rw(self) -> None:
        """The batch fast path with a huge or bad NLB, or a good one."""
        r = self.rnd
        n = r.randint(1, 4)
        tags = [self.next_tag + i for i in range(n)]
        self.next_tag += n
        kind = r.choice(["ok", "ok", "nlb", "huge"])
        nlb, lba_size, base, stride = 1, 512, self.data.addr, 0
        if kind == "nlb":
            nlb = r.choice([0, 65537, 0xFFFFFFFF])
        elif kind == "huge":
            nlb, lba_size = 65536, 4096                     # 256 MiB: not mapped
        lbas, ctags = ffi.new("uint64_t[]", n), ffi.new("uint64_t[]", tags)
        rc = lib.idma_qpair_submit_rw(self.rig.qp.cdata, 2, 1, nlb, lba_size, lbas, ctags, n,
                                      base, stride)
        fit = min(n, self.m.free)
        if kind == "nlb":
            assert rc == lib.IDMA_EINVAL
        elif kind == "huge":
            assert rc == (lib.IDMA_EUNMAPPED if fit else 0)
        else:
            assert rc == fit
            self._accepted(tags[:fit])

    def poll(self) -> None:
        r = self.rnd
        m = r.randint(0, DEPTH + 3)
        if r.random() < 0.5:
            got = self.rig.qp.poll(m)
        else:
            got = self.rig.qp.wait(r.randint(0, DEPTH), timeout=0.0, max_cpl=m)
        m = min(m, DEPTH)
        want: list[Cqe] = []
        seen = 0
        while len(want) < m and seen < DEPTH and self.m.posted:
            e = self.m.posted.popleft()
            seen += 1
            if e.valid:
                want.append(e)
            else:
                self.m.spurious += 1
        assert [(c.tag, c.status) for c in got] == [(e.tag, e.status) for e in want]
        for c in got:
            assert c.tag in self.m.inflight and c.tag not in self.m.done   # once, and ours
            self.m.inflight.remove(c.tag)
            self.m.done.add(c.tag)
        self.m.free += len(got)
        self.m.completed += len(got)

    # ---- controller side ----

    def fetch(self) -> None:
        for e in self.dev.fetch():
            tag = self.m.submitted_order.popleft()
            assert e.cid not in self.m.device_cids          # CIDs of in-flight commands differ
            self.m.device_cids[e.cid] = tag
            self.m.used_cids.append(e.cid)

    def _room(self) -> bool:
        return len(self.m.posted) < DEPTH - 1

    def _post(self, cid: int, *, sq_head: int | None = None, sq_id: int | None = None,
              status: int = 0, phase: int | None = None) -> None:
        d = self.dev
        ph = d.phase if phase is None else phase
        entry = struct.pack("<IIHHI", 0, 0, d.sq_head if sq_head is None else sq_head,
                            d.qid if sq_id is None else sq_id, cid | ph << 16 | status << 17)
        off = d.cq_tail * 16
        d.cq.map[off:off + 16] = entry
        if phase is not None:
            return                                          # stale phase: not posted
        d.cq_tail += 1
        if d.cq_tail == d.depth:
            d.cq_tail, d.phase = 0, d.phase ^ 1

    def _post_checked(self, cid: int, *, sq_head: int | None = None,
                      sq_id: int | None = None, status: int = 0) -> None:
        ok_fields = (sq_head is None or sq_head < DEPTH) and (sq_id is None or sq_id == 1)
        tag = self.m.device_cids.get(cid) if ok_fields else None
        if tag is not None:
            del self.m.device_cids[cid]
        self._post(cid, sq_head=sq_head, sq_id=sq_id, status=status)
        self.m.posted.append(Cqe(tag is not None, -1 if tag is None else tag, status))

    def device(self) -> None:
        r = self.rnd
        self.fetch()
        for _ in range(r.randint(1, 4)):
            if not self._room():
                return
            kind = r.choice(["good", "good", "good", "dup", "random", "sq_head", "sq_id",
                             "phase"])
            status = r.choice([0, 0, 0, r.randrange(1 << 15)])
            if kind == "good" and self.m.device_cids:
                self._post_checked(r.choice(list(self.m.device_cids)), status=status)
            elif kind == "dup" and self.m.used_cids:
                self._post_checked(r.choice(self.m.used_cids[-40:]), status=status)
            elif kind == "random":
                self._post_checked(r.randrange(1 << 16), status=status)
            elif kind == "sq_head" and self.m.device_cids:
                self._post_checked(r.choice(list(self.m.device_cids)),
                                   sq_head=r.randrange(DEPTH, 1 << 16))
            elif kind == "sq_id" and self.m.device_cids:
                self._post_checked(r.choice(list(self.m.device_cids)),
                                   sq_id=r.choice([0, 2, 0xFFFF]))
            elif kind == "phase":
                self._post(r.randrange(1 << 16), phase=self.dev.phase ^ 1)

    # ---- invariants ----

    def check(self) -> None:
        info = self.rig.qp.info()
        assert self.rig.qp.inflight == len(self.m.inflight) == DEPTH - 1 - self.m.free
        assert info["free"] == self.m.free
        assert info["submitted"] == self.m.submitted
        assert info["completed"] == self.m.completed == len(self.m.done)
        assert info["spurious"] == self.m.spurious
        assert not self.m.inflight & self.m.done


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
def test_engine_survives_an_adversarial_controller(seed: int) -> None:
    rnd = random.Random(seed)
    f = Fuzz(rnd)
    actions = [f.submit, f.submit, f.submit_rw, f.device, f.device, f.poll, f.poll]
    for _ in range(STEPS):
        rnd.choice(actions)()
        f.check()
    # drain: the controller completes everything still in flight, the host reaps it all
    for _ in range(200):
        f.fetch()
        while f.m.device_cids and f._room():
            f._post_checked(next(iter(f.m.device_cids)))
        f.poll()
        if not f.m.inflight and not f.m.posted:
            break
    f.check()
    assert not f.m.inflight and f.m.completed > STEPS // 10 and f.m.spurious > STEPS // 20

"""Retries and timeouts of the queue layer: the rule (DNR, CRD and CRDT, the retry limit) and
what the simulated controller sees; a command past its deadline goes to the recovery hook."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from iommu_dma import NvmeError, NvmeTimeoutError
from iommu_dma.nvme import sqe
from iommu_dma.nvme.ioqueue import IoQueue, PendingCommand
from iommu_dma.nvme.recovery import RecoveryPolicy, retry_delay, should_retry
from iommu_dma.nvme.status import Status, decode_status, make_status
from tests.host.sim_nvme import LBA
from tests.host.test_ownership import Bench

WRITE_FAULT = 0x80


def st(sc: int, sct: int = 2, *, crd: int = 0, dnr: bool = False) -> Status:
    return decode_status(make_status(sc, sct, crd=crd, dnr=dnr))


def test_retry_rule_follows_dnr_and_the_limit() -> None:
    assert should_retry(st(WRITE_FAULT), 0, 5)                  # DNR clear
    assert should_retry(st(WRITE_FAULT), 4, 5)
    assert not should_retry(st(WRITE_FAULT), 5, 5)              # limit reached
    assert not should_retry(st(WRITE_FAULT), 0, 0)              # retries off
    assert not should_retry(st(WRITE_FAULT, dnr=True), 0, 5)    # Do Not Retry
    assert not should_retry(st(0x07, 0), 0, 5)                  # Command Abort Requested
    assert not should_retry(st(0x08, 0), 0, 5)                  # Aborted: SQ Deletion
    assert not should_retry(st(0, 0), 0, 5)                     # success


def test_retry_delay_is_crdt_of_crd_in_100ms() -> None:
    crdt = (3, 20, 0xFFFF)
    assert retry_delay(st(WRITE_FAULT), crdt) == 0.0            # CRD 0: at once
    assert retry_delay(st(WRITE_FAULT, crd=1), crdt) == pytest.approx(0.3)
    assert retry_delay(st(WRITE_FAULT, crd=2), crdt) == pytest.approx(2.0)
    assert retry_delay(st(WRITE_FAULT, crd=3), crdt) == pytest.approx(6553.5)
    assert retry_delay(st(WRITE_FAULT, crd=1), (0, 0, 0)) == 0.0


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="retries"):
        RecoveryPolicy(retries=-1)
    with pytest.raises(ValueError, match="io_timeout"):
        RecoveryPolicy(io_timeout=0)
    with pytest.raises(ValueError, match="abort_timeout"):
        RecoveryPolicy(abort_timeout=-1)


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.dev.stop()


def write_fault_sends(bench: Bench, policy: RecoveryPolicy, status: int) -> tuple[int, float]:
    """How many times the device saw a write that always fails with status, and how long
    the request took."""
    bench.queue.policy = policy
    bench.dev.fail_lbas = {7}
    bench.dev.fail_status = status
    buf = bench.mem.alloc(LBA)
    before = bench.dev.commands
    t0 = time.monotonic()
    fut = bench.queue.submit(sqe.write(1, 7, 1), buf.addr, LBA, owner=buf)
    with pytest.raises(NvmeError) as err:
        fut.result(10)
    assert err.value.sc == WRITE_FAULT
    return bench.dev.commands - before, time.monotonic() - t0


def test_dnr_clear_is_sent_again_up_to_the_limit(bench: Bench) -> None:
    sends, _ = write_fault_sends(bench, RecoveryPolicy(retries=2), make_status(WRITE_FAULT, 2))
    assert sends == 3


def test_no_retries_for_test_engineers(bench: Bench) -> None:
    sends, _ = write_fault_sends(bench, RecoveryPolicy(retries=0), make_status(WRITE_FAULT, 2))
    assert sends == 1


def test_dnr_set_is_never_retried(bench: Bench) -> None:
    sends, _ = write_fault_sends(bench, RecoveryPolicy(retries=5),
                                 make_status(WRITE_FAULT, 2, dnr=True))
    assert sends == 1


def test_crd_delays_each_retry(bench: Bench) -> None:
    policy = RecoveryPolicy(retries=2, crdt=(2, 0, 0))      # CRD 1 = 200 ms
    sends, took = write_fault_sends(bench, policy, make_status(WRITE_FAULT, 2, crd=1))
    assert sends == 3 and took >= 0.4                        # two delays of 200 ms


def test_expired_command_goes_to_the_recovery_hook(bench: Bench) -> None:
    q: IoQueue = bench.queue
    seen: list[PendingCommand] = []
    q.on_timeout = lambda queue, expired: seen.extend(expired)
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    fut = q.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf, timeout=0.05)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        q.process(0.01)                                     # the deadline passes here
    assert len(seen) == 1 and seen[0].future is fut and seen[0].timed_out
    assert not fut.done() and bench.mem.quarantined_bytes == 0
    buf.free()
    assert bench.mem.quarantined_bytes == LBA               # still the device's
    bench.dev.release_held()                                # it comes back late
    with pytest.raises(NvmeTimeoutError, match="completed afterwards"):
        fut.result(5)
    assert bench.mem.quarantined_bytes == 0


def test_per_call_timeout_none_never_expires(bench: Bench) -> None:
    q: IoQueue = bench.queue
    seen: list[PendingCommand] = []
    q.on_timeout = lambda queue, expired: seen.extend(expired)
    q.policy = RecoveryPolicy(io_timeout=0.01)
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    fut = q.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf, timeout=None)
    for _ in range(20):
        q.process(0.005)
    assert not seen and not fut.done()
    bench.dev.release_held()
    assert fut.result(5) == 0


def test_queue_timeout_overrides_the_policy(bench: Bench) -> None:
    q: IoQueue = bench.queue
    seen: list[PendingCommand] = []
    q.on_timeout = lambda queue, expired: seen.extend(expired)
    q.policy = RecoveryPolicy(io_timeout=None)              # the controller's: no limit
    q.timeout = 0.05                                        # this queue's own deadline
    buf = bench.mem.alloc(LBA)
    bench.dev.hold_next = 1
    fut = q.submit(sqe.read(1, 0, 1), buf.addr, LBA, owner=buf)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        q.process(0.01)
    assert [p.future for p in seen] == [fut]
    bench.dev.release_held()
    with pytest.raises(NvmeTimeoutError):
        fut.result(5)

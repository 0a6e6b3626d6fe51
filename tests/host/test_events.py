"""Asynchronous events without a device: DW0 decoding, names, bounded log page sizes, and the
AsyncEvents logic (arming, re-arming, errors, callbacks, get) over a fake admin queue whose
futures are the real IoFuture class."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.nvme.constants import (
    ADM_ASYNC_EVENT_REQUEST,
    FID_ASYNC_EVENT_CONFIG,
    LID_CHANGED_NS_LIST,
    LID_ERROR,
    LID_SMART,
    SCT_CMD_SPECIFIC,
)
from iommu_dma.nvme.events import (
    AEC_NAMESPACE_ATTRIBUTE,
    AEC_SMART_TEMPERATURE,
    AET_ERROR,
    AET_IO_COMMAND_SET,
    AET_NOTICE,
    AET_SMART_HEALTH,
    AET_VENDOR,
    EVENT_QUEUE_MAX,
    MAX_LOG_BYTES,
    AsyncEvent,
    AsyncEvents,
    AsyncEventTimeoutError,
    decode_dw0,
    info_name,
    log_page_name,
    log_page_size,
    type_name,
)
from iommu_dma.nvme.ioqueue import IoFuture
from iommu_dma.nvme.queue import Completion
from iommu_dma.nvme.sqe import Sqe
from iommu_dma.nvme.status import ControllerResetError, NvmeError, make_status


def dw0(aet: int, aei: int, lid: int) -> int:
    return aet | aei << 8 | lid << 16


# ---- decoding ------------------------------------------------------------------------------------

def test_decode_dw0_fields() -> None:
    assert decode_dw0(dw0(AET_SMART_HEALTH, 0x01, LID_SMART)) == (1, 1, 2)
    # reserved bits (7:3, 31:24) are ignored, values beyond 32 bits are cut to DW0
    assert decode_dw0(0xFF_00_00_F8 | dw0(2, 0, 4)) == (2, 0, 4)
    assert decode_dw0(1 << 40 | dw0(7, 0xAB, 0xC0)) == (7, 0xAB, 0xC0)
    assert decode_dw0(0xFFFFFFFF) == (7, 0xFF, 0xFF)


def test_names_known_and_unknown() -> None:
    assert type_name(AET_ERROR) == "Error status"
    assert type_name(AET_SMART_HEALTH) == "SMART / Health status"
    assert type_name(AET_NOTICE) == "Notice"
    assert type_name(AET_IO_COMMAND_SET) == "I/O Command Specific status"
    assert type_name(AET_VENDOR) == "Vendor Specific"
    assert "Reserved" in type_name(3)
    assert info_name(AET_SMART_HEALTH, 0x01) == "Temperature Threshold"
    assert info_name(AET_SMART_HEALTH, 0x02) == "Spare Below Threshold"
    assert info_name(AET_NOTICE, 0x00) == "Namespace Attribute Changed"
    assert info_name(AET_NOTICE, 0x01) == "Firmware Activation Starting"
    assert info_name(AET_ERROR, 0x03) == "Persistent Internal Error"
    assert info_name(AET_IO_COMMAND_SET, 0x00) == "Reservation Log Page Available"
    assert "Vendor" in info_name(AET_VENDOR, 0x42)
    assert "Reserved" in info_name(AET_SMART_HEALTH, 0x7F)
    assert "Reserved" in info_name(5, 0)
    assert log_page_name(LID_SMART) == "SMART / Health Information"
    assert log_page_name(LID_CHANGED_NS_LIST) == "Changed Namespace List"
    assert "Vendor" in log_page_name(0xC2)
    assert log_page_name(0x55) == "log page 0x55"


def test_log_page_sizes_are_bounded() -> None:
    assert log_page_size(LID_SMART) == 512
    assert log_page_size(LID_CHANGED_NS_LIST) == 4096
    assert log_page_size(LID_ERROR, elpe=0) == 64
    assert log_page_size(LID_ERROR, elpe=3) == 256
    # ELPE is a byte of the device's Identify data: any value, however large, stays bounded
    for elpe in (63, 255, 1 << 20, -5):
        assert 64 <= log_page_size(LID_ERROR, elpe) <= MAX_LOG_BYTES
    for lid in range(256):                       # unknown, vendor, reserved: all bounded
        size = log_page_size(lid, 255)
        assert 4 <= size <= MAX_LOG_BYTES and size % 4 == 0, lid


def test_event_dataclass() -> None:
    smart = bytes([0x02, 0x43, 0x01]) + bytes(509)
    ev = AsyncEvent(dw0(AET_SMART_HEALTH, 0x01, LID_SMART) | 0xAA000000, log=smart)
    assert (ev.type, ev.info, ev.lid) == (AET_SMART_HEALTH, 1, LID_SMART)
    assert ev.raw == 0xAA020101
    assert ev.name == "SMART / Health status: Temperature Threshold"
    assert "temperature threshold" in ev.info_name.lower()
    sl = ev.smart_log()
    assert sl is not None and sl.temperature == 0x143 and sl.critical_warning == 2
    assert "512 bytes read" in str(ev)
    bad = AsyncEvent(dw0(AET_NOTICE, 0, LID_CHANGED_NS_LIST), log_error="Invalid Log Page")
    assert bad.smart_log() is None and "not read: Invalid Log Page" in str(bad)
    with pytest.raises(AttributeError):
        ev.info = 3  # type: ignore[misc]


# ---- AsyncEvents over a fake controller ----------------------------------------------------------

class _RunNow:
    """A queue's list of due done-callbacks that runs each at once (no lock is held here)."""

    @staticmethod
    def extend(items: Any) -> None:
        for fn, future in items:
            fn(future)


class FakeAdmin:
    """Admin queue stand-in: records submissions; the test completes their real IoFutures."""

    qid = 0
    _lock = threading.Lock()
    _due = _RunNow()

    def __init__(self) -> None:
        self.futures: list[IoFuture] = []
        self.sqes: list[Sqe] = []
        self.closed = False
        self.on_process: list[Any] = []
        self.processed = 0

    def submit(self, sqe: Sqe, addr: int = 0, length: int = 0, what: str = "",
               owner: object = None, timeout: float | None = -1.0) -> IoFuture:
        if self.closed:
            raise ClosedError("the admin queue")
        assert (addr, length, owner) == (0, 0, None)
        fut = IoFuture(self, what)  # type: ignore[arg-type]
        self.sqes.append(sqe)
        self.futures.append(fut)
        return fut

    def process(self, timeout: float = 0.0) -> int:
        if self.closed:
            raise ClosedError("the admin queue")
        self.processed += 1
        while self.on_process:
            self.on_process.pop(0)()
        return 0

    @property
    def live(self) -> list[IoFuture]:
        return [f for f in self.futures if not f.done()]

    @property
    def outstanding(self) -> int:
        return len(self.live)

    def event(self, value: int) -> None:
        """The device posts an event on the oldest outstanding request."""
        self.live[0]._finish(Completion(1, value, 0, 0))

    def fail(self, error: BaseException) -> None:
        self.live[0]._finish(None, error)

    def close(self, error: BaseException) -> None:
        for f in self.live:
            f._finish(None, error)
        self.closed = True


class FakeCtrl:
    def __init__(self, aerl: int = 3, elpe: int = 3) -> None:
        self.bdf = "0000:00:0a.0"
        self.identify = SimpleNamespace(aerl=aerl, elpe=elpe)
        self.admin: FakeAdmin | None = FakeAdmin()
        self.logs: list[tuple[int, int]] = []
        self.log_error: IommuDmaError | None = None
        self.features: dict[int, int] = {}

    def get_log_page(self, lid: int, size: int) -> bytes:
        self.logs.append((lid, size))
        if self.log_error is not None:
            raise self.log_error
        return bytes([lid]) * size

    def get_features(self, fid: int) -> int:
        return self.features.get(fid, 0)

    def set_features(self, fid: int, cdw11: int) -> int:
        self.features[fid] = cdw11
        return 0


def make(aerl: int = 3, elpe: int = 3) -> tuple[FakeCtrl, FakeAdmin, AsyncEvents]:
    ctrl = FakeCtrl(aerl, elpe)
    assert ctrl.admin is not None
    return ctrl, ctrl.admin, AsyncEvents(ctrl)  # type: ignore[arg-type]


@pytest.mark.parametrize(("aerl", "expected"), [(0, 1), (2, 3), (3, 4), (9, 4), (255, 4)])
def test_arm_submits_min_aerl_plus_one_and_four(aerl: int, expected: int) -> None:
    _, admin, ev = make(aerl=aerl)
    assert ev.arm() == expected
    assert ev.armed == expected == ev.limit
    assert all(s.opcode == ADM_ASYNC_EVENT_REQUEST and s.nsid == 0 and s.prp1 == 0
               for s in admin.sqes)
    assert all(f.what == "Asynchronous Event Request" for f in admin.futures)
    assert ev.arm() == 0                     # already armed: nothing more
    assert len(admin.futures) == expected


def test_event_reads_log_rearms_and_delivers() -> None:
    ctrl, admin, ev = make()
    ev.arm()
    seen: list[AsyncEvent] = []
    ev.add_callback(seen.append)
    assert ev.poll() == []
    admin.event(dw0(AET_SMART_HEALTH, 0x01, LID_SMART))
    got = ev.poll()
    assert len(got) == 1 and seen == got
    e = got[0]
    assert (e.type, e.info, e.lid) == (AET_SMART_HEALTH, 1, LID_SMART)
    assert ctrl.logs == [(LID_SMART, 512)] and e.log == bytes([LID_SMART]) * 512
    assert ev.armed == 4 and len(admin.futures) == 5        # one re-armed
    assert ev.get(timeout=0) is e                            # also queued for get()
    with pytest.raises(AsyncEventTimeoutError):
        ev.get(timeout=0)


def test_error_log_size_from_elpe_and_unknown_lid_bounded() -> None:
    ctrl, admin, ev = make(elpe=255)
    ev.arm()
    admin.event(dw0(AET_ERROR, 0x04, LID_ERROR))
    admin.event(dw0(AET_VENDOR, 0x10, 0xD7))
    got = ev.poll()
    assert [e.lid for e in got] == [LID_ERROR, 0xD7]         # completion order
    assert ctrl.logs == [(LID_ERROR, MAX_LOG_BYTES), (0xD7, MAX_LOG_BYTES)]
    assert ev.armed == 4


def test_completion_order_kept() -> None:
    _, admin, ev = make()
    ev.arm()
    admin.futures[2]._finish(Completion(1, dw0(AET_NOTICE, 0, LID_CHANGED_NS_LIST), 0, 0))
    admin.futures[0]._finish(Completion(1, dw0(AET_SMART_HEALTH, 1, LID_SMART), 0, 0))
    assert [e.type for e in ev.poll()] == [AET_NOTICE, AET_SMART_HEALTH]


def test_log_read_failure_still_delivers_and_rearms(caplog: pytest.LogCaptureFixture) -> None:
    ctrl, admin, ev = make()
    ev.arm()
    ctrl.log_error = NvmeError(make_status(0x09, SCT_CMD_SPECIFIC, dnr=True), "Get Log Page")
    admin.event(dw0(AET_NOTICE, 0x00, LID_CHANGED_NS_LIST))
    with caplog.at_level(logging.WARNING):
        (e,) = ev.poll()
    assert e.log == b"" and e.log_error is not None and "Invalid Log Page" in e.log_error
    assert "reading log page 0x04 failed" in caplog.text
    assert ev.armed == 4


def test_limit_exceeded_is_logged_and_not_rearmed(caplog: pytest.LogCaptureFixture) -> None:
    _, admin, ev = make(aerl=3)
    ev.arm()
    with caplog.at_level(logging.WARNING):
        admin.fail(NvmeError(make_status(0x05, SCT_CMD_SPECIFIC, dnr=True),
                             "Asynchronous Event Request"))
        assert ev.poll() == []
    assert "Asynchronous Event Request Limit Exceeded" in caplog.text
    assert ev.armed == 3 and ev.limit == 3 and ev.failed_requests == 1
    assert len(admin.futures) == 4                            # not re-submitted
    admin.event(dw0(AET_SMART_HEALTH, 1, LID_SMART))
    assert len(ev.poll()) == 1
    assert ev.armed == 3                                      # the event's request re-armed only


def test_reset_aborts_are_not_events_and_arm_rearms(caplog: pytest.LogCaptureFixture) -> None:
    ctrl, admin, ev = make()
    ev.arm()
    seen: list[AsyncEvent] = []
    ev.add_callback(seen.append)
    with caplog.at_level(logging.WARNING):
        for f in list(admin.live[:2]):
            f._finish(None, ControllerResetError(ctrl.bdf, f.what, "controller reset"))
        for f in list(admin.live):
            f._finish(None, ClosedError("the admin queue"))
        assert ev.poll() == []
    assert seen == [] and caplog.text == "" and ev.armed == 0
    assert ev.limit == 4 and ev.failed_requests == 0
    ctrl.admin = new = FakeAdmin()                            # the reset made a new queue
    assert ev.arm() == 4 and len(new.futures) == 4 and ev.armed == 4


def test_arm_after_reset_before_poll() -> None:
    """The controller calls arm() right after a reset, before anyone polled the aborts."""
    ctrl, admin, ev = make()
    ev.arm()
    admin.close(ClosedError("the admin queue"))
    ctrl.admin = new = FakeAdmin()
    assert ev.arm() == 4 and ev.armed == 4
    assert ev.poll() == [] and ev.armed == 4 and len(new.futures) == 4


def test_event_completed_before_reset_is_still_an_event() -> None:
    ctrl, admin, ev = make()
    ev.arm()
    admin.event(dw0(AET_SMART_HEALTH, 1, LID_SMART))
    admin.close(ClosedError("the admin queue"))
    ctrl.admin = new = FakeAdmin()
    assert ev.arm() == 4
    (e,) = ev.poll()
    assert e.lid == LID_SMART and ev.armed == 4 and len(new.futures) == 4   # never above limit


def test_callback_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    _, admin, ev = make()
    ev.arm()
    seen: list[int] = []

    def bad(e: AsyncEvent) -> None:
        raise RuntimeError("boom")

    ev.add_callback(bad)
    ev.add_callback(lambda e: seen.append(e.info))
    admin.event(dw0(AET_SMART_HEALTH, 2, LID_SMART))
    with caplog.at_level(logging.ERROR):
        assert len(ev.poll()) == 1
    assert seen == [2] and "boom" in caplog.text
    ev.remove_callback(bad)
    ev.remove_callback(bad)                                   # absent: no error
    admin.event(dw0(AET_SMART_HEALTH, 0, LID_SMART))
    ev.poll()
    assert seen == [2, 0]


def test_done_callback_only_records() -> None:
    """Completing a request (as the reaping thread does, under the queue lock) must neither
    read a log page nor submit: that happens in poll()."""
    ctrl, admin, ev = make()
    ev.arm()
    admin.event(dw0(AET_SMART_HEALTH, 1, LID_SMART))
    assert ctrl.logs == [] and len(admin.futures) == 4
    assert len(ev.poll()) == 1 and len(ctrl.logs) == 1 and len(admin.futures) == 5


def test_get_waits_by_polling_and_iterates() -> None:
    _, admin, ev = make()
    ev.arm()
    admin.on_process.append(lambda: admin.event(dw0(AET_NOTICE, 0x01, 0x03)))
    e = ev.get(timeout=5)
    assert e.info_name == "Firmware Activation Starting" and e.lid == 0x03
    t0 = time.monotonic()
    with pytest.raises(AsyncEventTimeoutError, match="no asynchronous event within 0.2 s"):
        ev.get(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    assert issubclass(AsyncEventTimeoutError, IommuDmaError)

    def later() -> None:
        time.sleep(0.1)
        admin.event(dw0(AET_SMART_HEALTH, 0, LID_SMART))
        time.sleep(0.1)
        ev.close()

    threading.Thread(target=later).start()
    got = list(ev)                            # ends when closed
    assert [e.type for e in got] == [AET_SMART_HEALTH]
    with pytest.raises(ClosedError):
        ev.poll()
    with pytest.raises(ClosedError):
        ev.arm()


def test_controller_closed_ends_iteration() -> None:
    ctrl, admin, ev = make()
    ev.arm()
    admin.close(ClosedError("the admin queue"))
    with pytest.raises(ClosedError):
        ev.poll()
    assert list(ev) == []


def test_get_queue_is_bounded() -> None:
    _, admin, ev = make(aerl=0)
    ev.arm()
    for i in range(EVENT_QUEUE_MAX + 10):
        admin.event(dw0(AET_VENDOR, i & 0xFF, 0xC0))
        assert len(ev.poll()) == 1
    assert ev.dropped == 10
    first = ev.get(timeout=0)
    assert first.info == 10
    assert len(ev.pending()) == EVENT_QUEUE_MAX - 1


def test_enable_disable_configure() -> None:
    ctrl, _, ev = make()
    assert ev.enable(AEC_SMART_TEMPERATURE) == 0x2
    assert ev.enable(AEC_NAMESPACE_ATTRIBUTE) == 0x102
    assert ctrl.features[FID_ASYNC_EVENT_CONFIG] == 0x102 == ev.config()
    assert ev.disable(AEC_SMART_TEMPERATURE) == 0x100
    ev.configure(0)
    assert ev.config() == 0
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            ev.enable(bad)
        with pytest.raises(ValueError):
            ev.configure(bad)


def test_threads_poll_concurrently_each_event_once() -> None:
    _, admin, ev = make()
    ev.arm()
    seen: list[int] = []
    lock = threading.Lock()

    def record(e: AsyncEvent) -> None:
        with lock:
            seen.append(e.info)

    ev.add_callback(record)
    stop = threading.Event()

    def poller() -> None:
        while not stop.is_set():
            ev.poll(0.001)

    threads = [threading.Thread(target=poller) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        while not admin.live:
            time.sleep(0.0005)
        admin.event(dw0(AET_VENDOR, i & 0xFF, 0xC0))
    deadline = time.monotonic() + 10
    while len(seen) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(i & 0xFF for i in range(200))
    assert ev.armed == 4 and admin.outstanding == 4

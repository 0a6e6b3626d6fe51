"""Asynchronous events (NVMe Base 2.0 §5.2): the controller completes an outstanding
Asynchronous Event Request when something happens (an error, a SMART / health warning, a
notice such as a changed namespace), names the log page that tells more, and masks that event
type until the host reads that log page with Retain Asynchronous Event (RAE) cleared.

    events = AsyncEvents(ctrl)
    events.arm()                                    # the controller does this once wired in
    events.enable(AEC_SMART_TEMPERATURE | AEC_NAMESPACE_ATTRIBUTE)
    events.add_callback(lambda ev: print(ev))
    ev = events.get(timeout=10)                     # or poll(), or `for ev in events`

AsyncEvents keeps min(AERL + 1, 4) requests outstanding on the admin queue. Completions are
found whenever anybody processes the admin queue (any admin command does); poll() turns them
into AsyncEvent objects: it reads the log page each one names (Get Log Page with RAE = 0, so
the controller reports that event type again), re-arms one request per event consumed, and
hands the event to the registered callbacks and to the queue get() and iteration read from.

Thread-safe. Lock order: the admin queue's lock is never taken while this object's lock is
held (the completion callback runs under the queue's lock and only appends to a deque).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.nvme.constants import (
    ADM_ASYNC_EVENT_REQUEST,
    FID_ASYNC_EVENT_CONFIG,
    LID_CHANGED_NS_LIST,
    LID_CMD_EFFECTS,
    LID_DEVICE_SELF_TEST,
    LID_ERROR,
    LID_FW_SLOT,
    LID_PERSISTENT_EVENT,
    LID_SMART,
    SCT_CMD_SPECIFIC,
)
from iommu_dma.nvme.identify import ERROR_ENTRY_SIZE, SMART_SIZE, SmartLog
from iommu_dma.nvme.ioqueue import POLL_SLICE, IoFuture
from iommu_dma.nvme.sqe import Sqe
from iommu_dma.nvme.status import ControllerFailedError, NvmeError

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

log = logging.getLogger(__name__)

__all__ = [
    "AEC_ANA_CHANGE", "AEC_DISCOVERY_LOG_CHANGE", "AEC_ENDURANCE_GROUP_EVENT",
    "AEC_FIRMWARE_ACTIVATION", "AEC_LBA_STATUS_INFO", "AEC_NAMESPACE_ATTRIBUTE",
    "AEC_PREDICTABLE_LATENCY", "AEC_SMART_ALL", "AEC_SMART_MEDIA_READ_ONLY",
    "AEC_SMART_PMR_READ_ONLY", "AEC_SMART_RELIABILITY", "AEC_SMART_SPARE",
    "AEC_SMART_TEMPERATURE", "AEC_SMART_VOLATILE_BACKUP", "AEC_TELEMETRY_LOG",
    "AET_ERROR", "AET_IO_COMMAND_SET", "AET_NOTICE", "AET_SMART_HEALTH", "AET_VENDOR",
    "MAX_OUTSTANDING", "AsyncEvent", "AsyncEventTimeoutError", "AsyncEvents", "decode_dw0",
    "event_name", "info_name", "log_page_name", "log_page_size", "type_name",
]

# ---- Asynchronous Event Request, CQE DW0 (Base §5.2.1, figure "Asynchronous Event Request -
# Completion Queue Entry Dword 0"): AET 2:0, AEI 15:8, LID 23:16 ------------------------------
AET_ERROR = 0x0                      # Error status
AET_SMART_HEALTH = 0x1               # SMART / Health status
AET_NOTICE = 0x2                     # Notice
AET_IO_COMMAND_SET = 0x6             # I/O Command Specific status
AET_VENDOR = 0x7                     # Vendor Specific
# 3h-5h are reserved

# At most this many requests are kept outstanding (the controller allows AERL + 1, and a
# handful covers every event type: each type is masked until its log page is read).
MAX_OUTSTANDING = 4
# Status Code of a request beyond the controller's limit (SCT 1, Base §5.2, figure
# "Asynchronous Event Request - Command Specific Status Values").
SC_AER_LIMIT_EXCEEDED = 0x05
# Events queued for get()/iteration beyond this drop the oldest (poll() returns them anyway).
EVENT_QUEUE_MAX = 256

_TYPE_NAMES = {
    AET_ERROR: "Error status",
    AET_SMART_HEALTH: "SMART / Health status",
    AET_NOTICE: "Notice",
    AET_IO_COMMAND_SET: "I/O Command Specific status",
    AET_VENDOR: "Vendor Specific",
}

# Asynchronous Event Information per type (Base §5.2.1, figures "Asynchronous Event
# Information - Error Status", "- SMART / Health Status", "- Notice", "- I/O Command Specific
# Status")
_INFO_NAMES: dict[int, dict[int, str]] = {
    AET_ERROR: {
        0x00: "Write to Invalid Doorbell Register",
        0x01: "Invalid Doorbell Write Value",
        0x02: "Diagnostic Failure",
        0x03: "Persistent Internal Error",
        0x04: "Transient Internal Error",
        0x05: "Firmware Image Load Error",
    },
    AET_SMART_HEALTH: {
        0x00: "NVM Subsystem Reliability",
        0x01: "Temperature Threshold",
        0x02: "Spare Below Threshold",
    },
    AET_NOTICE: {
        0x00: "Namespace Attribute Changed",
        0x01: "Firmware Activation Starting",
        0x02: "Telemetry Log Changed",
        0x03: "Asymmetric Namespace Access Change",
        0x04: "Predictable Latency Event Aggregate Log Change",
        0x05: "LBA Status Information Alert",
        0x06: "Endurance Group Event Aggregate Log Page Change",
        0xF0: "Discovery Log Page Change",
    },
    AET_IO_COMMAND_SET: {
        0x00: "Reservation Log Page Available",
        0x01: "Sanitize Operation Completed",
        0x02: "Sanitize Operation Completed With Unexpected Deallocation",
    },
}

# ---- log pages an event may name (Base §5.16.1, figure "Log Page Identifiers") -------------
LID_TELEMETRY_CTRL = 0x08            # Telemetry Controller-Initiated
LID_PREDICTABLE_LATENCY_AGG = 0x0B   # Predictable Latency Event Aggregate
LID_ANA = 0x0C                       # Asymmetric Namespace Access
LID_LBA_STATUS = 0x0E                # LBA Status Information
LID_ENDURANCE_GROUP_AGG = 0x0F       # Endurance Group Event Aggregate
LID_RESERVATION_NOTIFICATION = 0x80  # Reservation Notification (I/O command set specific)
LID_SANITIZE_STATUS = 0x81           # Sanitize Status

_LOG_NAMES = {
    LID_ERROR: "Error Information",
    LID_SMART: "SMART / Health Information",
    LID_FW_SLOT: "Firmware Slot Information",
    LID_CHANGED_NS_LIST: "Changed Namespace List",
    LID_CMD_EFFECTS: "Commands Supported and Effects",
    LID_DEVICE_SELF_TEST: "Device Self-test",
    LID_TELEMETRY_CTRL: "Telemetry Controller-Initiated",
    LID_PREDICTABLE_LATENCY_AGG: "Predictable Latency Event Aggregate",
    LID_ANA: "Asymmetric Namespace Access",
    LID_PERSISTENT_EVENT: "Persistent Event Log",
    LID_LBA_STATUS: "LBA Status Information",
    LID_ENDURANCE_GROUP_AGG: "Endurance Group Event Aggregate",
    LID_RESERVATION_NOTIFICATION: "Reservation Notification",
    LID_SANITIZE_STATUS: "Sanitize Status",
}

# Largest log page read for one event: one 4 KiB page, within every controller's MDTS (the
# smallest limit MDTS can state is 2 pages of CAP.MPSMIN >= 4 KiB). Variable-length logs
# (Changed Namespace List, ANA, aggregates) are read up to here; their headers come first.
MAX_LOG_BYTES = 4096
_FIXED_LOG_SIZES = {
    LID_SMART: SMART_SIZE,                  # 512 bytes
    LID_FW_SLOT: 512,
    LID_CHANGED_NS_LIST: 4096,              # 1024 NSIDs
    LID_CMD_EFFECTS: 4096,
    LID_DEVICE_SELF_TEST: 564,
    LID_TELEMETRY_CTRL: 512,                # the header block
    LID_RESERVATION_NOTIFICATION: 64,
    LID_SANITIZE_STATUS: 512,
}

# ---- Asynchronous Event Configuration, Set Features FID 0Bh CDW11 (Base §5.27.1, figure
# "Asynchronous Event Configuration - Command Dword 11"); FID_ASYNC_EVENT_CONFIG in constants.
# SMART / Health Critical Warnings 7:0, one bit per Critical Warning bit of the SMART log:
AEC_SMART_SPARE = 1 << 0             # available spare below threshold
AEC_SMART_TEMPERATURE = 1 << 1       # temperature over/under a threshold
AEC_SMART_RELIABILITY = 1 << 2       # NVM subsystem reliability degraded
AEC_SMART_MEDIA_READ_ONLY = 1 << 3   # media placed in read-only mode
AEC_SMART_VOLATILE_BACKUP = 1 << 4   # volatile memory backup device failed
AEC_SMART_PMR_READ_ONLY = 1 << 5     # persistent memory region read-only or unreliable
AEC_SMART_ALL = 0xFF
AEC_NAMESPACE_ATTRIBUTE = 1 << 8     # Namespace Attribute Notices
AEC_FIRMWARE_ACTIVATION = 1 << 9     # Firmware Activation Notices
AEC_TELEMETRY_LOG = 1 << 10          # Telemetry Log Notices
AEC_ANA_CHANGE = 1 << 11             # Asymmetric Namespace Access Change Notices
AEC_PREDICTABLE_LATENCY = 1 << 12    # Predictable Latency Event Aggregate Log Change Notices
AEC_LBA_STATUS_INFO = 1 << 13        # LBA Status Information Notices
AEC_ENDURANCE_GROUP_EVENT = 1 << 14  # Endurance Group Event Aggregate Log Change Notices
AEC_DISCOVERY_LOG_CHANGE = 1 << 31   # Discovery Log Page Change Notices (fabrics)


class AsyncEventTimeoutError(IommuDmaError, TimeoutError):
    """No asynchronous event arrived within the time asked for."""


# ---- decoding (pure) ---------------------------------------------------------------------------

def decode_dw0(dw0: int) -> tuple[int, int, int]:
    """(AET, AEI, LID) of an Asynchronous Event Request completion's DW0."""
    dw0 &= 0xFFFFFFFF
    return dw0 & 0x7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def type_name(aet: int) -> str:
    """'SMART / Health status' for AET 1h; reserved values are named as such."""
    return _TYPE_NAMES.get(aet, f"Reserved event type {aet:#x}")


def info_name(aet: int, aei: int) -> str:
    """The spec's name of an event, e.g. info_name(1, 1) == 'Temperature Threshold'."""
    name = _INFO_NAMES.get(aet, {}).get(aei)
    if name is not None:
        return name
    if aet == AET_VENDOR:
        return f"Vendor Specific event {aei:#04x}"
    if aet == AET_NOTICE and aei >= 0xF0:
        return f"Fabrics notice {aei:#04x}"
    return f"Reserved event information {aei:#04x}"


def event_name(aet: int, aei: int) -> str:
    return f"{type_name(aet)}: {info_name(aet, aei)}"


def log_page_name(lid: int) -> str:
    name = _LOG_NAMES.get(lid)
    if name is not None:
        return name
    if lid >= 0xC0:
        return f"Vendor Specific log {lid:#04x}"
    return f"log page {lid:#04x}"


def log_page_size(lid: int, elpe: int = 0) -> int:
    """Bytes to read of the log page an event names: the page's size when fixed, the first
    MAX_LOG_BYTES of a variable or unknown page. elpe (Identify Controller ELPE, 0's based)
    sizes the Error Information log; everything is bounded by MAX_LOG_BYTES."""
    if lid == LID_ERROR:
        entries = min(max(elpe, 0), 255) + 1
        size = ERROR_ENTRY_SIZE * entries
    else:
        size = _FIXED_LOG_SIZES.get(lid, MAX_LOG_BYTES)
    return min(size, MAX_LOG_BYTES)


@dataclass(frozen=True)
class AsyncEvent:
    """One asynchronous event: type (AET), info (AEI), the log page it names (LID), the raw
    CQE DW0, and the bytes read of that log page (b"" when it could not be read: log_error
    says why)."""

    raw: int
    type: int = field(init=False)
    info: int = field(init=False)
    lid: int = field(init=False)
    log: bytes = field(default=b"", repr=False)
    log_error: str | None = None
    received: float = field(default_factory=time.time, compare=False)   # wall clock

    def __post_init__(self) -> None:
        raw = self.raw & 0xFFFFFFFF
        aet, aei, lid = decode_dw0(raw)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "type", aet)
        object.__setattr__(self, "info", aei)
        object.__setattr__(self, "lid", lid)

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def info_name(self) -> str:
        return info_name(self.type, self.info)

    @property
    def name(self) -> str:
        return event_name(self.type, self.info)

    @property
    def log_name(self) -> str:
        return log_page_name(self.lid)

    def smart_log(self) -> SmartLog | None:
        """The SMART / Health log read for this event (None if it names another page or the
        read failed)."""
        if self.lid != LID_SMART or len(self.log) < SMART_SIZE:
            return None
        return SmartLog.parse(self.log)

    def __str__(self) -> str:
        got = f"{len(self.log)} bytes read" if self.log else f"not read: {self.log_error}"
        return (f"{self.name} (AET {self.type:#x}, AEI {self.info:#04x}); log page "
                f"{self.lid:#04x} {self.log_name}, {got}")


# ---- the requests -----------------------------------------------------------------------------

EventCallback = Callable[[AsyncEvent], object]


class AsyncEvents:
    """The Asynchronous Event Requests of one controller, and the events they bring.

    arm() is called once the controller is enabled and again after each controller reset
    (which aborts the outstanding requests: those futures end with ClosedError or a
    ControllerFailedError and are dropped silently). poll() / get() / iteration surface the
    events; add_callback() registers functions called with each event (in the thread that
    polls, with no lock held; their exceptions are logged).
    """

    def __init__(self, ctrl: Controller, *, read_logs: bool = True) -> None:
        """read_logs: read the log page each event names (with RAE = 0, which unmasks the
        event type). Without it the controller reports no further event of that type until
        somebody reads that log page."""
        self.ctrl = ctrl
        self.read_logs = read_logs
        self._lock = threading.Lock()
        self._limit = 0                         # requests to keep outstanding
        self._armed: list[IoFuture] = []        # submitted, not yet consumed
        self._submitting = 0                    # slots reserved by a submission in progress
        self._completed: deque[IoFuture] = deque()   # appended by done-callbacks only
        self._events: deque[AsyncEvent] = deque()
        self._callbacks: list[EventCallback] = []
        self.closed = False
        self.dropped = 0                        # events pushed out of the get() queue
        self.failed_requests = 0                # requests that completed with an error status

    def __repr__(self) -> str:
        return (f"<AsyncEvents {getattr(self.ctrl, 'bdf', '?')} armed={self.armed}/"
                f"{self._limit} queued={len(self._events)}>")

    def __enter__(self) -> AsyncEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"asynchronous events of {getattr(self.ctrl, 'bdf', '?')}")

    @property
    def armed(self) -> int:
        """Requests outstanding on the device (submitted and not yet completed)."""
        with self._lock:
            return sum(1 for f in self._armed if not f.done())

    @property
    def limit(self) -> int:
        """How many requests arm() keeps outstanding: min(AERL + 1, MAX_OUTSTANDING), less one
        for each request the controller refused since."""
        return self._limit

    # ---- arming ------------------------------------------------------------------------------

    def arm(self) -> int:
        """Submit Asynchronous Event Requests until min(Identify AERL + 1, 4) are outstanding
        (AERL is 0's based); returns how many were submitted. Safe to call repeatedly: after
        a controller reset the aborted requests no longer count."""
        self._check_open()
        aerl = int(getattr(self.ctrl.identify, "aerl", 0)) & 0xFF
        with self._lock:
            self._limit = min(aerl + 1, MAX_OUTSTANDING)
        return self._top_up(MAX_OUTSTANDING)

    def _top_up(self, most: int) -> int:
        """Submit up to `most` requests, never more than the limit outstanding. Called with
        no lock held (submitting takes the admin queue's lock)."""
        with self._lock:
            if self.closed:
                return 0
            live = sum(1 for f in self._armed if not f.done())
            n = max(0, min(most, self._limit - live - self._submitting))
            self._submitting += n
        sent = 0
        try:
            admin = self.ctrl.admin
            if admin is None:
                raise ClosedError(f"controller {getattr(self.ctrl, 'bdf', '?')} (no admin queue)")
            for _ in range(n):
                # no deadline: an AER stays outstanding until an event (§5.2)
                fut = admin.submit(Sqe(ADM_ASYNC_EVENT_REQUEST),
                                   what="Asynchronous Event Request", timeout=None)
                with self._lock:                # counted once: armed, no longer submitting
                    self._armed.append(fut)
                    self._submitting -= 1
                sent += 1
                fut.add_done_callback(self._completed.append)   # record only: no submitting
        finally:
            with self._lock:
                self._submitting -= n - sent
        return sent

    # ---- events --------------------------------------------------------------------------------

    def _harvest(self) -> list[IoFuture]:
        """Take the completed requests (each once, in completion order)."""
        with self._lock:
            out: list[IoFuture] = []
            while self._completed:
                f = self._completed.popleft()
                if f in self._armed:
                    self._armed.remove(f)
                    out.append(f)
            # a request whose callback was registered just as it completed is found here too
            late = [f for f in self._armed if f.done()]
            for f in late:
                self._armed.remove(f)
            return out + late

    def _consume(self, fut: IoFuture) -> AsyncEvent | None:
        """An event from a completed request, or None (aborted or failed: not re-armed)."""
        err = fut.exception()
        if err is not None:
            if isinstance(err, (ClosedError, ControllerFailedError)):
                log.debug("%s: Asynchronous Event Request ended by %s", self._bdf, err)
                return None
            with self._lock:
                self.failed_requests += 1
                self._limit = max(0, self._limit - 1)      # not re-armed
            if isinstance(err, NvmeError) and (err.sct, err.sc) == (SCT_CMD_SPECIFIC,
                                                                   SC_AER_LIMIT_EXCEEDED):
                log.warning("%s: %s; keeping %d outstanding", self._bdf, err, self._limit)
            else:
                log.warning("%s: Asynchronous Event Request failed: %s", self._bdf, err)
            return None
        if fut.completion is None:
            return None
        dw0 = fut.completion.result & 0xFFFFFFFF
        _, _, lid = decode_dw0(dw0)
        data, why = b"", None
        if self.read_logs:
            elpe = int(getattr(self.ctrl.identify, "elpe", 0)) & 0xFF
            size = log_page_size(lid, elpe)
            try:
                # RAE (CDW10 bit 15) is 0 in ctrl.get_log_page: the controller clears the event
                # and reports that event type again (Base §5.2, §5.16)
                got = bytes(self.ctrl.get_log_page(lid, size))
                data = got[:size]
            except IommuDmaError as e:
                why = str(e)
                log.warning("%s: event %s: reading log page %#04x failed: %s", self._bdf,
                            event_name(*decode_dw0(dw0)[:2]), lid, e)
        else:
            why = "not read (read_logs=False)"
        return AsyncEvent(dw0, log=data, log_error=why)

    @property
    def _bdf(self) -> str:
        return str(getattr(self.ctrl, "bdf", "?"))

    def _deliver(self, events: list[AsyncEvent]) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
            for ev in events:
                if len(self._events) >= EVENT_QUEUE_MAX:
                    self._events.popleft()
                    self.dropped += 1
                self._events.append(ev)
        for ev in events:
            log.info("%s: asynchronous event: %s", self._bdf, ev)
            for fn in callbacks:
                try:
                    fn(ev)
                except Exception:
                    log.exception("%s: asynchronous event callback %r raised", self._bdf, fn)

    def _process(self, timeout: float) -> bool:
        """Process the admin queue; True when nothing is outstanding on it."""
        admin = self.ctrl.admin
        if admin is None:
            raise ClosedError(f"controller {self._bdf} (no admin queue)")
        admin.process(timeout)
        return admin.outstanding == 0

    def poll(self, timeout: float = 0.0) -> list[AsyncEvent]:
        """Process the admin queue (waiting up to timeout seconds for an event), and turn each
        completed request into an AsyncEvent: read its log page, re-arm, call the callbacks,
        queue it for get(). Returns the events found by this call."""
        self._check_open()
        deadline = time.monotonic() + max(timeout, 0.0)
        found: list[AsyncEvent] = []
        while True:
            left = deadline - time.monotonic()
            # short slices: the queue's lock is held while it waits
            idle = self._process(min(left, POLL_SLICE) if left > 0 else 0.0)
            done = self._harvest()
            events = [ev for ev in (self._consume(f) for f in done) if ev is not None]
            if events:
                try:
                    self._top_up(len(events))       # one new request per event consumed
                except IommuDmaError as e:
                    log.warning("%s: re-arming Asynchronous Event Requests failed: %s",
                                self._bdf, e)
                self._deliver(events)
                found += events
            if found or time.monotonic() >= deadline:
                return found
            if idle:                                # nothing outstanding to wait for
                time.sleep(min(max(deadline - time.monotonic(), 0.0), POLL_SLICE))

    def get(self, timeout: float | None = None) -> AsyncEvent:
        """The next event (oldest first), polling for it up to timeout seconds (None: no
        limit); AsyncEventTimeoutError when none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
            self._check_open()
            left = 0.05 if deadline is None else min(deadline - time.monotonic(), 0.05)
            if left <= 0 and polled:
                raise AsyncEventTimeoutError(
                    f"{self._bdf}: no asynchronous event within {timeout} s ({self.armed} "
                    "Asynchronous Event Requests outstanding)")
            self.poll(max(left, 0.0))
            polled = True

    def __iter__(self) -> Iterator[AsyncEvent]:
        """The events as they come; ends when this object (or its controller) is closed."""
        while True:
            try:
                yield self.get()
            except ClosedError:
                return

    def pending(self) -> list[AsyncEvent]:
        """Take every event queued for get() without waiting."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    # ---- callbacks -------------------------------------------------------------------------------

    def add_callback(self, fn: EventCallback) -> None:
        """Call fn(event) for every event, in the thread that polls (no lock held, so it may
        send admin commands); an exception it raises is logged."""
        with self._lock:
            self._callbacks.append(fn)

    def remove_callback(self, fn: EventCallback) -> None:
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    # ---- configuration ---------------------------------------------------------------------------

    def config(self) -> int:
        """Current Asynchronous Event Configuration (Get Features FID 0Bh)."""
        return self.ctrl.get_features(FID_ASYNC_EVENT_CONFIG) & 0xFFFFFFFF

    def configure(self, value: int) -> None:
        """Set Features Asynchronous Event Configuration (FID 0Bh) to exactly value."""
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"Asynchronous Event Configuration {value:#x} is not a 32-bit value")
        self.ctrl.set_features(FID_ASYNC_EVENT_CONFIG, value)

    def enable(self, mask: int) -> int:
        """Turn on the events of mask (AEC_* bits) in addition to those already on; returns
        the new configuration."""
        if not 0 <= mask <= 0xFFFFFFFF:
            raise ValueError(f"event mask {mask:#x} is not a 32-bit value")
        value = self.config() | mask
        self.configure(value)
        return value

    def disable(self, mask: int) -> int:
        """Turn off the events of mask; returns the new configuration."""
        if not 0 <= mask <= 0xFFFFFFFF:
            raise ValueError(f"event mask {mask:#x} is not a 32-bit value")
        value = self.config() & ~mask
        self.configure(value)
        return value

    def close(self) -> None:
        """Stop surfacing events. Outstanding requests stay with the device until the
        controller is disabled (the controller's close or reset ends them)."""
        with self._lock:
            self.closed = True
            self._callbacks.clear()
            self._armed.clear()
            self._completed.clear()

"""Asynchronous events on the bench's emulated controller: a SMART / Health temperature event.

QEMU 7.2's nvme (hw/nvme/ctrl.c) raises "Temperature Threshold" when Set Features Temperature
Threshold puts the over-temperature threshold at or below the composite temperature (0x143 =
323 K) while bit 1 of the Asynchronous Event Configuration is on; the event type stays masked
until the SMART / Health log is read with RAE = 0; features survive a controller reset, so
every test restores what it changed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iommu_dma.nvme.constants import FID_TEMPERATURE_THRESHOLD, LID_SMART
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.events import (
    AEC_SMART_TEMPERATURE,
    AET_SMART_HEALTH,
    AsyncEvent,
    AsyncEventTimeoutError,
)

pytestmark = pytest.mark.iommu_dma_vm(bench="default")

EVENT_TIMEOUT = 30.0        # TCG is slow; QEMU posts the event at once
QUIET = 1.0                 # how long "no event" is waited for

# Temperature Threshold, Set/Get Features FID 04h CDW11 (NVMe Base 2.0 §5.27.1): TMPTH 15:0
# in kelvin, TMPSEL 19:16 (0 = composite), THSEL 21:20 (0 = over-temperature threshold)
THSEL_OVER = 0 << 20
TMPSEL_COMPOSITE = 0 << 16


def over_threshold(kelvin: int) -> int:
    return kelvin & 0xFFFF | TMPSEL_COMPOSITE | THSEL_OVER



@pytest.fixture
def restore(ctrl: Controller) -> Iterator[tuple[int, int]]:
    """(temperature threshold, async event configuration) as found; put back afterwards."""
    threshold = ctrl.get_features(FID_TEMPERATURE_THRESHOLD, cdw11=over_threshold(0)) & 0xFFFF
    assert ctrl.events is not None
    aec = ctrl.events.config()
    yield threshold, aec
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(threshold))
    ctrl.events.configure(aec)
    assert ctrl.get_features(FID_TEMPERATURE_THRESHOLD,
                             cdw11=over_threshold(0)) & 0xFFFF == threshold


def assert_temperature_event(ev: AsyncEvent, temperature: int) -> None:
    assert ev.type == AET_SMART_HEALTH, ev
    assert ev.type_name == "SMART / Health status"
    assert "temperature threshold" in ev.info_name.lower(), ev
    assert ev.lid == LID_SMART == 0x02
    assert ev.log_error is None and len(ev.log) == 512      # the log page was read
    smart = ev.smart_log()
    assert smart is not None and smart.temperature == temperature


def test_temperature_threshold_event(ctrl: Controller, restore: tuple[int, int]) -> None:
    threshold, _ = restore
    temperature = ctrl.smart_log().temperature
    assert 273 < temperature < threshold, (temperature, threshold)   # QEMU: 323 K < 343 K
    events = ctrl.events                                         # armed by Controller.open
    assert events is not None
    limit = min(ctrl.identify.aerl + 1, 4)
    assert events.armed == limit and ctrl.admin is not None and ctrl.admin.outstanding == limit
    assert events.arm() == 0                                     # idempotent
    seen: list[AsyncEvent] = []
    events.add_callback(seen.append)
    assert events.enable(AEC_SMART_TEMPERATURE) & AEC_SMART_TEMPERATURE
    assert events.config() & AEC_SMART_TEMPERATURE
    assert events.poll(QUIET) == [] and seen == []

    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 20))
    ev = events.get(timeout=EVENT_TIMEOUT)
    assert_temperature_event(ev, temperature)
    assert seen == [ev]                                          # callback and get(): same event
    assert events.armed == limit                                 # re-armed
    assert ctrl.admin.outstanding == limit

    # The log read (RAE = 0) unmasked SMART / Health events: the next crossing is reported.
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(threshold))
    assert events.poll(QUIET) == []                              # above: no event
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 10))
    ev2 = events.get(timeout=EVENT_TIMEOUT)
    assert_temperature_event(ev2, temperature)
    assert seen == [ev, ev2] and events.armed == limit
    with pytest.raises(AsyncEventTimeoutError):
        events.get(timeout=QUIET)

    # A controller reset aborts the requests; the controller arms them again.
    ctrl.reset()
    assert events.armed == limit and ctrl.admin.outstanding == limit
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(threshold))
    events.enable(AEC_SMART_TEMPERATURE)                         # the reset cleared it
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 20))
    assert_temperature_event(events.get(timeout=EVENT_TIMEOUT), temperature)


def test_unread_log_keeps_event_type_masked(ctrl: Controller,
                                            restore: tuple[int, int]) -> None:
    """Without the log read the controller reports no second SMART / Health event; reading
    the SMART log with RAE = 0 (ctrl.smart_log) unmasks it."""
    threshold, _ = restore
    temperature = ctrl.smart_log().temperature
    events = ctrl.events
    assert events is not None
    events.read_logs = False
    events.enable(AEC_SMART_TEMPERATURE)
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 20))
    ev = events.get(timeout=EVENT_TIMEOUT)
    assert ev.type == AET_SMART_HEALTH and ev.lid == LID_SMART and ev.log == b""
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(threshold))
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 20))
    assert events.poll(QUIET) == []                              # masked: nothing posted
    ctrl.smart_log()                                             # RAE = 0: unmasks
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(threshold))
    ctrl.set_features(FID_TEMPERATURE_THRESHOLD, over_threshold(temperature - 20))
    again = events.get(timeout=EVENT_TIMEOUT)
    assert again.type == AET_SMART_HEALTH and "temperature" in again.info_name.lower()
    events.read_logs = True


def test_controller_close_ends_requests(vfio_bdfs: list[str]) -> None:
    """Closing the controller aborts the outstanding requests: no event, iteration ends."""
    with Controller.open(vfio_bdfs[0]) as c:
        events = c.events
        assert events is not None and events.armed >= 1
    assert events.armed == 0
    assert list(events) == []

"""Fixtures shared by the VM tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommu_dma.nvme.controller import Controller
from iommu_dma.testing.bench import current_bench
from iommu_dma.testing.guest import driver_of
from iommu_dma.testing.guest import nvme_bdfs as guest_nvme_bdfs
from tests.vm.cli_run import Cli

SETUP_VFIO = Path(__file__).resolve().parent.parent / "scripts" / "setup_vfio.sh"


def setup_vfio(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run scripts/setup_vfio.sh with args; output captured as text."""
    proc = subprocess.run(["bash", str(SETUP_VFIO), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"setup_vfio.sh {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


# The device-test fixtures of the pytest plugin (iommu_dma/testing/device_fixtures.py) keep
# these controllers open for the session; other tests get the devices to themselves.
SESSION_DEVICE_FIXTURES = {"nvme0", "nvme1"}


def _uses_session_devices(request: pytest.FixtureRequest) -> bool:
    return bool(SESSION_DEVICE_FIXTURES & set(request.fixturenames))


def _release_session_devices(request: pytest.FixtureRequest) -> None:
    """Close the controllers nvme0/nvme1 keep open (reopened at their next use), so that a
    test can open, rebind or unbind them itself."""
    request.getfixturevalue("idma_devices").close()


def _driver_order(item: pytest.Item) -> int:
    """0: tests on the kernel driver (or that bind and unbind themselves), 1: any driver,
    2: tests on vfio-pci."""
    names = set(getattr(item, "fixturenames", ()))
    if "vfio_bdfs" in names or SESSION_DEVICE_FIXTURES & names:
        return 2
    return 1 if "any_driver" in names else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Inside a bench guest: run the tests that want the kernel driver first and those that
    want vfio-pci last (a stable sort: file order otherwise), so the controllers change
    driver a few times per guest instead of at every switch between files (each rebind takes
    tens of seconds under TCG)."""
    if current_bench() is not None:
        items.sort(key=_driver_order)


@pytest.fixture
def vfio_bdfs(request: pytest.FixtureRequest, idma_nvme_bdfs: list[str]) -> Iterator[list[str]]:
    """The bench's controllers bound to vfio-pci for the test. They stay bound for the next
    test that wants them so (rebinding costs seconds under TCG); a test that does not ask for
    this fixture gets them back on the kernel driver first (see below)."""
    if not _uses_session_devices(request):
        _release_session_devices(request)
    if any(driver_of(b) != "vfio-pci" for b in idma_nvme_bdfs):
        setup_vfio("bind", *idma_nvme_bdfs)
    yield idma_nvme_bdfs


@pytest.fixture
def ctrl(vfio_bdfs: list[str]) -> Iterator[Controller]:
    """A controller of the test's own: the bench's first, opened for this test and closed
    after it (for tests that reset, close or count; others use the plugin's nvme0)."""
    with Controller.open(vfio_bdfs[0]) as c:
        yield c


@pytest.fixture
def any_driver() -> None:
    """For VM tests that touch no controller: the controllers stay on whatever driver they
    are (rebinding costs tens of seconds under TCG)."""


@pytest.fixture(autouse=True)
def _kernel_driver_unless_vfio(request: pytest.FixtureRequest) -> None:
    """VM tests that do not ask for vfio_bdfs (or any_driver) start with every controller on
    `nvme`."""
    names = request.fixturenames
    if current_bench() is None or "vfio_bdfs" in names or "any_driver" in names or \
            _uses_session_devices(request):
        return
    bound = [b for b in guest_nvme_bdfs() if driver_of(b) == "vfio-pci"]
    if bound:
        _release_session_devices(request)
        setup_vfio("unbind", *bound)


@pytest.fixture
def cli(capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """iommu-dma run in the test process (tests/vm/cli_run.py)."""
    return Cli(capfdbinary, monkeypatch)

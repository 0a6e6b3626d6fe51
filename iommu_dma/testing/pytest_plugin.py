"""pytest integration of the bench: tests marked `iommu_dma_vm` run inside a bench guest.

Everything this plugin adds is namespaced so that it cannot clash with other projects' suites: the
marker `iommu_dma_vm`, the fixtures `idma_bench`, `idma_bench_images`, `idma_nvme_bdfs`,
`idma_qmp` and the `--iommu-dma-*` and `--idma-vm-*` options. Tests without the marker are left
alone. The device-test fixtures (`--pciaddr`, nvme0, nvme0n1, qpair, buf, pcie: see
device_fixtures) keep pynvme's names; a suite's own fixtures of the same name take precedence.

On the host, each bench with selected `iommu_dma_vm` tests gets one guest, which runs every
selected test of that bench (`pytest` in the guest, same checkout, same node ids); the guest's
reports are replayed on the host as if the tests had run here. Guests start as soon as the tests
are collected, `--idma-vm-jobs` of them at a time (default 2), the bench with the most tests
first; host-only tests run meanwhile as usual.

A test names its bench with `@pytest.mark.iommu_dma_vm(bench="aw39")` (default: "default") or
by indirect parametrization of `idma_bench`:
`@pytest.mark.parametrize("idma_bench", [...], indirect=True)`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from iommu_dma.testing import device_fixtures, vm
from iommu_dma.testing.bench import Bench, current_bench, get_bench
from iommu_dma.testing.device_fixtures import (  # noqa: F401 - fixtures of the plugin
    buf,
    idma_devices,
    nvme0,
    nvme0n1,
    nvme1,
    pcie,
    qpair,
)

if TYPE_CHECKING:
    from iommu_dma.testing.qmp import Qmp

REPORT_OPT = "--iommu-dma-guest-report"
SELECT_OPT = "--iommu-dma-guest-select"
MARKER = "iommu_dma_vm"       # tests that run inside a bench guest
FIXTURE = "idma_bench"        # the bench configuration, indirect-parametrizable


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iommu-dma", "iommu-dma bench guests")
    group.addoption(REPORT_OPT, default=None, help="(internal) file the guest writes reports to")
    group.addoption(SELECT_OPT, default=None, help="(internal) file of node ids the guest runs")
    group.addoption("--idma-vm-timeout", type=float, default=vm.DEFAULT_TIMEOUT,
                    help="seconds one bench guest may run before it is killed")
    group.addoption("--idma-vm-verbose", action="store_true",
                    help="copy the guests' console output to the terminal")
    group.addoption("--idma-vm-jobs", type=int, default=2,
                    help="bench guests running at once (default 2; each takes about one core)")
    device_fixtures.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(bench='default'): run inside a QEMU bench guest of iommu-dma")
    if in_guest():
        config.pluginmanager.register(GuestReporter(config), "iommu-dma-guest")
    else:
        config.pluginmanager.register(HostRunner(config), "iommu-dma-host")


def in_guest() -> bool:
    return current_bench() is not None


def bench_name(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and FIXTURE in callspec.params:
        return str(callspec.params[FIXTURE])
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        raise ValueError(f"{item.nodeid} is not an {MARKER} test")
    return str(marker.kwargs.get("bench", marker.args[0] if marker.args else "default"))


@pytest.fixture
def idma_bench(request: pytest.FixtureRequest) -> Bench:
    """The bench configuration this guest was booted with (vm tests only)."""
    booted = current_bench()
    if booted is None:
        pytest.fail(f"the {FIXTURE} fixture is only available inside a bench guest "
                    f"(mark the test {MARKER})")
    wanted = getattr(request, "param", booted.name)
    if wanted != booted.name:
        pytest.fail(f"test wants bench {wanted!r} but this guest runs {booted.name!r}")
    return booted


@pytest.fixture
def idma_qmp(idma_bench: Bench) -> Iterator[Qmp]:
    """The guest's own QEMU monitor (benches with fault injection, e.g. "faults"); on teardown
    every stalled request is resumed and every throttle removed, so no test leaves QEMU stuck."""
    from iommu_dma.testing.qmp import Qmp

    if not idma_bench.fault_injection:
        pytest.fail(f"bench {idma_bench.name!r} has no in-guest monitor: idma_qmp needs a bench "
                    "with fault injection (error LBAs, stallable namespaces or hotplug)")
    with Qmp.guest() as qmp:
        try:
            yield qmp
        finally:
            qmp.clear_faults()


@pytest.fixture
def idma_bench_images() -> Path:
    """Host directory of the bench's backing images (readable from the guest)."""
    return Path(os.environ[vm.IMAGES_ENV])


class GuestReporter:
    """Inside the guest: writes every test report to a JSON-lines file for the host."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        path = config.getoption(REPORT_OPT)
        self.out = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def pytest_collection_modifyitems(self, items: list[pytest.Item],
                                      config: pytest.Config) -> None:
        path = config.getoption(SELECT_OPT)
        if not path:
            return
        wanted = set(Path(path).read_text().splitlines())
        keep = [item for item in items if item.nodeid in wanted]
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in wanted])
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.out is None:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.out.write(json.dumps(data) + "\n")

    def pytest_unconfigure(self) -> None:
        if self.out is not None:
            self.out.close()


class HostRunner:
    """On the host: runs each bench's vm tests in one guest and replays their reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.by_bench: dict[str, list[pytest.Item]] = defaultdict(list)
        self.reports: dict[str, list[pytest.TestReport]] = {}
        self.errors: dict[str, str] = {}
        self.runs: dict[str, Future[list[str]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # Guests start from pool threads while host tests run; those may monkeypatch
        # os.environ, so guests see the environment as it was at start-up.
        self.env = dict(os.environ)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if item.get_closest_marker(MARKER) is not None:
                self.by_bench[bench_name(item)].append(item)
        jobs = self.config.getoption("--idma-vm-jobs")
        if self.config.option.collectonly:
            return                                  # listing tests boots nothing
        if jobs > 1 and len(self.by_bench) > 1:
            self._pool = ThreadPoolExecutor(jobs, thread_name_prefix="idma-bench")
            for name in sorted(self.by_bench, key=lambda n: -len(self.by_bench[n])):
                self.runs[name] = self._pool.submit(self._run_bench, name)

    def pytest_unconfigure(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> bool | None:
        if item.get_closest_marker(MARKER) is None:
            return None
        name = bench_name(item)
        if name in self.runs:
            for line in self.runs.pop(name).result():
                self._say(line)
        elif name not in self.reports and name not in self.errors:
            for line in self._run_bench(name):
                self._say(line)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = [r for r in self.reports.get(name, []) if r.nodeid == item.nodeid]
        if not reports:
            reports = [self._missing_report(item, name)]
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _say(self, line: str) -> None:
        tw = self.config.get_terminal_writer()
        tw.line()
        tw.line(line, bold=True)

    def _run_bench(self, name: str) -> list[str]:
        """Run the bench's guest (possibly in a pool thread); the lines to show the user."""
        items = self.by_bench[name]
        try:
            bench = get_bench(name)
        except KeyError as e:
            self.errors[name] = str(e)
            return []
        said = [f"[iommu-dma] bench {name!r}: one guest for {len(items)} test(s)"]
        verbose = self.config.getoption("--idma-vm-verbose")
        tail: deque[str] = deque(maxlen=60)

        def on_line(line: str) -> None:
            tail.append(line)
            if verbose:
                with self._lock:
                    self.config.get_terminal_writer().line(f"  {name}| {line}")

        todo = items
        reports: list[pytest.TestReport] = []
        for attempt in (1, 2):
            with vm.work_directory() as work:
                report_file = work / "reports.jsonl"
                command = _guest_pytest_command(todo, report_file, work / "selected.txt")
                try:
                    result = vm.run(bench, command, on_line=on_line, work_dir=work,
                                    timeout=self.config.getoption("--idma-vm-timeout"),
                                    cwd=Path(self.config.rootpath), env=self.env)
                except vm.VmError as e:
                    self.errors[name] = str(e)
                    self.reports[name] = reports + self._load(report_file)
                    return [*said, f"[iommu-dma] bench {name!r} failed: {e}"]
                got = self._load(report_file)
            said.append(f"[iommu-dma] bench {name!r} finished in {result.seconds:.0f} s "
                        f"(guest pytest exit {result.returncode})")
            done = {r.nodeid for r in got if r.when == "teardown"}
            reports += [r for r in got if r.nodeid in done]
            left = [i for i in todo if i.nodeid not in done]
            if _pytest_ended(result.returncode) or not left or attempt == 2:
                reports += [r for r in got if r.nodeid not in done]
                break
            # The guest died: the tests it finished keep their reports, pass or fail; only
            # the ones it never finished run once more, in a new guest.
            said.append(f"[iommu-dma] bench {name!r}: the guest ended (status "
                        f"{result.returncode}) with {len(left)} of {len(todo)} test(s) "
                        f"unfinished; running those in a new guest. Its last output:\n"
                        + "\n".join(tail))
            todo = left
        self.reports[name] = reports
        self.errors[name] = ("the guest ended without reporting this test; last guest output:\n"
                             + "\n".join(tail))
        return said

    def _load(self, path: Path) -> list[pytest.TestReport]:
        if not path.exists():
            return []
        reports = []
        for line in path.read_text().splitlines():
            data = json.loads(line)
            reports.append(self.config.hook.pytest_report_from_serializable(
                config=self.config, data=data))
        return reports

    def _missing_report(self, item: pytest.Item, name: str) -> pytest.TestReport:
        why = self.errors.get(name, "no report from the guest")
        return pytest.TestReport(item.nodeid, item.location, {}, "failed",
                                 f"bench {name!r}: {why}", "call")


def _pytest_ended(returncode: int) -> bool:
    """pytest itself ends with 0..5; any other status of a bench guest means the guest died
    (vng gives 255 when no exit status came back: a guest that did not boot, or crashed)."""
    return 0 <= returncode <= 5


def _guest_pytest_command(items: list[pytest.Item], report_file: Path, select: Path) -> str:
    """pytest in the guest on the items' files, narrowed to exactly these node ids."""
    select.write_text("\n".join(item.nodeid for item in items) + "\n")
    files = sorted({item.nodeid.split("::")[0] for item in items})
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE",
            f"{REPORT_OPT}={report_file}", f"{SELECT_OPT}={select}", *files]
    return shlex.join(args)


@pytest.fixture
def idma_nvme_bdfs(idma_bench: Bench) -> list[str]:
    """BDFs of the bench's controllers, in the bench's order."""
    from iommu_dma.testing.guest import nvme_bdfs as find

    found = find()
    want = len(idma_bench.controllers)
    assert len(found) == want, f"expected {want} NVMe controllers, saw {found}"
    return found

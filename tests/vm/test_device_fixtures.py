"""The device-test fixtures (`pytest --pciaddr BDF`: nvme0, nvme0n1, qpair, buf, pcie) run a
suite that is not the project's own, in a pytest process of its own inside the guest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iommu_dma.testing.bench import BENCH_ENV

pytestmark = pytest.mark.iommu_dma_vm(bench="aw39")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "test_device_example.py"

# Test 1 disables the controller behind the library's back (CC.EN = 0) and fails; the fixture
# resets it after the test, so test 2 finds it working.
WEDGE = '''
import os
from iommu_dma.nvme import regs

def test_1_leaves_the_controller_disabled(nvme0, pcie):
    pcie.write32(regs.CC, 0)
    assert False, "failing on purpose, with CC.EN = 0"

def test_2_finds_it_working(nvme0, nvme0n1):
    data = os.urandom(nvme0n1.lba_size)
    nvme0n1.write(nvme0n1.blocks - 1, data)
    assert nvme0n1.read(nvme0n1.blocks - 1, 1) == data
    assert nvme0.resets >= 1
'''


def pytest_run(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    return proc


def test_example_suite_and_a_failed_test_with_pciaddr(vfio_bdfs: list[str],
                                                      tmp_path: Path) -> None:
    """One pytest session (one Python start under TCG): the wedging test fails, the one after
    it finds the controller working, and the README's example suite passes after both."""
    suite = tmp_path / "test_wedge.py"
    suite.write_text(WEDGE)
    proc = pytest_run("--pciaddr", vfio_bdfs[0], str(suite), str(EXAMPLE), cwd=tmp_path)
    assert "1 failed, 5 passed" in proc.stdout
    assert "failing on purpose" in proc.stdout
    assert "_ test_1_leaves_the_controller_disabled _" in proc.stdout    # the failure's header


def test_bench_default_and_skip_without_a_controller(vfio_bdfs: list[str],
                                                      tmp_path: Path) -> None:
    """In a bench guest the fixtures default to its first controller; elsewhere, without
    --pciaddr, the tests are skipped with the reason."""
    proc = pytest_run(str(EXAMPLE), cwd=tmp_path)
    assert proc.returncode == 0 and "4 passed" in proc.stdout
    env = {k: v for k, v in os.environ.items() if k != BENCH_ENV}
    proc = pytest_run(str(EXAMPLE), env=env, cwd=tmp_path)
    assert "4 skipped" in proc.stdout
    assert "give --pciaddr BDF" in proc.stdout

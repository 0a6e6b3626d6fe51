"""setup_vfio.sh logic that needs no device: argument checks and the no-IOMMU message."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup_vfio.sh"


def run(*args: str, sysfs: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if sysfs is not None:
        env["SETUP_VFIO_SYSFS"] = str(sysfs)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_no_iommu_groups_names_the_kernel_options(tmp_path: Path) -> None:
    (tmp_path / "kernel" / "iommu_groups").mkdir(parents=True)
    (tmp_path / "bus" / "pci" / "devices").mkdir(parents=True)
    proc = run("bind", sysfs=tmp_path)
    assert proc.returncode == 1
    assert "no IOMMU groups" in proc.stderr
    assert "intel_iommu=on" in proc.stderr and "amd_iommu=on" in proc.stderr


def test_usage_and_unknown_option() -> None:
    assert run("--help").returncode == 0
    proc = run("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    assert run().returncode == 2


def test_hugepages_must_be_a_number() -> None:
    proc = run("--hugepages", "lots", "status")
    assert proc.returncode == 1 and "not 'lots'" in proc.stderr


def test_user_option_must_be_a_user_name() -> None:
    """`--user -G` once passed -G to id (which accepted it) and on to chown/su."""
    for bad in ("-G", "--all", "a b", "x;y"):
        proc = run("--user", bad, "status")
        assert proc.returncode == 1, bad
        assert f"'{bad}' is not a user name" in proc.stderr
    proc = run(f"--user={'-G'}", "status")
    assert proc.returncode == 1 and "'-G' is not a user name" in proc.stderr
    proc = run("--user=", "status")
    assert proc.returncode == 1 and "--user needs a user name" in proc.stderr
    proc = run("--user", "no-such-user-here", "status")
    assert proc.returncode == 1 and "no such user 'no-such-user-here'" in proc.stderr

"""Fixtures shared by the VM tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SETUP_VFIO = Path(__file__).resolve().parent.parent / "scripts" / "setup_vfio.sh"


def setup_vfio(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run scripts/setup_vfio.sh with args; output captured as text."""
    proc = subprocess.run(["bash", str(SETUP_VFIO), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"setup_vfio.sh {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture
def vfio_bdfs(nvme_bdfs: list[str]) -> Iterator[list[str]]:
    """The bench's controllers bound to vfio-pci for the test, given back to nvme afterwards."""
    setup_vfio("bind", *nvme_bdfs)
    yield nvme_bdfs
    setup_vfio("unbind", *nvme_bdfs)

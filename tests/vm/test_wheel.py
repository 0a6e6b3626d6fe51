"""The wheel is the product: installed alone into a fresh virtualenv, with nothing of the
checkout on the path, its `iommu-dma` command lists, binds, identifies and unbinds a controller
in the bench guest (with the setup_vfio.sh the wheel ships).

build/wheelhouse/ holds the iommu-dma wheel and its dependencies' wheels (`make wheelhouse`,
i.e. `python -m pip wheel . -w build/wheelhouse`); `make wheel-venv` installs them offline
(--no-index) into build/wheel-venv on the host: the guest sees the host's files read-only,
and pip under TCG alone took about 5 minutes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from iommu_dma.testing.bench import Bench
from iommu_dma.testing.guest import driver_of

pytestmark = pytest.mark.iommu_dma_vm(bench="default")

CHECKOUT = Path(__file__).resolve().parents[2]
WHEELHOUSE = CHECKOUT / "build" / "wheelhouse"
WHEEL_VENV = CHECKOUT / "build" / "wheel-venv"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Venv:
    """A virtualenv and an environment that knows nothing of the checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.env = {"PATH": f"{self.bin}:{SYSTEM_PATH}", "HOME": str(root), "LC_ALL": "C.UTF-8",
                    "VIRTUAL_ENV": str(root)}

    def run(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], cwd="/", env=self.env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def ok(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, (f"{' '.join(map(str, args))} failed ({proc.returncode}):"
                                      f"\n{proc.stdout}{proc.stderr}")
        return proc

    def iommu_dma(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ok(self.bin / "iommu-dma", *args)


def wheel_venv() -> Venv:
    """build/wheel-venv; the test FAILS (not skips) without it."""
    names = sorted(w.name for w in WHEELHOUSE.glob("*.whl")) if WHEELHOUSE.is_dir() else []
    for dep in ("iommu_dma", "cffi", "pycparser", "pyudev"):
        assert any(n.startswith(f"{dep}-") for n in names), \
            f"no {dep} wheel in {WHEELHOUSE}: run make wheelhouse"
    if not (WHEEL_VENV / ".built").is_file():
        pytest.fail(f"no virtualenv at {WHEEL_VENV}: run make wheel-venv first (it installs "
                    "the wheelhouse there, offline)")
    return Venv(WHEEL_VENV)


def check_origin(v: Venv) -> None:
    """iommu_dma (and the setup script bind/unbind run) come from the venv, not the checkout."""
    assert "PYTHONPATH" not in v.env and v.env["PATH"] == f"{v.bin}:{SYSTEM_PATH}"
    proc = v.ok(v.bin / "python", "-c",
                "import sys, iommu_dma, iommu_dma.cli.devices as d; "
                "print(iommu_dma.__file__); print(d.SETUP_SCRIPT); "
                "print(d.SETUP_SCRIPT.is_file()); print(iommu_dma.native_version()); "
                "print(sys.base_prefix); "
                "print(*sys.path, sep='\\n')")
    module, script, exists, _native, base, *path = proc.stdout.splitlines()
    for p in (module, script):
        assert p.startswith(f"{v.root}/lib/"), p
    assert script.endswith("/iommu_dma/data/setup_vfio.sh") and exists == "True"
    # only the venv and its base interpreter's standard library: not the checkout's .venv
    assert base != str(CHECKOUT / ".venv")
    assert all(p.startswith((f"{v.root}/", f"{base}/lib/python3")) for p in path if p), path
    launcher = (v.bin / "iommu-dma").read_text().splitlines()[0]
    assert launcher == f"#!{v.bin}/python", launcher


def check_commands(v: Venv, bdf: str, serial: str) -> None:
    listed = v.iommu_dma("list").stdout
    assert bdf in listed and serial in listed and " nvme " in listed, listed
    bind = v.iommu_dma("bind", bdf)
    try:
        assert f"iommu-dma: {bdf} bound to vfio-pci" in bind.stdout, bind.stdout
        assert "setup_vfio" not in bind.stdout + bind.stderr
        assert driver_of(bdf) == "vfio-pci"
        idc = json.loads(v.iommu_dma("id-ctrl", bdf, "-o", "json").stdout)
        assert idc["sn"].rstrip() == serial          # nvme-cli's JSON keeps the padding
    finally:
        unbind = v.iommu_dma("unbind", bdf)
    assert f"iommu-dma: {bdf} given back to the kernel nvme driver" in unbind.stdout
    assert "setup_vfio" not in unbind.stdout + unbind.stderr
    assert driver_of(bdf) == "nvme"
    out = v.iommu_dma("vm", "--help").stdout
    assert out.startswith("usage: iommu-dma vm") and "--bench" in out


def test_the_wheel_installs_and_runs(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    v = wheel_venv()
    check_origin(v)
    check_commands(v, idma_nvme_bdfs[0], idma_bench.controllers[0].serial)

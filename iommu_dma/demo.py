"""`make demo`: boot the default bench and tour the stack inside the guest.

On the host, `python -m iommu_dma.demo` boots the bench and runs itself inside the guest with
`--in-guest`; there it runs each step as a shell command and prints it as it goes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup_vfio.sh"


def step(title: str, command: list[str]) -> None:
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    proc = subprocess.run(command, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed ({proc.returncode}): {shlex.join(command)}")


def tour() -> None:
    """The demo itself, run as root inside the bench guest."""
    setup = ["bash", str(SETUP)]
    step("NVMe controllers as the guest kernel sees them", setup + ["status"])
    step("bind every free NVMe controller to vfio-pci", setup + ["bind"])
    step("now owned by vfio-pci, reachable through /dev/vfio", setup + ["status"])
    step("give them back to the kernel nvme driver", setup + ["unbind"])
    step("back on the kernel driver", setup + ["status"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iommu_dma.demo", description=__doc__)
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bench", default="default", help="bench configuration to boot")
    args = parser.parse_args(argv)
    if args.in_guest:
        tour()
        return 0
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    bench = get_bench(args.bench)
    print(f"Booting bench {bench.name!r} (QEMU, emulated Intel IOMMU aw-bits={bench.aw_bits}, "
          f"{len(bench.controllers)} emulated NVMe controller(s)); about 30 s under TCG...",
          flush=True)
    try:
        result = vm.run(bench, shlex.join([sys.executable, "-m", "iommu_dma.demo", "--in-guest"]),
                        cwd=ROOT)
    except vm.VmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nDemo finished in {result.seconds:.0f} s (guest exit status {result.returncode}).")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

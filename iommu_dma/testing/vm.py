"""Boot a bench guest (QEMU + emulated Intel IOMMU + emulated NVMe) and run a command in it.

The guest is started with virtme-ng: it runs the host's kernel image with the host's root
filesystem shared read-only, so the guest sees this checkout and its virtualenv.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from iommu_dma.testing.bench import BENCH_ENV, Bench

IMAGES_ENV = "IOMMU_DMA_IMAGES"
KERNEL_ENV = "IOMMU_DMA_KERNEL"
DEFAULT_TIMEOUT = 2400.0


class VmError(RuntimeError):
    """The bench guest could not be started or did not finish."""


@dataclass
class VmResult:
    returncode: int
    output: str
    seconds: float


def find_kernel() -> Path:
    """The kernel image to boot: $IOMMU_DMA_KERNEL, else the newest /boot/vmlinuz-*."""
    if os.environ.get(KERNEL_ENV):
        return Path(os.environ[KERNEL_ENV])
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not images:
        raise VmError("no kernel image in /boot; install one: apt-get install linux-image-amd64")
    kernel = images[-1]
    if not os.access(kernel, os.R_OK):
        raise VmError(f"{kernel} is not readable; run as root or chmod a+r it")
    return kernel


def _version_key(name: str) -> list[int]:
    digits = "".join(c if c.isdigit() else " " for c in name)
    return [int(d) for d in digits.split()]


def kvm_usable() -> bool:
    """KVM only when /dev/kvm is usable and the CPU exposes VT-x/AMD-V (nested guests hang)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def _tool(name: str) -> str:
    """A console script of this environment (virtme-ng's vng, virtme-run) or one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise VmError(f"{name} not found; install the test extras: pip install 'iommu-dma[test]'")
    return found


def guest_script(bench_file: Path, image_dir: Path, command: str, cwd: Path) -> str:
    """The shell text the guest runs: bench environment, then the command."""
    venv_bin = Path(sys.executable).parent
    return "\n".join([
        f"export {BENCH_ENV}={shlex.quote(str(bench_file))}",
        f"export {IMAGES_ENV}={shlex.quote(str(image_dir))}",
        f"export PATH={shlex.quote(str(venv_bin))}:$PATH",
        f"cd {shlex.quote(str(cwd))}",
        command,
    ])


def vng_command(bench: Bench, work_dir: Path, command: str, cwd: Path) -> list[str]:
    bench_file = work_dir / "bench.json"
    bench_file.write_text(bench.to_json())
    script = work_dir / "guest.sh"
    script.write_text(guest_script(bench_file, work_dir, command, cwd) + "\n")
    qemu = " ".join(shlex.quote(a) for a in bench.qemu_args(work_dir))
    cmd = [
        _tool("vng"), "--run", str(find_kernel()),
        "--force-9p", "--disable-microvm",
        "--memory", bench.memory, "--cpus", str(bench.cpus),
        "--append=intel_iommu=on iommu=pt",
        "--rwdir", str(work_dir),
        f"--qemu-opts={qemu}",
        # The command goes through a script file: --exec text passes through more than one
        # shell on its way into the guest, which mangles quotes.
        "--exec", f"sh {shlex.quote(str(script))}",
    ]
    if not kvm_usable():
        cmd.insert(3, "--disable-kvm")
    return cmd


@contextmanager
def work_directory() -> Iterator[Path]:
    """A temporary directory for images and results, shared read-write with the guest."""
    with tempfile.TemporaryDirectory(prefix="iommu-dma-bench-") as d:
        yield Path(d)


def run(
    bench: Bench,
    command: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_line: Callable[[str], None] | None = None,
    work_dir: Path | None = None,
    cwd: Path | None = None,
) -> VmResult:
    """Boot `bench`, run `command` (a shell line) as root in the guest, return its exit status.

    Output lines are passed to on_line as they arrive (default: printed). A guest that has not
    finished after `timeout` seconds is killed and VmError says so, with the last output lines.
    """
    if work_dir is None:
        with work_directory() as d:
            return run(bench, command, timeout=timeout, on_line=on_line, work_dir=d, cwd=cwd)
    emit = on_line or (lambda line: print(line, flush=True))
    cmd = vng_command(bench, work_dir, command, cwd or Path.cwd())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True, env=env)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=30)
    reader = threading.Thread(target=_pump, args=(proc, lines, tail, emit), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        last = "\n".join(tail)
        raise VmError(f"bench guest {bench.name!r} did not finish within {timeout:.0f} s and was "
                      f"killed; command: {command}\nlast output:\n{last}") from None
    reader.join(10)
    return VmResult(proc.returncode, "\n".join(lines), time.monotonic() - start)


def _pump(proc: subprocess.Popen, lines: list[str], tail: deque[str],
          emit: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        tail.append(line)
        emit(line)


def main(argv: list[str] | None = None) -> int:
    """`python -m iommu_dma.testing.vm [--bench NAME] [--timeout S] -- COMMAND...`"""
    import argparse

    from iommu_dma.testing.bench import BENCHES, get_bench

    parser = argparse.ArgumentParser(prog="python -m iommu_dma.testing.vm",
                                     description="Run a command inside a bench guest.")
    parser.add_argument("--bench", default="default", choices=sorted(BENCHES))
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("command", nargs="+", help="command and arguments to run in the guest")
    args = parser.parse_args(argv)
    try:
        result = run(get_bench(args.bench), shlex.join(args.command), timeout=args.timeout)
    except VmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 124
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

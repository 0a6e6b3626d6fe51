"""Boot a bench guest (QEMU + emulated Intel IOMMU + emulated NVMe) and run a command in it.

The guest is started with virtme-ng: it runs the host's kernel image with the host's root
filesystem shared read-only, so the guest sees this checkout and its virtualenv.

QEMU's monitor: every guest has a QMP unix socket in its work directory, which run() prints
first ("[iommu-dma] QMP monitor: ..."); drive it with `python -m iommu_dma.testing.qmp PATH
COMMAND [JSON-ARGS]`, `socat - UNIX-CONNECT:PATH` or iommu_dma.testing.qmp.Qmp.connect(PATH)
while the command runs. A bench with fault injection
also has a QMP monitor inside the guest (the guest script exports IOMMU_DMA_QMP, the name of
its virtio-serial port; Qmp.guest() opens it). See iommu_dma/testing/qmp.py.
"""

from __future__ import annotations

import compileall
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from iommu_dma.errors import IommuDmaError
from iommu_dma.testing.bench import BENCH_ENV, GUEST_QMP_PORT, QMP_ENV, Bench, qmp_socket_path

IMAGES_ENV = "IOMMU_DMA_IMAGES"
KERNEL_ENV = "IOMMU_DMA_KERNEL"
DEFAULT_TIMEOUT = 2400.0


class VmError(IommuDmaError, RuntimeError):
    """The bench guest could not be started or did not finish."""


class HostRequirementsError(VmError):
    """The host lacks what a bench guest needs; `missing` lists every gap at once."""

    def __init__(self, bench: Bench, missing: list[Missing]) -> None:
        self.missing = missing
        apt = sorted({m.package for m in missing if m.install.startswith("apt-get")})
        lines = [f"cannot boot bench {bench.name!r}: the host lacks what a bench guest needs:"]
        lines += [f"  - {m}" for m in missing]
        if len(apt) > 1:
            lines.append(f"all Debian packages at once: apt-get install {' '.join(apt)}")
        super().__init__("\n".join(lines))


@dataclass
class VmResult:
    returncode: int
    output: str
    seconds: float


def kernel_image(env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """(image, "") for the kernel to boot ($IOMMU_DMA_KERNEL in `env`, default os.environ,
    else the newest /boot/vmlinuz-*), or (None, what is wrong)."""
    env = os.environ if env is None else env
    if env.get(KERNEL_ENV):
        kernel = Path(env[KERNEL_ENV])
        if not kernel.is_file():
            return None, f"{KERNEL_ENV}={kernel} is not a file"
    else:
        images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
        if not images:
            return None, "no /boot/vmlinuz-* image"
        kernel = images[-1]
    if not os.access(kernel, os.R_OK):
        return None, f"{kernel} is not readable (run as root or chmod a+r it)"
    return kernel, ""


BENCH_KERNEL_ENV = "IOMMU_DMA_BENCH_KERNEL"
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_bench_kernel.sh"
BENCH_KERNEL_HINT = "build it with `make bench-kernel` (scripts/build_bench_kernel.sh)"


def bench_kernel_image(env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """(image, "") of the bench kernel (iommufd, VFIO cdev, virtio-iommu): $IOMMU_DMA_BENCH_KERNEL
    in `env` (default os.environ), else what `scripts/build_bench_kernel.sh --print-path`
    prints; or (None, what is wrong)."""
    env = os.environ if env is None else env
    if env.get(BENCH_KERNEL_ENV):
        kernel = Path(env[BENCH_KERNEL_ENV])
        return (kernel, "") if kernel.is_file() else (None, f"{BENCH_KERNEL_ENV}={kernel} is "
                                                            "not a file")
    if not BUILD_SCRIPT.is_file():
        return None, f"the bench kernel's build script {BUILD_SCRIPT} is missing (not a checkout)"
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    path = out.stdout.strip()
    if out.returncode != 0 or not path:
        return None, "the bench kernel is not built"
    if not Path(path).is_file():
        return None, f"the bench kernel {path} is missing"
    return Path(path), ""


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


# ---- host requirements, checked before every boot ----------------------------------------

QEMU_BINARY = "qemu-system-x86_64"
# virtme-ng's search order for busybox (virtme.mkinitramfs.find_busybox): the first of these
# names on PATH or in /usr/local/{bin,sbin}, /usr/{bin,sbin}, /{bin,sbin}; it must be static.
BUSYBOX_NAMES = ("busybox-static", "busybox.static", "busybox")
BUSYBOX_DIRS = ("/usr/local/bin", "/usr/local/sbin", "/usr/bin", "/usr/sbin", "/bin", "/sbin")
# QEMU's own memory (TCG translation cache, device models) and vng on top of the guest's RAM
MEMORY_MARGIN = 512 << 20


@dataclass(frozen=True)
class Missing:
    """One unmet host requirement: what, why, the package that provides it, how to install."""

    what: str
    problem: str
    package: str
    install: str

    def __str__(self) -> str:
        source = f"package {self.package}: " if self.package else ""
        return f"{self.what}: {self.problem} ({source}{self.install})"


def _which(name: str) -> str | None:
    return shutil.which(name)


def _find_busybox() -> str | None:
    for name in BUSYBOX_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
        for d in BUSYBOX_DIRS:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP): what `file`
    calls "statically linked" or "static-pie linked", the test virtme-ng applies."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                return False
            is64, little = head[4] == 2, head[5] == 1
            end = "<" if little else ">"
            if is64:
                phoff, = struct.unpack_from(end + "Q", head, 0x20)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
            else:
                phoff, = struct.unpack_from(end + "I", head, 0x1C)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 0x2A)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != pt_interp
               for i in range(phnum))


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vng() -> str | None:
    try:
        return _tool("vng")
    except VmError:
        return None


@dataclass
class HostProbes:
    """How check_host and run look at the machine; tests replace single probes. (Tests must
    not monkeypatch this module's functions or os.environ instead: bench guests start from
    pool threads while host tests run, and would see the patch.)"""

    which: Callable[[str], str | None] = _which
    kernel: Callable[[], tuple[Path | None, str]] = kernel_image
    bench_kernel: Callable[[], tuple[Path | None, str]] = bench_kernel_image
    busybox: Callable[[], str | None] = _find_busybox
    is_static: Callable[[str], bool] = is_static_elf
    vng: Callable[[], str | None] = _vng
    mem_available: Callable[[], int | None] = _mem_available

    @classmethod
    def reading(cls, env: Mapping[str, str]) -> HostProbes:
        """Probes whose PATH and kernel settings come from `env` (a snapshot), not os.environ."""
        return cls(which=lambda name: shutil.which(name, path=env.get("PATH", os.defpath)),
                   kernel=lambda: kernel_image(env), bench_kernel=lambda: bench_kernel_image(env))


def find_kernel(bench: Bench | None = None, probes: HostProbes | None = None) -> Path:
    """The kernel image to boot: for a bench on the bench kernel, the one `make bench-kernel`
    built; else $IOMMU_DMA_KERNEL, else the newest /boot/vmlinuz-*."""
    p = probes or HostProbes()
    if bench is not None and bench.kernel == "bench":
        kernel, problem = p.bench_kernel()
        if kernel is None:
            raise VmError(f"bench {bench.name!r} boots the bench kernel: {problem}; "
                          f"{BENCH_KERNEL_HINT}")
        return kernel
    kernel, problem = p.kernel()
    if kernel is None:
        raise VmError(f"{problem}; install one: apt-get install linux-image-amd64")
    return kernel


def host_problems(bench: Bench, probes: HostProbes | None = None) -> list[Missing]:
    """Everything the host lacks to boot `bench` (empty when it can)."""
    p = probes or HostProbes()
    missing: list[Missing] = []
    if p.which(QEMU_BINARY) is None:
        missing.append(Missing(f"QEMU ({QEMU_BINARY})", "not found on PATH",
                               "qemu-system-x86", "apt-get install qemu-system-x86"))
    if bench.kernel == "bench":
        kernel, why = p.bench_kernel()
        if kernel is None:
            missing.append(Missing("bench kernel (iommufd, VFIO cdev, virtio-iommu)", why, "",
                                   BENCH_KERNEL_HINT))
    else:
        kernel, why = p.kernel()
        if kernel is None:
            missing.append(Missing("kernel image", why, "linux-image-amd64",
                                   "apt-get install linux-image-amd64, run as root to read "
                                   f"/boot/vmlinuz-*, or set {KERNEL_ENV} to a readable image"))
    busybox = p.busybox()
    if busybox is None:
        missing.append(Missing("statically linked busybox (virtme-ng builds the guest's "
                               "initramfs from it)", "no busybox found", "busybox-static",
                               "apt-get install busybox-static"))
    elif not p.is_static(busybox):
        missing.append(Missing("statically linked busybox (virtme-ng builds the guest's "
                               "initramfs from it)",
                               f"{busybox} is dynamically linked (the plain busybox package "
                               "is not enough)", "busybox-static",
                               "apt-get install busybox-static"))
    if p.which("file") is None:
        missing.append(Missing("file(1) (virtme-ng uses it to check busybox)",
                               "not found on PATH", "file", "apt-get install file"))
    if p.vng() is None:
        missing.append(Missing("virtme-ng (vng)", "not found in this environment or on PATH",
                               "", "pip install 'iommu-dma[test]'"))
    available = p.mem_available()
    need = bench.memory_bytes + MEMORY_MARGIN
    if available is not None and available < need:
        missing.append(Missing(
            "free memory", f"MemAvailable is {available >> 20} MiB; bench {bench.name!r} needs "
            f"{bench.memory_bytes >> 20} MiB of guest memory + {MEMORY_MARGIN >> 20} MiB for "
            "QEMU", "", "stop other guests or memory-hungry processes and retry"))
    return missing


def check_host(bench: Bench, probes: HostProbes | None = None) -> None:
    """Raise HostRequirementsError naming every missing requirement before anything boots."""
    missing = host_problems(bench, probes)
    if missing:
        raise HostRequirementsError(bench, missing)


def guest_script(bench_file: Path, image_dir: Path, command: str, cwd: Path,
                 qmp_port: str | None = None) -> str:
    """The shell text the guest runs: bench environment, then the command."""
    venv_bin = Path(sys.executable).parent
    return "\n".join([
        f"export {BENCH_ENV}={shlex.quote(str(bench_file))}",
        f"export {IMAGES_ENV}={shlex.quote(str(image_dir))}",
        *([f"export {QMP_ENV}={shlex.quote(qmp_port)}"] if qmp_port else []),
        f"export PATH={shlex.quote(str(venv_bin))}:$PATH",
        f"cd {shlex.quote(str(cwd))}",
        command,
    ])


def vng_command(bench: Bench, work_dir: Path, command: str, cwd: Path,
                kernel: Path) -> list[str]:
    bench_file = work_dir / "bench.json"
    bench_file.write_text(bench.to_json())
    script = work_dir / "guest.sh"
    port = GUEST_QMP_PORT if bench.fault_injection else None
    script.write_text(guest_script(bench_file, work_dir, command, cwd, port) + "\n")
    qemu = " ".join(shlex.quote(a) for a in bench.qemu_args(work_dir))
    cmd = [
        _tool("vng"), "--run", str(kernel),
        # the bench kernel has everything built in: no modules to look for or share
        *(["--skip-modules"] if bench.kernel == "bench" else []),
        "--force-9p", "--disable-microvm",
        "--memory", bench.memory, "--cpus", str(bench.cpus),
        f"--append={bench.kernel_command_line}",
        "--rwdir", str(work_dir),
        f"--qemu-opts={qemu}",
        # The command goes through a script file: --exec text passes through more than one
        # shell on its way into the guest, which mangles quotes.
        "--exec", f"sh {shlex.quote(str(script))}",
    ]
    if not kvm_usable():
        cmd.insert(3, "--disable-kvm")
    return cmd


def precompile(cwd: Path) -> None:
    """Write the bytecode of this package and of cwd's tests and benchmarks before a boot.

    The guest sees the host's filesystem read-only, so a module without a current .pyc is
    compiled again by every Python process in the guest: under TCG that was ~12 s per
    `iommu-dma` command. Up-to-date files are skipped; a tree we cannot write is left as is.
    """
    roots = [Path(__file__).resolve().parent.parent, cwd / "tests", cwd / "benchmarks"]
    for root in roots:
        if root.is_dir() and os.access(root, os.W_OK):
            compileall.compile_dir(root, quiet=2, workers=1)


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
    env: Mapping[str, str] | None = None,
) -> VmResult:
    """Boot `bench`, run `command` (a shell line) as root in the guest, return its exit status.

    Output lines are passed to on_line as they arrive (default: printed). A guest that has not
    finished after `timeout` seconds is killed and VmError says so, with the last output lines.
    `env` (default os.environ) is the environment the kernel is chosen from and vng runs in;
    callers in threads pass a snapshot.
    """
    if work_dir is None:
        with work_directory() as d:
            return run(bench, command, timeout=timeout, on_line=on_line, work_dir=d, cwd=cwd,
                       env=env)
    env = dict(os.environ if env is None else env)
    probes = HostProbes.reading(env)
    check_host(bench, probes)
    precompile(cwd or Path.cwd())
    cmd = vng_command(bench, work_dir, command, cwd or Path.cwd(), find_kernel(bench, probes))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return run_guest(cmd, bench.name, command, work_dir=work_dir, timeout=timeout,
                     on_line=on_line, env=env)


def run_guest(cmd: list[str], name: str, command: str, *, work_dir: Path, timeout: float,
              on_line: Callable[[str], None] | None, env: Mapping[str, str]) -> VmResult:
    """Start the guest's vng command line `cmd` (bench `name`, running `command`), pass its
    output on, and wait for it at most `timeout` seconds."""
    emit = on_line or (lambda line: print(line, flush=True))
    sock = qmp_socket_path(work_dir)
    emit(f"[iommu-dma] QMP monitor: {sock} (while the guest runs: "
         f"python -m iommu_dma.testing.qmp {sock} query-status)")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True, env=dict(env))
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
        raise VmError(f"bench guest {name!r} did not finish within {timeout:.0f} s and was "
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

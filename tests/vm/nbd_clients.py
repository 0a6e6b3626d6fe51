"""Running `iommu-dma serve` (or its nbdkit Server in the test process) and real NBD clients
(qemu-img, qemu-io, nbdinfo, nbd-client, libnbd's Python binding) inside a bench guest, for
the NBD VM tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from iommu_dma.cli.serve import probe
from iommu_dma.nbd.server import ServeOptions, Server

# python3-libnbd is Debian's: its module imports in Debian's interpreter only (nbdsh runs
# whichever `python3` comes first on PATH, which need not be that one)
DEBIAN_PYTHON = "/usr/bin/python3"
START_TIMEOUT = 180.0

# A libnbd client that writes block i (bytes of value i % 251 + 1, tagged with i) for i in
# 0..count-1, one after another, and prints i once the server acknowledged it.
WRITER = """
import sys, nbd
uri, block, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
for i in range(count):
    h.pwrite(i.to_bytes(8, "little") + bytes([i % 251 + 1]) * (block - 8), i * block)
    print(i, flush=True)
"""


def block_pattern(i: int, block: int) -> bytes:
    return i.to_bytes(8, "little") + bytes([i % 251 + 1]) * (block - 8)


@dataclass
class Serving:
    proc: subprocess.Popen[str]
    uri: str = ""
    log: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.log)

    def nbdkit_pid(self) -> int:
        """The nbdkit process `iommu-dma serve` started."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        for pid in children.split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "nbdkit":
                return int(pid)
        raise AssertionError(f"no nbdkit child of {self.proc.pid}: {children!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def _pump(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line.rstrip("\n"))


@contextmanager
def serving(bdf: str, nsid: int, socket: Path, *args: str) -> Iterator[Serving]:
    """`iommu-dma serve BDF -n NSID --socket SOCKET ARGS`, until it printed its URI; stopped
    with SIGTERM afterwards (unless the test stopped it)."""
    if socket.exists():
        socket.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "iommu_dma.cli.main", "serve", bdf, "-n",
                             str(nsid), "--socket", str(socket), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s = Serving(proc)
    out: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, s.log), daemon=True)]
    for t in pumps:
        t.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not out:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start (status {proc.poll()}):\n"
                                     f"{s.text()}")
            time.sleep(0.1)
        s.uri = out[0]
        yield s
    finally:
        if proc.poll() is None:
            s.stop()
        for t in pumps:
            t.join(10)


@dataclass
class ServingHere:
    """nbdkit started by this process (iommu_dma.nbd.server.Server), as `iommu-dma serve`
    starts it, without the ~15 s a second Python process costs under TCG."""

    server: Server
    uri: str
    log: list[str]

    def text(self) -> str:
        return "\n".join(self.log)

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self.server.proc is not None
        return self.server.proc

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM nbdkit and wait for it: its exit status."""
        return self.server.stop(timeout)


@contextmanager
def serving_here(bdf: str, nsid: int, socket: Path, *, threads: int | None = None,
                 readonly: bool = False) -> Iterator[ServingHere]:
    """What `iommu-dma serve BDF -n NSID --socket SOCKET [--threads N] [--readonly]` runs,
    from this process; stopped afterwards (unless the test stopped it)."""
    if socket.exists():
        socket.unlink()
    opts = ServeOptions(bdf=bdf, nsid=nsid, socket=str(socket), readonly=readonly,
                        threads=threads)
    log: list[str] = []
    server = Server(opts, lba_size=probe(bdf, nsid, readonly), sink=log.append)
    server.start(START_TIMEOUT)
    try:
        yield ServingHere(server, opts.uri, log)
    finally:
        server.stop()


def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def nbdinfo(uri: str) -> dict[str, object]:
    export = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert isinstance(export, dict)
    return export


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    return run(*argv, check=check)


def libnbd(script: str, *args: str) -> subprocess.Popen[str]:
    """A Python script using libnbd, in Debian's interpreter; stdout piped."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.Popen([DEBIAN_PYTHON, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


class Writer:
    """The WRITER client, writing block after block; `acked` counts the acknowledged ones."""

    def __init__(self, uri: str, block: int, count: int) -> None:
        self.proc = libnbd(WRITER, uri, str(block), str(count))
        self.acked = 0

    def wait_for(self, n: int) -> None:
        """Until n writes were acknowledged (the client keeps writing)."""
        assert self.proc.stdout is not None
        while self.acked < n:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"the writer ended after {self.acked} writes:\n{err}")
            self.acked = int(line) + 1

    def kill(self) -> None:
        self.proc.kill()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Let the client end (killed, or its server gone): all it acknowledged, its stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        lines = out.split()
        if lines:
            self.acked = int(lines[-1]) + 1
        return self.acked, err

"""Running nbdkit with our plugin: its command line, waiting until it listens, its log in one
line per error, and stopping it (SIGTERM: nbdkit ends the connections, then the plugin flushes
and shuts the controller down).

nbdkit's python plugin embeds its own Python (Debian 12: 3.11); the plugin imports this package
from the directories of the running interpreter's sys.path, so the two must be the same
major.minor version (checked before starting).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import iommu_dma
from iommu_dma.errors import IommuDmaError

PLUGIN = Path(__file__).with_name("plugin.py")
DEFAULT_PORT = 10809                    # NBD's IANA port, nbdkit's default
INSTALL_HINT = "apt-get install nbdkit nbdkit-plugin-python"
# nbdkit_error() of the python plugin: "nbdkit: python.3: error: PATH: pread: error: Traceback
# (most recent call last):", then the frames (indented), then " Module.Error: text"
_TRACEBACK = re.compile(r"^nbdkit: [\w.]+: error: .*?: (?P<op>\w+): error: Traceback")
_EXCEPTION = re.compile(r"^ (?:[\w.]+\.)?(?P<cls>\w+): (?P<text>.*)$")


class ServeError(IommuDmaError):
    """nbdkit is missing, cannot load the plugin, or stopped before it listened."""


@dataclass(frozen=True)
class ServeOptions:
    bdf: str
    nsid: int = 1
    socket: str | None = None           # a Unix socket path; else TCP
    port: int | None = None             # TCP port (default 10809)
    address: str | None = None          # TCP address to listen on (default: all)
    readonly: bool = False
    threads: int | None = None          # nbdkit worker threads per connection (default 16)
    wait: str = "interrupt"             # how each thread's queue pair waits
    extra: tuple[str, ...] = field(default=())   # more nbdkit options, e.g. --tls=require

    @property
    def uri(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///?socket={os.path.abspath(self.socket)}"
        host = self.address or "localhost"
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{self.port or DEFAULT_PORT}/"


def plugin_python() -> str:
    """The Python version nbdkit's python plugin embeds ("3.11.1"); ServeError when nbdkit or
    the plugin is not installed."""
    if shutil.which("nbdkit") is None:
        raise ServeError(f"nbdkit is not installed; install it: {INSTALL_HINT}")
    try:
        out = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ServeError("`nbdkit python --dump-plugin` did not answer within 60 s (an "
                         "LD_PRELOAD in the environment?)") from None
    m = re.search(r"^python_version=(\S+)$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise ServeError(f"nbdkit has no python plugin; install it: {INSTALL_HINT}")
    return m.group(1)


def check_python(embedded: str) -> None:
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ".".join(embedded.split(".")[:2]) != ours:
        raise ServeError(f"nbdkit's python plugin runs Python {embedded}, but iommu-dma is "
                         f"installed for Python {ours}: install iommu-dma into a Python "
                         f"{'.'.join(embedded.split('.')[:2])} environment to serve")


def python_path() -> str:
    """PYTHONPATH for the plugin: this package's parent, then our interpreter's sys.path."""
    dirs = [str(Path(iommu_dma.__file__).resolve().parent.parent)]
    dirs += [p for p in sys.path if p and os.path.isdir(p) and p not in dirs]
    return os.pathsep.join(dirs)


def nbdkit_argv(opts: ServeOptions, pidfile: str, lba_size: int | None = None,
                verbose: bool = False) -> list[str]:
    """nbdkit in the foreground, ending with us (--exit-with-parent), writing pidfile once it
    listens; nbdkit's blocksize filter turns requests smaller than a block into
    read-modify-write (minblock = the LBA size; 512 when unknown, the smallest there is)."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-P", pidfile,
            "--filter=blocksize"]
    if opts.socket is not None:
        argv += ["-U", os.path.abspath(opts.socket)]
    else:
        argv += ["-p", str(opts.port or DEFAULT_PORT)]
        if opts.address:
            argv += ["-i", opts.address]
    if opts.readonly:
        argv.append("-r")
    if opts.threads:
        argv += ["-t", str(opts.threads)]
    if verbose:
        argv.append("-v")
    argv += list(opts.extra)
    argv += ["python", str(PLUGIN), f"bdf={opts.bdf}", f"nsid={opts.nsid}", f"wait={opts.wait}",
             f"minblock={lba_size or 512}"]
    if opts.readonly:
        argv.append("readonly=1")
    return argv


class LogRelay:
    """Copies nbdkit's stderr to ours; a Python traceback of the plugin becomes one line,
    `iommu-dma serve: OP: text` (the raw traceback with verbose)."""

    def __init__(self, source: IO[str], sink: Callable[[str], None], verbose: bool) -> None:
        self.source, self.sink, self.verbose = source, sink, verbose
        self.last_error = ""
        self.thread = threading.Thread(target=self._run, name="nbdkit-log", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in self.source:
            out = self.line(line.rstrip("\n"))
            if out is not None:
                if "error" in out:
                    self.last_error = out
                self.sink(out)

    _op: str | None = None
    _collapsed = False

    def line(self, line: str) -> str | None:
        """What to print for one line of nbdkit's stderr (None: nothing)."""
        if self.verbose:
            return line
        m = _TRACEBACK.match(line)
        if m:
            self._op = m["op"]
            return None
        if self._op is not None:
            e = _EXCEPTION.match(line)
            if e is None:
                return None                         # a frame of the traceback
            text = e["text"] if e["cls"] == "RequestError" else f"{self._op}: {e['text']}"
            self._op, self._collapsed = None, True
            return f"iommu-dma serve: {text}"
        if self._collapsed and not line.strip():
            return None                             # the empty line ending the traceback
        self._collapsed = False
        return line


def terminate(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM proc and wait up to timeout seconds; SIGKILL it after that. True when it ended
    within the timeout (or had already ended), False when it had to be killed."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


class Server:
    """nbdkit serving a namespace; start() returns once it listens."""

    def __init__(self, opts: ServeOptions, *, lba_size: int | None = None, verbose: bool = False,
                 sink: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.verbose = verbose
        self.lba_size = lba_size
        self.sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))
        self.proc: subprocess.Popen[str] | None = None
        self.relay: LogRelay | None = None
        self._dir = tempfile.mkdtemp(prefix="iommu-dma-serve-")

    @property
    def pidfile(self) -> Path:
        return Path(self._dir) / "nbdkit.pid"

    def start(self, timeout: float = 120.0) -> None:
        check_python(plugin_python())
        env = dict(os.environ, PYTHONPATH=python_path(), PYTHONUNBUFFERED="1")
        argv = nbdkit_argv(self.opts, str(self.pidfile), self.lba_size, self.verbose)
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.relay = LogRelay(self.proc.stderr, self.sink, self.verbose)
        deadline = time.monotonic() + timeout
        while not self._listening():
            rc = self.proc.poll()
            if rc is not None:
                self.relay.thread.join(5)
                raise ServeError(f"nbdkit exited with status {rc} before serving "
                                 f"{self.opts.bdf} namespace {self.opts.nsid}"
                                 + (f" ({self.relay.last_error})" if self.relay.last_error
                                    else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"nbdkit did not start listening within {timeout:.0f} s")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            return self.pidfile.read_text().strip().isdigit()
        except FileNotFoundError:
            return False

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, then wait for nbdkit to end its connections and shut the controller down
        (SIGKILL after timeout: the kernel's vfio-pci then resets the device)."""
        if self.proc is None:
            return None
        terminate(self.proc, timeout)
        if self.relay is not None:
            self.relay.thread.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A small synchronous QMP client for the bench's QEMU monitors, and fault-injection helpers.

Where the monitors are (see bench.monitor_args):

- On the host: every bench guest has a QMP unix socket `qmp.sock` in its work directory
  (`bench.qmp_socket_path(work_dir)`); `iommu-dma vm` prints its path when it boots, so a
  person can drive it while the command runs:
  `python -m iommu_dma.testing.qmp SOCKET query-status`,
  `python -m iommu_dma.testing.qmp SOCKET block_set_io_throttle '{"id": "c0n2dev", ...}'`,
  `python -m iommu_dma.testing.qmp SOCKET --hmp 'info qtree'`, or interactively
  `socat - UNIX-CONNECT:SOCKET` (type `{"execute": "qmp_capabilities"}` first).
  From Python: `Qmp.connect(path)`.
- Inside the guest of a bench with fault injection (`Bench.fault_injection`): a second QMP
  monitor of the same QEMU on the virtio-serial port `org.iommu-dma.qmp`. The guest script
  exports IOMMU_DMA_QMP=<port name>; the port is /dev/virtio-ports/<name> when udev made the
  link, else /dev/vportNpM whose /sys/class/virtio-ports/vportNpM/name is the name (virtme-ng's
  guests have no udev; the kernel's virtio_console driver is what vng's own ports use).
  `Qmp.guest()` finds and opens it. Only one process can have the port open at a time: use
  `with Qmp.guest() as qmp: ...`.

  The in-guest monitor session outlives an open: QEMU greets only once, when the guest first
  opens the port, and stays in command mode afterwards. The client therefore does not wait for
  the greeting: it sends qmp_capabilities (an "already negotiated" error is fine), tags every
  command with a unique id and skips anything that is not the answer to it (a greeting, a
  previous session's answers, partial lines). Events QEMU emitted while nobody had the port
  open are delivered on the next open: `events()` drains them.

Fault injection on a bench namespace (controller index ci, nsid), all on the namespace's QEMU
block nodes (see bench.NamespaceConfig: read_errors/write_errors are static, in the bench):

- `stall(ci, nsid)`: a blkdebug breakpoint (HMP `qemu-io ... "break read_aio TAG"`); the next
  request raising the event is suspended (only that one; blkdebug then drops the breakpoint).
  `resume(ci, nsid)` lets it go (and removes a breakpoint nothing hit yet). WARNING: while a
  request is suspended, anything that drains the block node (the nvme controller reset path,
  device_del, unthrottle...) hangs QEMU's vCPU until the request is resumed, and the guest
  can no longer reach its monitor. Always resume in a `finally`; for recovery tests (reset,
  timeouts) use throttle instead. qemu-io reports its own failures ("Could not resume request")
  on QEMU's stdout (the bench console output), not to the monitor: resume() is safe to call
  when nothing is stalled, and gives no feedback.
- `throttle(ci, nsid, bps_total)`: QMP block_set_io_throttle on the nvme-ns device. With
  bps_total=1 the first request passes and the following ones wait (essentially forever); a
  drain (controller reset) or `unthrottle(ci, nsid)` releases them.
- `device_del(ci)`: hot-unplug a controller (needs ControllerConfig.hotplug) and, by default,
  wait for its DEVICE_DELETED event. A booted guest's pciehp waits 5 s after QEMU's
  attention-button press, then the driver must let go (a vfio-pci user must close the
  device); seen on the bench: DEVICE_DELETED 0.1 s after device_del while the guest was still
  booting (slot not yet powered by the guest).
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path
from typing import Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.testing.bench import (
    GUEST_QMP_PORT,
    QMP_ENV,
    Bench,
    controller_id,
    current_bench,
    ns_device_id,
)

VIRTIO_PORTS = Path("/sys/class/virtio-ports")
DEFAULT_TIMEOUT = 30.0
_THROTTLE_LIMITS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
# blkdebug events a raw -> blkdebug -> file namespace raises (what stall() can break on)
STALL_EVENTS = ("read_aio", "write_aio", "flush_to_os", "flush_to_disk")


class QmpError(IommuDmaError):
    """QEMU answered a command with an error: `command`, QEMU's `error_class` and `desc`."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command}: {error_class}: {desc}")


class QmpConnectionError(IommuDmaError):
    """The monitor could not be reached, closed the connection, or did not answer in time."""


def find_guest_port(name: str = GUEST_QMP_PORT, ports: Path = VIRTIO_PORTS,
                    dev: Path = Path("/dev")) -> Path:
    """The character device of the virtio-serial port called name, inside a guest."""
    link = dev / "virtio-ports" / name
    if link.exists():
        return link
    seen = []
    for port in sorted(ports.glob("vport*")) if ports.is_dir() else []:
        try:
            port_name = (port / "name").read_text().strip()
        except OSError:
            continue
        seen.append(port_name)
        if port_name == name:
            return dev / port.name
    raise QmpConnectionError(
        f"no virtio-serial port named {name!r} in this guest (ports: {seen or 'none'}); "
        "does the bench have fault injection (Bench.fault_injection), and is the virtio_console "
        "driver loaded?")


class Qmp:
    """A synchronous QMP session over a file descriptor (unix socket or virtio-serial port).

    Construct with Qmp.connect(path) (host socket), Qmp.guest() (inside a bench guest) or
    Qmp(fd) for an already open descriptor (the Qmp owns it and closes it)."""

    def __init__(self, fd: int, *, name: str = "QMP", bench: Bench | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.fd = fd
        self.name = name
        self.bench = bench
        self.timeout = timeout
        self._buf = b""
        self._pending: list[dict[str, Any]] = []    # events read while waiting for answers
        self._next_id = 0
        self._tag = f"idma-{os.getpid()}-{id(self):x}"
        self.greeting: dict[str, Any] | None = None
        try:
            self._negotiate()
        except BaseException:
            self.close()
            raise

    # ---- opening and closing ---------------------------------------------------------------

    @classmethod
    def connect(cls, path: str | Path, *, bench: Bench | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Qmp:
        """Connect to a QMP unix socket (on the host: bench.qmp_socket_path(work_dir))."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise QmpConnectionError(f"cannot connect to the QMP socket {path}: {e}") from None
        return cls(sock.detach(), name=str(path), bench=bench, timeout=timeout)

    @classmethod
    def guest(cls, *, timeout: float = DEFAULT_TIMEOUT) -> Qmp:
        """Inside a bench guest: the monitor of the guest's own QEMU (bench with faults)."""
        bench = current_bench()
        if bench is None:
            raise QmpConnectionError("Qmp.guest() works only inside a bench guest")
        name = os.environ.get(QMP_ENV)
        if not name:
            raise QmpConnectionError(
                f"bench {bench.name!r} has no in-guest monitor ({QMP_ENV} is not set): only "
                "benches with fault injection (error LBAs, stallable namespaces or hotplug "
                "controllers) get one")
        path = find_guest_port(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise QmpConnectionError(f"cannot open the monitor port {path}: {e} (only one "
                                     "process may have it open; close other Qmp objects)"
                                     ) from None
        return cls(fd, name=str(path), bench=bench, timeout=timeout)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- protocol ----------------------------------------------------------------------------

    def _negotiate(self) -> None:
        try:
            self.command("qmp_capabilities")
        except QmpError as e:
            # a session that an earlier open already negotiated (in-guest port)
            if e.error_class != "CommandNotFound":
                raise

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        deadline = time.monotonic() + self.timeout
        while data:
            self._poll(select.POLLOUT, deadline, "to accept a command")
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                continue
            except OSError as e:
                raise QmpConnectionError(f"{self.name}: write failed: {e}") from None
            data = data[n:]

    def _poll(self, events: int, deadline: float, what: str) -> None:
        if self.fd < 0:
            raise QmpConnectionError(f"{self.name}: the session is closed")
        poller = select.poll()
        poller.register(self.fd, events)
        left = max(0.0, deadline - time.monotonic())
        if not poller.poll(left * 1000):
            raise QmpConnectionError(f"{self.name}: timed out waiting for QEMU {what}")

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        """The next complete JSON object from the monitor (lines that do not parse as one, such
        as the tail of a message a previous session left half read, are skipped)."""
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
            self._poll(select.POLLIN, deadline, what)
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError as e:
                raise QmpConnectionError(f"{self.name}: read failed: {e}") from None
            if not chunk:
                # a virtio-serial port reads EOF while the host side is not connected
                if not self._is_socket():
                    time.sleep(0.05)
                    continue
                raise QmpConnectionError(f"{self.name}: QEMU closed the monitor connection")
            self._buf += chunk

    def _is_socket(self) -> bool:
        import stat

        return stat.S_ISSOCK(os.fstat(self.fd).st_mode)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "QMP" in msg:
            self.greeting = msg
        elif "event" in msg:
            self._pending.append(msg)
        # anything else: the answer to someone else's (an earlier session's) command

    def command(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Run a QMP command; its "return" value (usually a dict). Arguments whose names have
        hyphens go in as **{"command-line": ...}. Raises QmpError with QEMU's class and desc."""
        self._next_id += 1
        cmd_id = f"{self._tag}-{self._next_id}"
        message: dict[str, Any] = {"execute": name, "id": cmd_id}
        if args:
            message["arguments"] = args
        self._send(message)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._read_message(deadline, f"to answer {name}")
            if msg.get("id") != cmd_id:
                self._dispatch(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(name, str(err.get("class", "?")), str(err.get("desc", err)))
            return msg.get("return")

    def hmp(self, text: str, timeout: float | None = None) -> str:
        """A human monitor command (HMP) through QMP human-monitor-command: its output."""
        out = self.command("human-monitor-command", timeout, **{"command-line": text})
        return str(out or "")

    def events(self) -> list[dict[str, Any]]:
        """Every event received so far that no one consumed, oldest first (reads what is
        already waiting, without blocking); they are removed from the session."""
        deadline = time.monotonic()
        while True:
            try:
                msg = self._read_message(deadline, "")
            except QmpConnectionError:
                break
            self._dispatch(msg)
        out, self._pending = self._pending, []
        return out

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT,
                   **data: Any) -> dict[str, Any]:
        """Wait for event `name` whose "data" has the given fields (e.g. device="nvme1");
        events already received count. Returns the event; other events stay pending."""
        def matches(ev: dict[str, Any]) -> bool:
            got = ev.get("data") or {}
            return ev.get("event") == name and all(got.get(k) == v for k, v in data.items())

        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._pending):
                if matches(ev):
                    del self._pending[i]
                    return ev
            try:
                msg = self._read_message(deadline, f"to emit the event {name}")
            except QmpConnectionError as e:
                raise QmpConnectionError(f"{e} (data {data})" if data else str(e)) from None
            self._dispatch(msg)

    # ---- bench-level fault injection -----------------------------------------------------

    def _check_ns(self, ci: int, nsid: int, stallable: bool = False) -> None:
        if self.bench is None:
            return
        if not 0 <= ci < len(self.bench.controllers):
            raise ValueError(f"bench {self.bench.name!r} has no controller {ci}")
        namespaces = self.bench.controllers[ci].namespaces
        if not 1 <= nsid <= len(namespaces):
            raise ValueError(f"bench {self.bench.name!r}: controller {ci} has no nsid {nsid}")
        if stallable and not namespaces[nsid - 1].fault_injection:
            raise ValueError(f"bench {self.bench.name!r}: controller {ci} nsid {nsid} is not "
                             "over blkdebug (set stallable=True in its NamespaceConfig)")

    @staticmethod
    def _stall_tag(ci: int, nsid: int) -> str:
        return f"idma_stall_c{ci}n{nsid}"

    def _qemu_io(self, ci: int, nsid: int, command: str) -> None:
        """HMP qemu-io on the namespace's nvme-ns device. The monitor reports only a missing
        device; qemu-io's own messages ("Could not resume request: ...") go to QEMU's stdout
        (the bench console output), so a qemu-io command that does nothing is not an error."""
        out = self.hmp(f'qemu-io -d {ns_device_id(ci, nsid)} "{command}"').strip()
        if out:
            raise QmpError(f"qemu-io {command.split()[0]}", "HMP",
                           f"controller {ci} nsid {nsid}: {out}")

    def stall(self, ci: int, nsid: int, event: str = "read_aio") -> None:
        """Suspend the next request of controller ci's namespace nsid that raises the blkdebug
        event (read_aio, write_aio, ...) until resume(). See the module docstring's warning."""
        if event not in STALL_EVENTS:
            raise ValueError(f"stall: event {event!r} is not one of {', '.join(STALL_EVENTS)}")
        self._check_ns(ci, nsid, stallable=True)
        self._qemu_io(ci, nsid, f"break {event} {self._stall_tag(ci, nsid)}")

    def resume(self, ci: int, nsid: int) -> None:
        """Resume the request stall() suspended, and drop the breakpoint if nothing hit it
        (safe to call when nothing is stalled)."""
        self._check_ns(ci, nsid, stallable=True)
        tag = self._stall_tag(ci, nsid)
        self._qemu_io(ci, nsid, f"resume {tag}")
        self._qemu_io(ci, nsid, f"remove_break {tag}")

    def throttle(self, ci: int, nsid: int, bps_total: int) -> None:
        """Limit the namespace to bps_total bytes/s (block_set_io_throttle on its nvme-ns)."""
        self._check_ns(ci, nsid)
        if bps_total <= 0:
            raise ValueError(f"bps_total must be positive, not {bps_total}; use unthrottle()")
        limits = dict.fromkeys(_THROTTLE_LIMITS, 0)
        limits["bps"] = bps_total
        self.command("block_set_io_throttle", id=ns_device_id(ci, nsid), **limits)

    def unthrottle(self, ci: int, nsid: int) -> None:
        """Remove the limit; throttled requests run now."""
        self._check_ns(ci, nsid)
        self.command("block_set_io_throttle", id=ns_device_id(ci, nsid),
                     **dict.fromkeys(_THROTTLE_LIMITS, 0))

    def clear_faults(self) -> list[str]:
        """Resume every stallable namespace and unthrottle every namespace of the bench (a
        test's safety net; resume first, as unthrottling drains). Returns what failed (a
        removed controller's namespaces, say), one line each."""
        if self.bench is None:
            raise ValueError("clear_faults needs the bench (Qmp.guest() or bench=...)")
        failed = []
        for stalls in (True, False):
            for ci, ctrl in enumerate(self.bench.controllers):
                for nsid, ns in enumerate(ctrl.namespaces, start=1):
                    if stalls and not ns.fault_injection:
                        continue
                    try:
                        (self.resume if stalls else self.unthrottle)(ci, nsid)
                    except QmpError as e:
                        failed.append(str(e))
        return failed

    def device_del(self, ci: int, *, wait: bool = True, timeout: float = 120.0
                   ) -> dict[str, Any] | None:
        """Hot-unplug controller ci (its ControllerConfig needs hotplug=True); with wait, block
        until QEMU's DEVICE_DELETED event for it and return that event. The guest must let go
        of the device (a vfio-pci user must close it) before QEMU can delete it."""
        if self.bench is not None:
            if not 0 <= ci < len(self.bench.controllers):
                raise ValueError(f"bench {self.bench.name!r} has no controller {ci}")
            if not self.bench.controllers[ci].hotplug:
                raise ValueError(f"bench {self.bench.name!r}: controller {ci} is on pcie.0 and "
                                 "cannot be hot-unplugged (ControllerConfig.hotplug=False)")
        self.command("device_del", id=controller_id(ci))
        if not wait:
            return None
        return self.wait_event("DEVICE_DELETED", timeout, device=controller_id(ci))


def main(argv: list[str] | None = None) -> int:
    """`python -m iommu_dma.testing.qmp SOCKET COMMAND [JSON-ARGS]` or `... SOCKET --hmp TEXT`"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m iommu_dma.testing.qmp",
                                     description="Run one QMP (or HMP) command on a bench "
                                                 "guest's monitor socket; print the answer.")
    parser.add_argument("socket", help="the QMP socket `iommu-dma vm` printed")
    parser.add_argument("--hmp", action="store_true", help="COMMAND is a human monitor command")
    parser.add_argument("command", help="QMP command name (or HMP text with --hmp)")
    parser.add_argument("arguments", nargs="?", default="{}", help="QMP arguments as JSON")
    args = parser.parse_args(argv)
    try:
        with Qmp.connect(args.socket) as qmp:
            if args.hmp:
                print(qmp.hmp(args.command), end="")
            else:
                print(json.dumps(qmp.command(args.command, **json.loads(args.arguments)),
                                 indent=2))
    except (QmpError, QmpConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

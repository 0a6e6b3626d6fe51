"""The QMP client's protocol handling, against a tiny fake QEMU monitor (no QEMU needed)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iommu_dma.testing.bench import BENCHES
from iommu_dma.testing.qmp import Qmp, QmpConnectionError, QmpError, find_guest_port

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}},
                    "capabilities": ["oob"]}}
Handler = Callable[[dict[str, Any]], list[Any]]


class FakeQemu:
    """Answers each request line with what handler returns (dicts are sent as JSON lines, bytes
    as they are). Records every request."""

    def __init__(self, sock: socket.socket, handler: Handler, greeting: bool = True,
                 before: bytes = b"") -> None:
        self.sock = sock
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        if before:
            sock.sendall(before)
        if greeting:
            self._send(GREETING)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, msg: Any) -> None:
        self.sock.sendall(msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\r\n")

    def _serve(self) -> None:
        buf = b""
        with self.sock:
            while True:
                try:
                    chunk = self.sock.recv(4096)
                except OSError:             # the test closed the socket
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    self.requests.append(req)
                    for msg in self.handler(req):
                        if msg == "close":
                            return
                        self._send(msg)

    def commands(self) -> list[str]:
        return [r["execute"] for r in self.requests]


def ok(req: dict[str, Any], value: Any = None) -> dict[str, Any]:
    return {"return": {} if value is None else value, "id": req["id"]}


def default_handler(req: dict[str, Any]) -> list[Any]:
    return [ok(req)]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def session(pair: tuple[socket.socket, socket.socket], handler: Handler = default_handler,
            **kw: Any) -> tuple[Qmp, FakeQemu]:
    client, server = pair
    fake = FakeQemu(server, handler, **kw)
    return Qmp(client.detach(), timeout=5), fake


def test_negotiates_and_runs_a_command(pair) -> None:
    def handler(req):
        if req["execute"] == "query-status":
            return [ok(req, {"status": "running"})]
        return [ok(req)]

    q, fake = session(pair, handler)
    assert q.greeting == GREETING
    assert q.command("query-status") == {"status": "running"}
    assert fake.commands() == ["qmp_capabilities", "query-status"]
    ids = [r["id"] for r in fake.requests]
    assert len(set(ids)) == 2
    assert "arguments" not in fake.requests[1]
    q.close()


def test_error_names_command_class_and_desc(pair) -> None:
    def handler(req):
        if req["execute"] == "device_del":
            return [{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"},
                     "id": req["id"]}]
        return [ok(req)]

    q, _ = session(pair, handler)
    with pytest.raises(QmpError, match=r"QMP device_del: DeviceNotFound: Device 'x' not found") \
            as err:
        q.command("device_del", id="x")
    assert (err.value.command, err.value.error_class) == ("device_del", "DeviceNotFound")
    q.close()


def test_reopened_port_without_greeting_and_with_leftovers(pair) -> None:
    """An in-guest port that an earlier session negotiated: no greeting, qmp_capabilities says
    CommandNotFound, and the earlier session's answers and a half line are still queued."""
    def handler(req):
        if req["execute"] == "qmp_capabilities":
            return [{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is "
                               "already complete, command ignored"}, "id": req["id"]}]
        return [{"return": {"stale": True}, "id": "someone-else-1"},
                {"event": "RESUME", "data": {}, "timestamp": {}}, ok(req, {"fresh": True})]

    q, _ = session(pair, handler, greeting=False,
                   before=b'ss": "old"}\r\n{"return": {}, "id": "old-7"}\r\n')
    assert q.greeting is None
    assert q.command("query-status") == {"fresh": True}
    assert [e["event"] for e in q.events()] == ["RESUME"]
    assert q.events() == []
    q.close()


def test_other_negotiation_errors_are_raised(pair) -> None:
    def handler(req):
        return [{"error": {"class": "GenericError", "desc": "nope"}, "id": req["id"]}]

    client, server = pair
    FakeQemu(server, handler)
    with pytest.raises(QmpError, match="qmp_capabilities: GenericError: nope"):
        Qmp(client.detach(), timeout=5)


def test_hmp_passes_the_command_line(pair) -> None:
    def handler(req):
        if req["execute"] == "human-monitor-command":
            return [ok(req, "info: " + req["arguments"]["command-line"] + "\r\n")]
        return [ok(req)]

    q, fake = session(pair, handler)
    assert q.hmp("info pci") == "info: info pci\r\n"
    q.close()


def test_wait_event_matches_data_and_keeps_the_others(pair) -> None:
    def handler(req):
        if req["execute"] == "device_del":
            return [ok(req),
                    {"event": "DEVICE_DELETED", "data": {"device": "c1n1dev", "path": "/a"}},
                    {"event": "DEVICE_DELETED", "data": {"device": "nvme1", "path": "/b"}}]
        return [ok(req)]

    bench = BENCHES["faults"]
    q, fake = session(pair, handler)
    q.bench = bench
    event = q.device_del(1, timeout=5)
    assert event is not None and event["data"]["device"] == "nvme1"
    assert fake.requests[-1]["arguments"] == {"id": "nvme1"}
    assert [e["data"]["device"] for e in q.events()] == ["c1n1dev"]
    with pytest.raises(QmpConnectionError, match="timed out waiting for QEMU to emit the event "
                                                 "DEVICE_DELETED"):
        q.wait_event("DEVICE_DELETED", 0.2)
    q.close()


def test_closed_connection_is_reported(pair) -> None:
    def handler(req):
        return ["close"] if req["execute"] == "quit" else [ok(req)]

    q, _ = session(pair, handler)
    with pytest.raises(QmpConnectionError, match="closed the monitor connection"):
        q.command("quit")
    q.close()


def test_fault_helpers_send_the_right_commands(pair) -> None:
    def handler(req):
        if req["execute"] == "human-monitor-command":
            return [ok(req, "")]
        return [ok(req)]

    q, fake = session(pair, handler)
    q.bench = BENCHES["faults"]
    q.stall(0, 2)
    q.stall(0, 1, event="write_aio")
    q.resume(0, 2)
    q.throttle(0, 2, 1)
    q.unthrottle(0, 2)
    lines = [r["arguments"]["command-line"] for r in fake.requests
             if r["execute"] == "human-monitor-command"]
    assert lines == ['qemu-io -d c0n2dev "break read_aio idma_stall_c0n2"',
                     'qemu-io -d c0n1dev "break write_aio idma_stall_c0n1"',
                     'qemu-io -d c0n2dev "resume idma_stall_c0n2"',
                     'qemu-io -d c0n2dev "remove_break idma_stall_c0n2"']
    throttles = [r["arguments"] for r in fake.requests if r["execute"] == "block_set_io_throttle"]
    limits = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
    assert throttles == [{"id": "c0n2dev", **dict.fromkeys(limits, 0), "bps": 1},
                         {"id": "c0n2dev", **dict.fromkeys(limits, 0)}]
    q.close()


def test_hmp_error_output_is_raised(pair) -> None:
    def handler(req):
        if req["execute"] == "human-monitor-command":
            return [ok(req, "Error: Device 'c0n2dev' not found\r\n")]
        return [ok(req)]

    q, _ = session(pair, handler)
    with pytest.raises(QmpError, match="controller 0 nsid 2: Error: Device 'c0n2dev' not found"):
        q.stall(0, 2)
    q.close()


def test_bench_checks_before_sending(pair) -> None:
    q, fake = session(pair)
    q.bench = BENCHES["faults"]
    sent = len(fake.requests)
    with pytest.raises(ValueError, match="controller 1 nsid 1 is not over blkdebug"):
        q.stall(1, 1)
    with pytest.raises(ValueError, match="cannot be hot-unplugged"):
        q.device_del(0)
    with pytest.raises(ValueError, match="no controller 2"):
        q.throttle(2, 1, 100)
    with pytest.raises(ValueError, match="no nsid 3"):
        q.throttle(0, 3, 100)
    with pytest.raises(ValueError, match="must be positive"):
        q.throttle(0, 1, 0)
    with pytest.raises(ValueError, match="event 'read' is not one of read_aio"):
        q.stall(0, 1, event="read")
    assert len(fake.requests) == sent
    q.close()


def test_connect_to_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def accept() -> None:
        conn, _ = listener.accept()
        FakeQemu(conn, default_handler)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    with Qmp.connect(path, timeout=5) as q:
        assert q.greeting == GREETING
        assert q.command("stop") == {}
    assert q.fd == -1
    listener.close()
    with pytest.raises(QmpConnectionError, match="cannot connect to the QMP socket"):
        Qmp.connect(tmp_path / "nothing.sock")


def test_command_line_runs_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    from iommu_dma.testing.qmp import main

    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(2)
    fakes: list[FakeQemu] = []

    def handler(req):
        if req["execute"] == "human-monitor-command":
            return [ok(req, "hmp: " + req["arguments"]["command-line"] + "\n")]
        if req["execute"] == "block_set_io_throttle":
            return [{"error": {"class": "GenericError", "desc": "bad id"}, "id": req["id"]}]
        return [ok(req, {"echo": req.get("arguments", {})})]

    def accept() -> None:
        for _ in range(3):
            conn, _ = listener.accept()
            fakes.append(FakeQemu(conn, handler))

    threading.Thread(target=accept, daemon=True).start()
    assert main([str(path), "query-status", '{"a": 1}']) == 0
    assert json.loads(capsys.readouterr().out) == {"echo": {"a": 1}}
    assert main([str(path), "--hmp", "info pci"]) == 0
    assert capsys.readouterr().out == "hmp: info pci\n"
    assert main([str(path), "block_set_io_throttle", '{"id": "x"}']) == 1
    assert "QMP block_set_io_throttle: GenericError: bad id" in capsys.readouterr().err
    listener.close()


def test_guest_outside_a_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMMU_DMA_BENCH", raising=False)
    with pytest.raises(QmpConnectionError, match="only inside a bench guest"):
        Qmp.guest()


def test_guest_port_lookup(tmp_path: Path) -> None:
    ports, dev = tmp_path / "sys", tmp_path / "dev"
    for name, port in (("virtme.stdin", "vport1p1"), ("org.iommu-dma.qmp", "vport3p1")):
        (ports / port).mkdir(parents=True)
        (ports / port / "name").write_text(name + "\n")
    assert find_guest_port(ports=ports, dev=dev) == dev / "vport3p1"
    (dev / "virtio-ports").mkdir(parents=True)
    (dev / "virtio-ports" / "org.iommu-dma.qmp").touch()
    assert find_guest_port(ports=ports, dev=dev) == dev / "virtio-ports" / "org.iommu-dma.qmp"
    with pytest.raises(QmpConnectionError, match=r"no virtio-serial port named 'x'.*virtme.stdin"):
        find_guest_port("x", ports=ports, dev=dev)

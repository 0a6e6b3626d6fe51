"""The README's asyncio example, examples/block_server.py, run as its own process on the bench:
a client writes random blocks from several connections at once and reads them back; the
backing image holds them; a bad request gets the error text, not a dropped connection."""

from __future__ import annotations

import random
import signal
import socket
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from iommu_dma.testing.bench import image_path

pytestmark = pytest.mark.iommu_dma_vm

ROOT = Path(__file__).resolve().parents[2]
HEADER = struct.Struct("<cQI")
LBA = 4096
FIRST = 7168                    # ns1 LBAs from here on are this file's


def recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "the server closed the connection"
        out += chunk
    return out


def request(sock: socket.socket, op: bytes, slba: int, nlb: int, data: bytes = b"") -> bytes:
    sock.sendall(HEADER.pack(op, slba, nlb) + data)
    status = recv(sock, 1)
    if status == b"\1":
        raise RuntimeError(recv(sock, int.from_bytes(recv(sock, 2), "little")).decode())
    return recv(sock, nlb * LBA) if op == b"R" else b""


def test_block_server_example(vfio_bdfs: list[str], idma_bench_images: Path) -> None:
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "block_server.py"),
                               vfio_bdfs[0], "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("serving"), line
        port = int(line.split()[-1])
        rng = random.Random(11)
        blocks = {FIRST + k: rng.randbytes(LBA) for k in range(64)}

        def client(part: int) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for lba in list(blocks)[part::4]:
                    request(sock, b"W", lba, 1, blocks[lba])
                for lba in list(blocks)[part::4]:
                    assert request(sock, b"R", lba, 1) == blocks[lba]

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, range(4)))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            with pytest.raises(RuntimeError, match="outside namespace 1"):
                request(sock, b"R", 1 << 40, 1)
            assert request(sock, b"R", FIRST, 2) == blocks[FIRST] + blocks[FIRST + 1]
        with open(image_path(idma_bench_images, 0, 1), "rb") as f:
            f.seek(FIRST * LBA)
            assert f.read(64 * LBA) == b"".join(blocks[FIRST + k] for k in range(64))
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0

"""A small block server on asyncio: reads and writes of one namespace over TCP.

    python examples/block_server.py 0000:00:0a.0 --port 10809

Each request is a header (op b"R" or b"W", starting LBA, block count), then for a write the
blocks. The answer is a status byte (0: done, then the blocks for a read; 1: failed, then a
2-byte length and the error text, e.g. the NVMe status name). Each connection is a task; all
of them share the event loop's own interrupt-driven queue pair, so the process sleeps while
the device works and many requests are in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

from iommu_dma import Controller, IommuDmaError, Namespace

HEADER = struct.Struct("<cQI")          # op, slba, nlb
MAX_BLOCKS = 256                        # per request


async def handle(ns: Namespace, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            op, slba, nlb = HEADER.unpack(await reader.readexactly(HEADER.size))
            if not 0 < nlb <= MAX_BLOCKS or op not in (b"R", b"W"):
                writer.close()          # a client that does not speak the protocol
                return
            with ns.ctrl.alloc(nlb * ns.lba_size) as buf:
                try:
                    if op == b"W":
                        buf.view[:nlb * ns.lba_size] = await reader.readexactly(
                            nlb * ns.lba_size)
                        await ns.write_async(slba, buf, nlb)
                        writer.write(b"\0")
                    else:
                        await ns.read_async(slba, nlb, buf)
                        writer.write(b"\0" + buf.view[:nlb * ns.lba_size])
                except (IommuDmaError, ValueError) as e:
                    text = str(e).encode()[:65535]
                    writer.write(b"\1" + len(text).to_bytes(2, "little") + text)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass                            # the client went away
    finally:
        writer.close()


async def main(bdf: str, nsid: int, port: int) -> None:
    with Controller.open(bdf) as ctrl:
        ns = ctrl.namespace(nsid)
        server = await asyncio.start_server(lambda r, w: handle(ns, r, w), "127.0.0.1", port)
        print(f"serving {bdf} namespace {nsid} on port {server.sockets[0].getsockname()[1]}",
              flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bdf")
    parser.add_argument("-n", "--namespace", type=int, default=1)
    parser.add_argument("--port", type=int, default=10809, help="0: any free port")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.bdf, args.namespace, args.port))
    except KeyboardInterrupt:
        pass

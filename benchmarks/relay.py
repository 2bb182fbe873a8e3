"""A delaying TCP relay for W9: network latency between nodes and the server, on
loopback (this kernel has no ``netem``).

``python -m benchmarks.relay --target PORT --delay-ms D`` listens on 127.0.0.1 (a free
port, printed as ``listening on 127.0.0.1:PORT``) and relays every connection to
127.0.0.1:TARGET, holding each piece of data it reads for ``D`` ms in each direction
before writing it on (so a round trip gains ``2 D``), in order. Bounded: at most
``LIMIT`` bytes wait per direction of a connection (the reader stops reading until the
writer catches up) and at most ``MAX_CONNECTIONS`` connections are relayed. Loopback
only, both ends.

Limits of the simulation: the delay is added per read, not per packet, with the event
loop's timer resolution (about 1 ms: Python's epoll rounds its timeout up to whole
milliseconds, so a 0.5 ms delay is 0.5 to 1.5 ms), and there is no bandwidth limit,
loss or reordering. The relay is one more process on the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque

#: bytes held per direction of a connection before the relay stops reading from it
LIMIT = 16 * 1024 * 1024
READ_SIZE = 256 * 1024
MAX_CONNECTIONS = 256
LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each piece ``delay`` s after it was read."""
    loop = asyncio.get_running_loop()
    pending: deque[tuple[float, bytes]] = deque()
    held = [0]
    ready = asyncio.Event()  # something to write
    room = asyncio.Event()  # held bytes under LIMIT
    room.set()

    async def read() -> None:
        while True:
            await room.wait()
            data = await reader.read(READ_SIZE)
            pending.append((loop.time() + delay, data))
            held[0] += len(data)
            if held[0] >= LIMIT:
                room.clear()
            ready.set()
            if not data:
                return

    async def write() -> None:
        while True:
            await ready.wait()
            due, data = pending.popleft()
            if not pending:
                ready.clear()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            held[0] -= len(data)
            if held[0] < LIMIT:
                room.set()
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()


class Relay:
    """Listens on loopback and relays to ``target`` with ``delay`` s each way."""

    def __init__(self, target: int, delay: float, host: str = "127.0.0.1") -> None:
        self.target = target
        self.delay = delay
        self.host = host
        self.connections = 0

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            cw.close()
            return
        self.connections += 1
        try:
            sr, sw = await asyncio.open_connection(self.host, self.target)
        except OSError:
            self.connections -= 1
            cw.close()
            return
        for w in (cw, sw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                _pump(cr, sw, self.delay), _pump(sr, cw, self.delay), return_exceptions=True
            )
        finally:
            self.connections -= 1
            for w in (cw, sw):
                w.close()

    async def serve(self, port: int = 0) -> None:
        server = await asyncio.start_server(self.handle, self.host, port)
        bound = server.sockets[0].getsockname()[1]
        print(f"listening on {self.host}:{bound}", flush=True)
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.relay", description="a delaying TCP relay on loopback (W9)"
    )
    p.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 to relay to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added, ms")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    if args.host not in LOOPBACK:
        p.error("the relay listens and connects on loopback only")
    try:
        asyncio.run(Relay(args.target, args.delay_ms / 1000, args.host).serve(args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A transparent TCP relay that adds latency: the emulator's stand-in for ``netem delay`` (absent on these kernels).

    python -m scripts.wan_emu.netns_exec NS scripts.wan_emu.delay_relay --port 7777 --delays DELAYS.json

Runs inside one host's namespace. nftables there redirects every TCP connection the host opens towards the
emulated internet to ``--port`` (except the relay's own, which carry firewall mark :data:`MARK`). For each one the
relay reads the original destination (``SO_ORIGINAL_DST``), dials it itself (marked, so not redirected again) and
copies bytes both ways, holding each piece for the path's one-way delay before writing it on. ``DELAYS.json`` maps
``{"self": ms, "<ip>": ms, ...}``: the delay of a connection to ``ip`` is ``self + delays[ip]`` (both access
links), re-read for every new connection. At most :data:`WINDOW` bytes wait per direction (then the relay stops
reading: TCP backpressure, as a real path's window would), so a bandwidth cap downstream still bounds throughput.
Every byte is delivered in order; a close on one side is passed on after the same delay.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import socket
import struct
import time

MARK = 0x77
SO_ORIGINAL_DST = 80
WINDOW = 8 << 20
READ_SIZE = 64 << 10

logger = logging.getLogger("delay_relay")


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


class Pipe:
    """One direction of a relayed connection: bytes read at t are written at t + delay, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float):
        self.reader, self.writer, self.delay = reader, writer, delay
        self.queue: collections.deque = collections.deque()  # (due, bytes or b"" for EOF)
        self.queued = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def read_side(self) -> None:
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(READ_SIZE)
                self.queue.append((time.monotonic() + self.delay, data))
                self.queued += len(data)
                if self.queued >= WINDOW:
                    self.room.clear()
                self.ready.set()
                if not data:
                    return
        except (ConnectionError, OSError):
            self.queue.append((time.monotonic() + self.delay, b""))
            self.ready.set()

    async def write_side(self) -> None:
        try:
            while True:
                while not self.queue:
                    self.ready.clear()
                    await self.ready.wait()
                due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                if not data:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.queued -= len(data)
                if self.queued < WINDOW:
                    self.room.set()
        except (ConnectionError, OSError):
            return


class Relay:
    def __init__(self, port: int, delays_path: str):
        self.port, self.delays_path = port, delays_path
        self.connections = 0

    def delay_to(self, ip: str) -> float:
        try:
            with open(self.delays_path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        return (float(table.get("self", 0.0)) + float(table.get(ip, 0.0))) / 1000.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            ip, port = original_destination(sock)
        except OSError as e:
            logger.warning("no original destination: %s", e)
            writer.close()
            return
        delay = self.delay_to(ip)
        out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        out.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(out, (ip, port)), 30)
            r2, w2 = await asyncio.open_connection(sock=out)
        except (OSError, asyncio.TimeoutError) as e:
            out.close()
            logger.info("dial %s:%d failed: %s", ip, port, e)
            writer.close()
            return
        for s in (sock, out):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        up, down = Pipe(reader, w2, delay), Pipe(r2, writer, delay)
        # The connection is established only after the SYN's round trip on a real path.
        await asyncio.sleep(delay)
        try:
            await asyncio.gather(up.read_side(), up.write_side(), down.read_side(), down.write_side())
        finally:
            for w in (writer, w2):
                w.close()

    async def serve(self) -> None:
        server = await asyncio.start_server(self.handle, "0.0.0.0", self.port, backlog=1024)
        print(json.dumps({"event": "relay_ready", "port": self.port}), flush=True)
        async with server:
            await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delays", required=True, help="JSON file {self: ms, ip: ms}")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(Relay(a.port, a.delays).serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

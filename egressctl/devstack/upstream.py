"""The offline internet's test services: a TCP and a UDP server that say who answered and who
asked, run by `dev up` inside the stack's ``egdev<slot>-inet`` namespace.

Why: tests prove traffic with real bytes, and "the upstream sees the gateway pod as the
peer" needs a server that reports its peer. TCP answers each line (or an HTTP/1.1 request,
so `wget` and load generators work) with one line naming the service and the peer; UDP
answers every datagram the same way.

    python -m egressctl.devstack.upstream --bind 203.0.113.10 --bind 203.0.113.11 \\
        --tcp 8443 --udp 8053
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
from typing import cast


def reply_line(proto: str, at: tuple[str, int], peer: tuple[str, int], size: int) -> bytes:
    """``upstream <proto>/<port> peer=<ip>:<port> at=<the address dialled> bytes=<n>``."""
    return f"upstream {proto}/{at[1]} peer={peer[0]}:{peer[1]} at={at[0]} bytes={size}\n".encode()


async def _serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")[:2]
    at = writer.get_extra_info("sockname")[:2]
    try:
        while line := await reader.readline():
            if line.startswith((b"GET ", b"POST ", b"HEAD ")):
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                body = reply_line("tcp", at, peer, len(line))
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                )
                writer.write(head + body)
            else:
                writer.write(reply_line("tcp", at, peer, len(line)))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, at: tuple[str, int]) -> None:
        self.at = at
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(reply_line("udp", self.at, addr, len(data)), addr)


async def serve(binds: list[str], tcp_port: int, udp_port: int) -> None:
    server = await asyncio.start_server(_serve_tcp, binds, tcp_port, backlog=1024)
    loop = asyncio.get_running_loop()
    for bind in binds:  # one UDP socket per address, so replies come from the address dialled
        at = (bind, udp_port)
        await loop.create_datagram_endpoint(functools.partial(_Udp, at), local_addr=at)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream: tcp and udp on {', '.join(binds)} ports {tcp_port}/{udp_port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True, action="append", help="an address (repeatable)")
    parser.add_argument("--tcp", type=int, required=True)
    parser.add_argument("--udp", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.bind, args.tcp, args.udp))


if __name__ == "__main__":
    main()

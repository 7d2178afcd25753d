"""A small TCP load generator: ``--conns`` persistent connections, each sending one short line
and waiting for the reply line, as fast as it can, for ``--seconds``. Prints JSON (requests,
errors, requests per second, latency percentiles).

bench.data_path runs it inside a client pod's network namespace (``nsenter --net``), so that its
traffic is the pod's traffic: same address, same NetworkPolicy, same Service routing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench._common import percentile


async def _one(
    host: str, port: int, until: float, latencies: list[float], errors: list[str]
) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    except (OSError, TimeoutError) as exc:
        errors.append(f"connect: {exc}")
        return
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(b"hi\n")
            await writer.drain()
            line = await reader.readline()
            if not line.startswith(b"upstream "):
                errors.append(f"reply: {line[:80]!r}")
                return
            latencies.append(time.perf_counter() - t0)
    except OSError as exc:
        errors.append(f"io: {exc}")
    finally:
        writer.close()


async def run(host: str, port: int, conns: int, seconds: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    until = start + seconds
    try:
        await asyncio.wait_for(
            asyncio.gather(*(_one(host, port, until, latencies, errors) for _ in range(conns))),
            seconds + 10,
        )
    except TimeoutError:
        errors.append("stalled: no reply within 10 s of the end")
    took = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / took,
        "p50_ms": percentile(latencies, 50) * 1000 if latencies else 0.0,
        "p99_ms": percentile(latencies, 99) * 1000 if latencies else 0.0,
        "first_errors": sorted(set(errors))[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.host, args.port, args.conns, args.seconds))))


if __name__ == "__main__":
    main()

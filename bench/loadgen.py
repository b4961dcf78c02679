"""The load generator: raw HTTP/1.1 keep-alive connections on uvloop, one process.

A hand-rolled client (pre-built request bytes, `Content-Length` responses only) costs a few
microseconds per request, so one core drives far more than the servers under test can answer.

- `rps`: `--connections N` connections each send the same `tools/call` request back to back for
  `--duration` seconds after `--warmup`; prints JSON `{requests, seconds, rps, p50_ms, p99_ms,
  errors}` (latency per request, measured from write to the last body byte).
- `streams`: opens `--count` idle SSE streams (`GET` with `Accept: text/event-stream`), waits for
  each stream's first bytes, prints `{"opened": n}`, then holds them until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import uvloop


def _request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i < 0:
        raise RuntimeError(f"response without Content-Length (status {status})")
    length = int(lower[i + 15 : lower.find(b"\r\n", i)])
    if length:
        await reader.readexactly(length)
    return status


async def rps(args: argparse.Namespace) -> dict[str, object]:
    headers = json.loads(args.headers)
    body = args.body.encode()
    request = _request(args.host, args.port, args.path, headers, body)
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(args.host, args.port)
        perf = time.perf_counter
        try:
            while True:
                t0 = perf()
                writer.write(request)
                status = await _read_response(reader)
                t1 = perf()
                now = loop.time()
                if now >= stop_at:
                    return
                if now >= measure_from:
                    if status != 200:
                        errors += 1
                    latencies.append(t1 - t0)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(args.connections)))
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "seconds": args.duration,
        "rps": n / args.duration,
        "p50_ms": latencies[n // 2] * 1000 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
        "errors": errors,
    }


async def streams(args: argparse.Namespace) -> None:
    headers = json.loads(args.headers)
    lines = [
        f"GET {args.path} HTTP/1.1",
        f"Host: {args.host}:{args.port}",
        "Accept: text/event-stream",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("content-type",)]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    held: list[asyncio.StreamWriter] = []
    failed = 0
    sem = asyncio.Semaphore(200)

    async def open_one() -> None:
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if head[9:12] != b"200":
                    failed += 1
                    writer.close()
                    return
                await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)  # the first comment
                held.append(writer)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                failed += 1

    await asyncio.gather(*(open_one() for _ in range(args.count)))
    print(json.dumps({"opened": len(held), "failed": failed}), flush=True)
    await loop_read_stdin()
    for w in held:
        w.close()


async def loop_read_stdin() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["rps", "streams"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/mcp")
    p.add_argument("--headers", default="{}")
    p.add_argument("--body", default="{}")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--count", type=int, default=5000)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "rps":
        print(json.dumps(uvloop.run(rps(args))), flush=True)
    else:
        uvloop.run(streams(args))


if __name__ == "__main__":
    main()

"""One-command benchmark of the MCP proxy path: `python bench/run.py`.

Starts, each as its own process: a minimal MCP server (`bench/servers.py mcp`), a bare aiohttp
pass-through proxy in front of it (`bench/servers.py bare`), and the real gateway
(`python -m gateway run`) in front of it with every check on (ES256 token verification with the
verified-token cache, `amr` must hold `mfa`, the local revocation set, Origin and path checks, a
policy with deny/scope/step-up rules evaluated on every `tools/call`, routing-header agreement,
`forward_token = "identity"`, audit log line and metrics). The load generator
(`bench/loadgen.py`) drives `tools/call` requests at each concurrency against the server alone,
the bare proxy and the gateway, in one run. Servers are pinned to CPU 0 and the load generator
to CPU 1 when the machine has two or more cores. Then the gateway holds `--streams` idle SSE
streams and the growth of its resident memory is divided by their number.

Figures are printed (and written as JSON with `--json FILE`); nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.core.tokens import build_access_claims, mint_access_token  # noqa: E402
from gateway.crypto import generate_encryption_key  # noqa: E402
from gateway.keys import SigningKey, generate_private_key_pem, load_private_key_pem  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(pid, cpus)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def write_config(tmp: Path, gw_port: int, mcp_port: int, store: str) -> tuple[Path, SigningKey]:
    pem = generate_private_key_pem("ES256")
    (tmp / "keys").mkdir()
    (tmp / "keys" / "es256.pem").write_bytes(pem)
    (tmp / "policies").mkdir()
    (tmp / "policies" / "default.toml").write_text(
        """
[mcp]
required_amr = ["mfa"]

[[mcp.rules]]
method = "tools/call"
tool = "delete_*"
effect = "deny"

[[mcp.rules]]
method = "tools/call"
tool = "admin_*"
require_scopes = ["admin"]

[[mcp.rules]]
method = "tools/call"
tool = "transfer_*"
max_auth_age = "5m"
""",
        encoding="utf-8",
    )
    config = tmp / "gateway.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{gw_port}"
public_url = "http://127.0.0.1:{gw_port}"
dev_http_loopback = true

[store]
url = "{store}"
encryption_key = "{generate_encryption_key()}"
key_prefix = "bench-{secrets.token_hex(4)}:"

[upstream]
issuer = "http://127.0.0.1:9"
client_id = "mfa-gateway"
client_secret = "bench-secret"
allow_insecure_http_loopback = true
timeout = "1s"

[[resources]]
path = "/mcp"
upstream = "http://127.0.0.1:{mcp_port}/mcp"
forward_token = "identity"

[keys]
cookie_secret = "{secrets.token_urlsafe(32)}"

[[keys.signing]]
kid = "bench-1"
file = "keys/es256.pem"
alg = "ES256"

[logging]
level = "info"
format = "json"
""",
        encoding="utf-8",
    )
    return config, SigningKey("bench-1", "ES256", load_private_key_pem(pem, "ES256"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadgen(
    port: int,
    headers: dict[str, str],
    body: str,
    connections: int,
    args: argparse.Namespace,
    cpus: set[int] | None,
) -> dict[str, Any]:
    proc = subprocess.Popen(
        [
            PY,
            str(HERE / "loadgen.py"),
            "rps",
            "--port",
            str(port),
            "--headers",
            json.dumps(headers),
            "--body",
            body,
            "--connections",
            str(connections),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    pin(proc.pid, cpus)
    out, _ = proc.communicate(timeout=args.duration + args.warmup + 120)
    if proc.returncode != 0:
        raise RuntimeError("load generator failed")
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--connections", default="1,16,64")
    p.add_argument("--streams", type=int, default=5000, help="idle SSE streams to hold")
    p.add_argument("--store", default="memory://", help="gateway store URL (e.g. redis://...)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    ncpu = os.cpu_count() or 1
    server_cpus = {0} if ncpu >= 2 else None
    load_cpus = {1} if ncpu >= 2 else None
    tmp = Path(tempfile.mkdtemp(prefix="mfagw-bench-"))
    mcp_port, bare_port, gw_port = free_port(), free_port(), free_port()
    config, key = write_config(tmp, gw_port, mcp_port, args.store)
    procs: list[subprocess.Popen[bytes]] = []
    try:

        def start(argv: list[str]) -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
            )
            pin(proc.pid, server_cpus)
            procs.append(proc)
            return proc

        start([PY, str(HERE / "servers.py"), "mcp", "--port", str(mcp_port)])
        start(
            [
                PY,
                str(HERE / "servers.py"),
                "bare",
                "--port",
                str(bare_port),
                "--upstream",
                f"http://127.0.0.1:{mcp_port}/mcp",
            ]
        )
        gateway = start([PY, "-m", "gateway", "run", "--config", str(config)])
        wait_port(mcp_port)
        wait_port(bare_port)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")

        now = time.time()  # noqa: TID251 - the benchmark mints a real token for a real gateway
        claims = build_access_claims(
            issuer=f"http://127.0.0.1:{gw_port}",
            sub="bench-user",
            audience=f"http://127.0.0.1:{gw_port}/mcp",
            client_id="bench-client",
            scope="mcp",
            auth_time=now - 30,
            amr=["pwd", "otp", "mfa"],
            acr="urn:mfa-gateway:totp",
            gid="bench-grant",
            now=now,
            ttl=3600,
        )
        token = mint_access_token(claims, key)
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hello"}},
            }
        )
        headers = {
            "Authorization": "Bearer " + token,
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/call",
            "Mcp-Name": "echo",
        }
        targets = {"server": mcp_port, "bare": bare_port, "gateway": gw_port}
        results: dict[str, Any] = {
            "cpus": ncpu,
            "pinned": server_cpus is not None,
            "duration": args.duration,
            "throughput": {},
        }
        print(
            f"# mfa-gateway proxy benchmark ({ncpu} CPUs, servers pinned to "
            f"{sorted(server_cpus or [])}, load generator to {sorted(load_cpus or [])})"
        )
        print(f"{'conns':>5} {'target':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for c in (int(x) for x in args.connections.split(",")):
            row: dict[str, Any] = {}
            for name, port in targets.items():
                r = loadgen(port, headers, body, c, args, load_cpus)
                row[name] = r
                print(
                    f"{c:>5} {name:>8} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} "
                    f"{r['p99_ms']:>8.3f} {r['errors']:>6}"
                )
            g, b, s = row["gateway"], row["bare"], row["server"]
            row["ratios"] = {
                "gateway_vs_bare_rps": g["rps"] / b["rps"],
                "gateway_vs_server_rps": g["rps"] / s["rps"],
                "p50_added_over_bare_ms": g["p50_ms"] - b["p50_ms"],
                "p99_added_over_bare_ms": g["p99_ms"] - b["p99_ms"],
                "p50_added_over_server_ms": g["p50_ms"] - s["p50_ms"],
                "p99_added_over_server_ms": g["p99_ms"] - s["p99_ms"],
            }
            q = row["ratios"]
            print(
                f"{'':>5} {'ratios':>8} gateway/bare {q['gateway_vs_bare_rps']:.1%}, "
                f"gateway/server {q['gateway_vs_server_rps']:.1%}, p50 +"
                f"{q['p50_added_over_bare_ms']:.3f} ms over bare, p99 +"
                f"{q['p99_added_over_server_ms']:.3f} ms over server"
            )
            results["throughput"][str(c)] = row

        if args.streams:
            results["streams"] = idle_streams(args, gateway.pid, gw_port, headers, load_cpus)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def idle_streams(
    args: argparse.Namespace, pid: int, port: int, headers: dict[str, str], cpus: set[int] | None
) -> dict[str, Any]:
    """Hold `args.streams` idle SSE streams through the gateway; memory per stream."""
    time.sleep(1.0)
    before = rss_kib(pid)
    holder = subprocess.Popen(
        [
            PY,
            str(HERE / "loadgen.py"),
            "streams",
            "--port",
            str(port),
            "--headers",
            json.dumps({"Authorization": headers["Authorization"]}),
            "--count",
            str(args.streams),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pin(holder.pid, cpus)
    assert holder.stdout is not None
    assert holder.stdin is not None
    opened = json.loads(holder.stdout.readline())
    time.sleep(2.0)
    after = rss_kib(pid)
    cpu0 = cpu_seconds(pid)
    time.sleep(5.0)
    idle_cpu = (cpu_seconds(pid) - cpu0) / 5.0
    holder.stdin.close()
    holder.wait(timeout=60)
    per_stream = (after - before) / max(opened["opened"], 1)
    print(
        f"# idle SSE streams held by one gateway process: {opened['opened']} opened, "
        f"{opened['failed']} failed; RSS {before} -> {after} KiB = {per_stream:.1f} KiB per "
        f"stream; gateway CPU while idle {idle_cpu:.1%}"
    )
    return {
        "opened": opened["opened"],
        "failed": opened["failed"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_stream": per_stream,
        "idle_cpu": idle_cpu,
    }


if __name__ == "__main__":
    raise SystemExit(main())

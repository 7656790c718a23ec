#!/usr/bin/env python3
"""Benchmark: what a proxied request costs.

    .venv/bin/python scripts/bench_request.py [--requests 300]

Starts its own proxy with ./run.sh (own port and key prefix) and one instance, then measures
GET /api/status over a kept-alive connection, interleaved, in the same run:
  through the datalab proxy (session cookie)  vs  straight to the container  vs  plain mitmdump
It prints medians and ratios (these machines are noisy: compare ratios, not seconds), then
removes every instance it made.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import AUTH_HEADER
from benchlib import REDIS_URL
from benchlib import Store
from benchlib import bench_proxy
from benchlib import connect
from benchlib import free_port
from benchlib import session_cookie
from benchlib import upload
from benchlib import wait_port


def get_latencies(port: int, n: int, headers: dict[str, str], host: str = "127.0.0.1") -> list[float]:
    """n GETs of /api/status over one kept-alive connection, as a browser sends them."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/api/status", headers=headers)
        response = conn.getresponse()
        response.read()
        out.append(time.perf_counter() - t0)
        assert response.status == 200, response.status
    conn.close()
    return out


def plain_mitmdump(target: str) -> tuple[subprocess.Popen, int]:
    """mitmproxy itself, reverse-proxying straight to the instance: what the addon adds is the rest."""
    port = free_port()
    mitmdump = Path(sys.executable).parent / "mitmdump"
    proc = subprocess.Popen(
        [
            str(mitmdump),
            "-q",
            "--mode",
            f"reverse:http://{target}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            "keep_host_header=true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc, port


def report(name: str, ours: list[float], base: list[float], base_name: str) -> None:
    m, b = statistics.median(ours), statistics.median(base)
    print(f"{name:8s} datalab proxy {m * 1000:8.2f} ms | {base_name} {b * 1000:8.2f} ms | ratio {m / b:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with bench_proxy(pool_size=0) as proxy:
        base, prefix = proxy.base, proxy.prefix
        nonce = upload(base, proxy.key, "r.csv")

        cookie = session_cookie(base, nonce)
        store = Store(connect(REDIS_URL), prefix)

        async def instance_address() -> tuple[str, int, str]:
            instance = await store.instance(await store.nonce_target(nonce))
            await store.close()
            return instance.host, instance.port, instance.token

        host, direct, token = asyncio.run(instance_address())  # on the instance network, no published port
        as_proxy = {AUTH_HEADER: token}  # what the proxy adds; the browser sends the cookie
        plain, plain_port = plain_mitmdump(f"{host}:{direct}")
        through, straight, bare = [], [], []
        for _ in range(max(1, args.requests // 50)):  # interleave, so drift hits every side alike
            through += get_latencies(proxy.port, 50, {"Cookie": cookie})
            bare += get_latencies(plain_port, 50, as_proxy)
            straight += get_latencies(direct, 50, as_proxy, host)
        plain.terminate()
        report("request", through, straight, "direct to Jupyter")
        report("request", through, bare, "plain mitmdump (no addon)")


if __name__ == "__main__":
    main()

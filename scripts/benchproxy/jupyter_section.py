"""Jupyter end to end: a real instance started by an upload through the proxy, GET /api/status and
one >= 100 KB static JS asset of Jupyter's, direct (with the X-Datalab-Auth header the proxy adds),
through plain mitmdump (same header), the proxy and the proxy --lean --workers 2."""

from __future__ import annotations

import asyncio
import re
import time

from benchlib import AUTH_HEADER
from benchlib import REDIS_URL
from benchlib import Store
from benchlib import connect
from benchlib import session_cookie
from benchlib import upload

from backends import Instance
from benchproxy.entries import DEFAULT
from benchproxy.entries import LEAN2
from benchproxy.entries import proxy_entries
from benchproxy.http_section import measure_http
from benchproxy.http_section import report_http
from benchproxy.load import http_get
from benchproxy.peers import start_plain_mitmdump
from benchproxy.rig import Holder
from benchproxy.rig import Rig
from benchproxy.rig import Target


def bench_jupyter(rig: Rig) -> None:
    section = "Jupyter end to end"
    print(f"\n== {section} ==", flush=True)
    base = f"http://127.0.0.1:{rig.proxy_ports[DEFAULT]}"
    t0 = time.perf_counter()
    nonce = upload(base, rig.key, "bench.csv")
    cookie = session_cookie(base, nonce)

    async def record() -> Instance:
        store = Store(connect(REDIS_URL), rig.prefix)
        try:
            return await store.instance(await store.nonce_target(nonce))
        finally:
            await store.close()

    inst = asyncio.run(record())
    print(f"  instance {inst.id[:8]}... at {inst.host}:{inst.port}, up in {time.perf_counter() - t0:.1f} s")
    auth = {AUTH_HEADER: inst.token}
    asset, size = find_asset(inst, auth)
    rig.meta["jupyter_asset"] = f"{asset} ({size} bytes)"
    rig.path_labels[asset] = f"JS asset ({size / 1024:.0f} KiB)"
    print(f"  static asset: {asset} ({size / 1024:.0f} KiB)", flush=True)
    direct = Target("direct", inst.port, auth, host=inst.host)
    plain = start_plain_mitmdump(rig, f"http://{inst.host}:{inst.port}")
    plain.headers = auth
    holder = Holder(inst.id, inst.handle, 0, inst.host, cookie)
    targets = [direct, plain, *proxy_entries(rig, (DEFAULT, LEAN2), holder)]
    paths = ["/api/status", asset]
    got = measure_http(rig, section, targets, paths, rig.args.seconds, rounds=rig.args.jupyter_rounds)
    for path in paths:
        report_http(rig, section, got, path, "direct", None)
        report_http(rig, section, got, path, "plain mitmdump", "direct")
        report_http(rig, section, got, path, DEFAULT, "plain mitmdump", 0.9)
        report_http(rig, section, got, path, LEAN2, "plain mitmdump")
    rig.stop_target(plain)


def find_asset(inst: Instance, auth: dict[str, str]) -> tuple[str, int]:
    """One of Jupyter's own static scripts of 100 KB or more, found in the pages it serves."""
    seen: list[tuple[int, str]] = []
    for page in ("/tree", "/lab", "/notebooks/bench.ipynb"):
        status, html = http_get(f"http://{inst.host}:{inst.port}{page}", auth)
        if status != 200:
            continue
        for src in re.findall(rb'<script[^>]+src="([^"]+\.js[^"]*)"', html):
            path = src.decode()
            if path.startswith("http"):
                continue
            s, body = http_get(f"http://{inst.host}:{inst.port}{path}", auth)
            if s == 200:
                seen.append((len(body), path))
                if len(body) >= 100_000:
                    return path, len(body)
                # webpack's entry names the chunks it loads: look there too
                for chunk in re.findall(rb'"(static/[\w/.-]+\.js)"', body)[:50]:
                    p = "/" + chunk.decode()
                    s2, b2 = http_get(f"http://{inst.host}:{inst.port}{p}", auth)
                    if s2 == 200:
                        seen.append((len(b2), p))
                        if len(b2) >= 100_000:
                            return p, len(b2)
    if not seen:
        raise RuntimeError("found no static script in Jupyter's pages")
    size, path = max(seen)
    return path, size

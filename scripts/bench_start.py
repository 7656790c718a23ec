#!/usr/bin/env python3
"""Benchmark: how long a start takes (upload -> nonce), from the warm pool and cold, and how a
burst of concurrent starts is served.

    .venv/bin/python scripts/bench_start.py [--runs 10] [--burst 40]
    .venv/bin/python scripts/bench_start.py --baseline-image datalab-notebook:old [--runs 10]

Starts its own proxies with ./run.sh (own ports and key prefixes), one after the other so they never
compete for the CPU, and measures in the same run:
  cold:      POST /datalab/start with datalab_pool_size=0 (each start boots an instance)
  backend:   the Docker backend booting one instance alone (the cold start's baseline)
  pool hit:  POST /datalab/start with a full pool of 2 (each start takes a pooled instance)
  burst:     --burst starts at once against a proxy with default options (pool 2, one boot per CPU,
             30 s queue, capacity from the engine's memory): granted, refused (by code), p50/p95
Prints medians and ratios (these machines are noisy: compare ratios, not seconds), then removes
every instance it made. With --baseline-image, it only compares two images' boots instead (no proxy
is started, no image built): the Docker backend booting one instance of each in turn, its wall time
and the CPU seconds its container spent until Jupyter answered, against the baseline image's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import docker
from benchlib import IMAGE
from benchlib import REDIS_URL
from benchlib import BenchProxy
from benchlib import Settings
from benchlib import bench_proxy
from benchlib import build_instances
from benchlib import connect
from benchlib import stop
from benchlib import try_upload
from benchlib import upload


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def pool_length(prefix: str) -> int:
    async def length() -> int:
        client = connect(REDIS_URL)
        try:
            return await client.llen(prefix + "pool")
        finally:
            await client.aclose()

    return asyncio.run(length())


def wait_for_pool(prefix: str, size: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while pool_length(prefix) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not reach {size} in {timeout} s")
        time.sleep(0.2)


def alone_settings(prefix: str, image: str) -> Settings:
    """The Docker backend of `image` under its own key prefix, without a proxy."""
    options = {"image": image}
    return Settings(
        sign_key="unused", redis_url=REDIS_URL, key_prefix=prefix, backend="docker", backend_options=options
    )


def backend_alone(prefix: str, runs: int) -> list[float]:
    """The Docker backend booting an instance by itself: what a cold start costs at the least."""

    async def boots() -> list[float]:
        instances = build_instances(alone_settings(prefix, IMAGE))
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            instance = await instances.backend.start(secrets.token_urlsafe(16), secrets.token_urlsafe(16))
            out.append(time.perf_counter() - t0)
            await instances.backend.stop(instance.handle)
        await instances.store.close()
        return out

    return asyncio.run(boots())


def boot_costs(images: list[str], runs: int) -> dict[str, list[tuple[float, float]]]:
    """Each image's boots, interleaved so both see the same machine: (wall s, container CPU s) each."""

    async def boots() -> dict[str, list[tuple[float, float]]]:
        prefix = f"bench:boots-{secrets.token_hex(4)}:"
        backends = {image: build_instances(alone_settings(prefix, image)) for image in images}
        client = docker.from_env()
        out: dict[str, list[tuple[float, float]]] = {image: [] for image in images}
        try:
            for _ in range(runs):
                for image, instances in backends.items():
                    t0 = time.perf_counter()
                    instance = await instances.backend.start(secrets.token_urlsafe(16), secrets.token_urlsafe(16))
                    wall = time.perf_counter() - t0
                    stats = await asyncio.to_thread(client.api.stats, instance.handle, stream=False, one_shot=True)
                    out[image].append((wall, stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9))
                    await instances.backend.stop(instance.handle)
        finally:
            client.close()
            for instances in backends.values():
                await instances.store.close()
        return out

    return asyncio.run(boots())


def compare_images(image: str, baseline: str, runs: int) -> None:
    costs = boot_costs([baseline, image], runs)
    wall = {i: statistics.median(w for w, _ in costs[i]) for i in costs}
    cpu = {i: statistics.median(c for _, c in costs[i]) for i in costs}
    for i in (baseline, image):
        print(f"boot     {i:32} median {wall[i] * 1000:8.1f} ms | CPU {cpu[i]:5.2f} s")
    ratio = f"wall {wall[image] / wall[baseline]:5.2f} | CPU {cpu[image] / cpu[baseline]:5.2f}"
    print(f"boot     {image} / {baseline}: {ratio}")


def sequential_starts(proxy: BenchProxy, runs: int, pool: int) -> list[float]:
    """One start at a time, each stopped right after; with a pool, wait until it is full again first."""
    out = []
    for i in range(runs):
        if pool:
            wait_for_pool(proxy.prefix, pool)
        t, nonce = timed(upload, proxy.base, proxy.key, f"s{i}.csv")
        out.append(t)
        stop(proxy.base, proxy.key, nonce)
    return out


def burst(proxy: BenchProxy, n: int) -> None:
    def one(i: int) -> tuple[float, int, dict, dict]:
        t0 = time.perf_counter()
        status, body, headers = try_upload(proxy.base, proxy.key, f"burst{i}.csv")
        return time.perf_counter() - t0, status, body, headers

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    granted = sorted(t for t, status, _, _ in answers if status == 200)
    refused = collections.Counter(f"{status} {body.get('code')}" for _, status, body, _ in answers if status != 200)
    without_retry = sum(1 for _, status, _, h in answers if status == 503 and "Retry-After" not in h)
    print(f"burst    {n} at once: {len(granted)} granted, {n - len(granted)} refused {dict(refused)}")
    if granted:
        p95 = granted[min(len(granted) - 1, round(0.95 * (len(granted) - 1)))]
        print(f"burst    granted p50 {statistics.median(granted):6.2f} s | p95 {p95:6.2f} s | max {granted[-1]:6.2f} s")
    print(f"burst    504s: {refused.get('504 START_TIMEOUT', 0)} | 503s without Retry-After: {without_retry}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--baseline-image", help="compare $DATALAB_IMAGE's boots with this image's, and nothing else")
    args = parser.parse_args()
    if args.baseline_image:
        compare_images(IMAGE, args.baseline_image, args.runs)
        return

    with bench_proxy(pool_size=0) as proxy:
        cold = sequential_starts(proxy, args.runs, pool=0)
        alone = backend_alone(proxy.prefix[:-1] + "-alone:", args.runs)  # not the proxy's: it would reconcile them away
    with bench_proxy(pool_size=2) as proxy:
        hits = sequential_starts(proxy, args.runs, pool=2)
    c, a, h = statistics.median(cold), statistics.median(alone), statistics.median(hits)
    print(f"cold     median {c * 1000:8.1f} ms | backend alone {a * 1000:8.1f} ms | ratio {c / a:5.2f}")
    print(f"pool hit median {h * 1000:8.1f} ms | cold start    {c * 1000:8.1f} ms | ratio {h / c:5.3f}")
    with bench_proxy() as proxy:
        wait_for_pool(proxy.prefix, 2)
        burst(proxy, args.burst)


if __name__ == "__main__":
    main()

"""Instances that come and go under load: warm pool, admission, capacity, culling, reconciliation and
stop, end to end (real mitmdump processes, Redis, Docker and Jupyter; timeouts shortened by options).
Each test has its own key prefix, so the pools and capacities of different tests never meet."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import requests

import signing
from backends import Instance
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import LABEL_MANAGED
from backends.container_spec import LABEL_PREFIX
from backends.container_spec import MANAGED_BY
from e2e.conftest import IMAGE
from e2e.helpers import error_of
from e2e.helpers import instance_of
from e2e.helpers import opened
from e2e.helpers import quietly
from e2e.helpers import records
from e2e.proxy import Browser
from e2e.proxy import run_code
from helpers import wait_until

CSV = b"x,y\n1,2\n"


def pool(world, prefix: str) -> list[str]:
    return [m.decode() for m in world.redis.lrange(prefix + "pool", 0, -1)]


def pooled_instance(world, prefix: str, instance_id: str) -> Instance:
    return Instance.from_json(world.redis.get(f"{prefix}instance:{instance_id}"))


def names_in_workdir(browser: Browser) -> set[str]:
    return {item["name"] for item in browser.get("/api/contents").json()["content"]}


def test_a_start_takes_a_pooled_instance_and_the_pool_refills(make_proxy, world):
    prefix = world.sub("pool")
    p = make_proxy(prefix=prefix, datalab_pool_size=2)
    ready = wait_until(lambda: len(pool(world, prefix)) == 2 and pool(world, prefix), "a pool of 2")

    nonce = p.start_instance("p.csv", CSV)
    claimed = instance_of(world, prefix, nonce)
    assert claimed.id in ready and claimed.filename == "p.csv"
    browser = Browser(p)
    browser.view(nonce)
    assert names_in_workdir(browser) == {"p.csv"}  # Jupyter lists the upload at once
    assert requests.get(p.url(f"/datalab/static/{nonce}/files/p.csv"), timeout=30).content == CSV
    browser.get("/tree")  # the _xsrf cookie, as a browser gets it
    saved = browser.http.put(
        p.url("/api/contents/p.csv"),
        json={"type": "file", "format": "text", "content": "x,y\n3,4\n"},
        headers={"X-XSRFToken": browser.http.cookies.get("_xsrf", "")},
        timeout=30,
    )
    assert saved.status_code == 200, saved.text  # the user owns the file: saving over it works

    wait_until(lambda: len(pool(world, prefix)) == 2, "the pool to refill")
    assert claimed.id not in pool(world, prefix)
    assert len(world.containers(prefix)) == 3


def test_a_dead_pool_instance_is_never_handed_out(make_proxy, world):
    prefix = world.sub("deadpool")
    p = make_proxy(prefix=prefix, datalab_pool_size=1)
    (frozen,) = wait_until(lambda: pool(world, prefix), "a pooled instance")
    world.docker.containers.get(pooled_instance(world, prefix, frozen).handle).pause()  # no answer, no exit

    nonce = p.start_instance("d.csv", CSV)
    assert instance_of(world, prefix, nonce).id != frozen
    assert frozen not in records(world, prefix)  # ended when the claim found it silent
    browser = Browser(p)
    browser.view(nonce)
    assert names_in_workdir(browser) == {"d.csv"}

    (killed,) = wait_until(lambda: pool(world, prefix), "the pool to refill")
    world.docker.containers.get(pooled_instance(world, prefix, killed).handle).kill()
    wait_until(lambda: killed not in records(world, prefix), "the engine's exit event to end it", timeout=10)
    wait_until(lambda: pool(world, prefix) and killed not in pool(world, prefix), "a live instance in the pool")


def test_two_proxies_share_one_pool_and_one_capacity(make_proxy, world):
    prefix = world.sub("shared")
    options = {"datalab_pool_size": 2, "datalab_max_instances": 3}
    a, b = make_proxy(prefix=prefix, **options), make_proxy(prefix=prefix, **options)
    wait_until(lambda: len(pool(world, prefix)) == 2, "a pool of 2")
    time.sleep(4)  # both fillers have looked again since: still one pool of 2, not 2 each
    assert len(pool(world, prefix)) == 2 and len(world.containers(prefix)) == 2

    first = a.start_instance("a.csv", CSV)
    b.start_instance("b.csv", CSV)
    wait_until(lambda: len(pool(world, prefix)) == 1, "the pool to refill up to capacity")
    time.sleep(4)
    assert len(world.containers(prefix)) == 3  # 2 live + 1 pooled = max_instances, across both proxies
    a.start_instance("c.csv", CSV)

    for proxy in (a, b):
        r = proxy.upload("d.csv", CSV)
        assert r.status_code == 503 and error_of(r) == "CAPACITY"
        assert int(r.headers["Retry-After"]) > 0
    assert len(world.containers(prefix)) == 3 and len(records(world, prefix)) == 3

    assert a.stop_instance(first).json() == {"code": "OK", "result": {}}
    wait_until(lambda: len(pool(world, prefix)) == 1, "the freed slot to refill the pool")
    b.start_instance("e.csv", CSV)  # and the next start takes it from there
    assert len(records(world, prefix)) == 3


def test_a_burst_is_queued_then_refused_cleanly(make_proxy, world):
    prefix = world.sub("burst")
    p = make_proxy(
        prefix=prefix,
        datalab_boots_at_once=1,
        datalab_queue_timeout=4,
        datalab_max_instances=6,
        datalab_cull_interval=1,  # reconciliation runs during the burst and must not touch starts in flight
    )
    with ThreadPoolExecutor(8) as pool_:
        answers = list(pool_.map(lambda i: p.upload(f"b{i}.csv", CSV), range(8)))
    granted = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    for r in refused:
        assert r.status_code == 503 and error_of(r) == "CAPACITY" and int(r.headers["Retry-After"]) > 0
    messages = {r.json()["message"].split(";")[0].split(":")[0] for r in refused}
    assert messages == {"every instance slot is taken", "too many starts at once"}  # 6 slots for 8; 1 boot at a time
    assert granted
    for r in granted:
        browser = Browser(p)
        browser.view(r.json()["result"]["nonce"])
        assert browser.get("/api/status").status_code == 200
    assert len(records(world, prefix)) == len(granted) == len(world.containers(prefix))
    assert world.redis.zcard(prefix + "slots") == len(granted)  # refused starts gave their slots back


def keep_running_code(browser: Browser, kernel: str, seconds: float) -> None:
    """Only code run over one kernel channel for `seconds`, no HTTP request: WebSocket frames the
    proxy does not count, which Jupyter records as the kernel's activity."""
    with browser.kernel_channels(kernel) as ws:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            run_code(ws, "pass")
            time.sleep(1)


def test_idle_instances_are_culled_but_not_while_in_use(make_proxy, world):
    prefix = world.sub("cull")
    p = make_proxy(prefix=prefix, datalab_idle_timeout=4, datalab_cull_interval=1)
    nonce, browser = opened(p, "c.csv")
    kernel = browser.start_kernel()

    # Busy for twice the idle timeout without any traffic: not idle.
    assert browser.execute(kernel, "import time; time.sleep(9); print('done')", timeout=60) == "done\n"
    keep_running_code(browser, kernel, seconds=8)  # code run alone counts: the kernel's own record
    for _ in range(7):  # and so do static fetches alone
        assert requests.get(p.url(f"/datalab/static/{nonce}/files/c.csv"), timeout=30).content == CSV
        time.sleep(1)
    assert browser.get("/api/status").status_code == 200
    assert len(world.containers(prefix)) == 1

    wait_until(lambda: not world.containers(prefix), "the idle cull", 30)  # looking costs no traffic
    gone = browser.get("/api/status")
    assert gone.status_code == 410 and error_of(gone) == "INSTANCE_GONE"
    r = requests.get(p.url(f"/datalab/view/{nonce}/tree"), allow_redirects=False, timeout=30)
    assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"
    time.sleep(1)
    assert error_of(browser.get("/tree")) == "INSTANCE_GONE"  # for the rest of the session's life
    assert "idle for more than datalab_idle_timeout" in p.log_text()


def test_an_instance_ends_at_its_max_age_however_busy(make_proxy, world):
    prefix = world.sub("age")
    p = make_proxy(prefix=prefix, datalab_max_age=6, datalab_cull_interval=1)
    _, browser = opened(p, "a.csv")
    # A Response is falsy for 4xx, so the answer comes back in a list.
    (gone,) = wait_until(lambda: (r := browser.get("/api/status")).status_code != 200 and [r], "the max-age cull", 30)
    assert gone.status_code == 410 and error_of(gone) == "INSTANCE_GONE"
    wait_until(lambda: not world.containers(prefix), "its container removed", 10)  # forgotten first, then stopped
    assert "older than datalab_max_age" in p.log_text()


def test_stop_ends_the_instance_for_its_sessions_and_nonces(make_proxy, world):
    prefix = world.sub("stop")
    p = make_proxy(prefix=prefix)
    nonce, browser = opened(p, "s.csv")

    for ts, sign, status, code in (
        (None, "0" * 64, 403, "BAD_SIGNATURE"),
        (str(int(time.time()) - 3600), None, 403, "STALE_TIMESTAMP"),
    ):
        r = p.stop_instance(nonce, ts=ts, sign=sign)
        assert r.status_code == status and error_of(r) == code
    r = requests.post(p.url("/datalab/stop?" + urlencode({"ts": "1", "nonce": "../x"})), timeout=30)
    assert r.status_code == 400 and error_of(r) == "BAD_REQUEST"
    r = requests.get(p.url("/datalab/stop?ts=1&nonce=" + "n" * 32), timeout=30)
    assert r.status_code == 405 and error_of(r) == "METHOD_NOT_ALLOWED"
    assert browser.get("/api/status").status_code == 200  # refused stops changed nothing

    r = p.stop_instance(nonce)
    assert r.status_code == 200 and r.json() == {"code": "OK", "result": {}}
    assert world.containers(prefix) == [] and records(world, prefix) == set()  # gone when stop answers
    r = browser.get("/api/status")
    assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"
    r = p.stop_instance(nonce)
    assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"


def test_reconciliation_at_start_up(make_proxy, world):
    """While no proxy runs, one container vanishes and a stray one appears: the next proxy sorts both out."""
    prefix = world.sub("reconcile")
    first = make_proxy(prefix=prefix)
    nonce, browser = opened(first, "r.csv")
    vanished = instance_of(world, prefix, nonce)
    first.stop()
    world.docker.containers.get(vanished.handle).remove(force=True)
    labels = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: prefix, LABEL_INSTANCE: "stray" + "x" * 27}
    stray = world.docker.containers.create(IMAGE, labels=labels)

    browser.proxy = make_proxy(prefix=prefix, datalab_cull_interval=1)
    wait_until(lambda: not world.containers(prefix), "the stray container removed", 20)
    assert records(world, prefix) == set()
    r = browser.get("/api/status")
    assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"
    assert stray.id[:12] in browser.proxy.log_text()


def test_a_proxy_killed_mid_start_leaves_nothing(make_proxy, world):
    prefix = world.sub("crash")
    doomed = make_proxy(prefix=prefix, datalab_queue_timeout=1, datalab_start_timeout=8)
    upload = threading.Thread(target=quietly(doomed.upload), args=("k.csv", CSV))
    upload.start()
    wait_until(lambda: world.containers(prefix), "the start's container", 30)
    doomed.kill()
    upload.join()
    assert world.containers(prefix)  # orphaned by the crash

    make_proxy(prefix=prefix, datalab_cull_interval=1)
    # Its capacity lease (queue 1 s + start 8 s + margin) runs out, then reconciliation removes it.
    wait_until(lambda: not world.containers(prefix), "the orphan removed", 60)
    assert records(world, prefix) == set() and world.redis.zcard(prefix + "slots") == 0


def test_a_client_that_leaves_mid_start_leaves_nothing(make_proxy, world):
    prefix = world.sub("leave")
    p = make_proxy(prefix=prefix)
    ts = str(int(time.time()))
    query = urlencode({"ts": ts, "filename": "l.csv"})
    head = (
        f"POST /datalab/start?{query} HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n"
        f"X-SIGN: {signing.signature(p.sign_key, ts, 'l.csv')}\r\nContent-Length: {len(CSV)}\r\n\r\n"
    )
    client = socket.create_connection(("127.0.0.1", p.port))
    client.sendall(head.encode() + CSV)
    wait_until(lambda: world.containers(prefix), "the start's container", 30)
    client.close()  # gone before the answer
    wait_until(lambda: not world.containers(prefix), "the abandoned start's container removed", 30)
    time.sleep(1)
    assert records(world, prefix) == set() and world.redis.zcard(prefix + "slots") == 0
    assert not world.containers(prefix)


def test_two_proxies_cull_each_instance_once(make_proxy, world):
    prefix = world.sub("cullonce")
    options = {"datalab_idle_timeout": 2, "datalab_cull_interval": 1}
    a, b = make_proxy(prefix=prefix, **options), make_proxy(prefix=prefix, **options)
    ids = [instance_of(world, prefix, proxy.start_instance(f"{i}.csv", CSV)).id for i, proxy in enumerate((a, b))]
    wait_until(lambda: not world.containers(prefix) and not records(world, prefix), "both culled", 30)
    time.sleep(2)  # more rounds in both processes: nothing ends twice
    logs = a.log_text() + b.log_text()
    for instance_id in ids:
        assert logs.count(f"instance {instance_id} ended") == 1


def test_stopping_the_proxy_leaves_instances_running(make_proxy, world):
    prefix = world.sub("exit")
    p = make_proxy(prefix=prefix, datalab_pool_size=1)
    nonce = p.start_instance("e.csv", CSV)
    wait_until(lambda: pool(world, prefix), "a pooled instance")
    proc = p.proc
    p.stop()
    assert proc.returncode == 0
    assert "Traceback" not in p.log_text() and "Task was destroyed" not in p.log_text()
    assert len([c for c in world.containers(prefix) if c.status == "running"]) == 2  # live + pooled
    browser = Browser(make_proxy(prefix=prefix))
    browser.view(nonce)
    assert names_in_workdir(browser) == {"e.csv"}

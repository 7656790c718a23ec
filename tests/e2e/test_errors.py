"""Every error code of the "Errors" table (docs/api.md), provoked end to end as a client or a fault would:
real mitmdump processes, Redis, Docker and Jupyter, nothing mocked.

One table (ROWS): each row names a scenario, the status and the code the docs promise. Every
answer must be JSON {"code", "message"} with a message of the proxy's own words, and the refused
request must have created nothing: no container, no Redis key (a start that was accepted and then
failed keeps its used signature, `signed:<X-SIGN>`, and nothing else). A guard test reads the
docs' table, so a code added there without a row here (or the other way round) fails.

Proxies are shared between rows: they start in parallel when the first row runs, and rows that
need instances take them from boots started at the same time. Two key prefixes keep the checks
exact: QUIET, where nothing boots in the background, and LIVE, which holds the rows' instances.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import urlencode

import docker.errors
import pytest
import requests
import websockets.exceptions
import websockets.sync.client
from requests.structures import CaseInsensitiveDict

import inputs
import signing
from backends import Instance
from backends.container_spec import LABEL_PREFIX
from e2e import rawhttp
from e2e.proxy import ROOT
from e2e.proxy import Browser
from e2e.proxy import Proxy

CSV = b"x,y\n1,2\n"  # 8 bytes: under the plain proxy's 16-byte upload limit
EVIL = "http://evil.example"
MISSING_IMAGE = "datalab-no-such-image:latest"
ROW_OWNER = "errors-row-owner"  # the owner_limit row's: its instance ends in that row
# Keys background rounds set and delete on their own timers (reconciliation drops an ended owner's quota).
HOUSEKEEPING = ("lock:cull", f"owner:{ROW_OWNER}")
LEAKS = ("Traceback", "Errno", "http+docker", "unix://", "redis://", ".sock", "Connection refused", "docker.errors")
ANSWER_WITHIN = 20.0  # seconds: no refusal may leave a client hanging (the slowest is a 5 s probe)

QUIET, LIVE = "quiet", "live"

# name: (prefix, datalab_* options, Redis URL instead of the test Redis). Every proxy has no pool.
PROXIES: dict[str, tuple[str, dict, str | None]] = {
    "plain": (QUIET, {"datalab_max_upload": 16}, None),
    # A boot held to 5% of a CPU (the image's Jupyter needs about half a CPU second) cannot answer in 1 s.
    "slow": (QUIET, {"datalab_start_timeout": 1, "datalab_cpus": "0.05"}, None),
    "starved": (QUIET, {"datalab_pids_limit": 1}, None),  # no second process, no thread: Jupyter cannot run
    "no_image": (QUIET, {"datalab_image": MISSING_IMAGE}, None),
    "no_engine": (QUIET, {"datalab_backend": "docker", "datalab_docker_url": "unix://{workdir}/no-engine.sock"}, None),
    "no_redis": (QUIET, {}, "redis://127.0.0.1:1/0"),
    "subdomain": (QUIET, {"datalab_routing": "subdomain", "datalab_public_host": "localhost:{port}"}, None),
    "busy": (LIVE, {"datalab_boots_at_once": 3}, None),  # boots the rows' instances
    "full": (LIVE, {"datalab_max_instances": 1}, None),  # shares busy's capacity: full once one instance lives
    "hasty": (QUIET, {"datalab_upload_timeout": 2, "datalab_header_timeout": 2}, None),
    "narrow": (QUIET, {"datalab_uploads_at_once": 1}, None),
    "impatient": (LIVE, {"datalab_upstream_timeout": 2}, None),  # routes to busy's instances
    "owned": (LIVE, {"datalab_max_instances_per_owner": 1}, None),  # an owner holds one instance at most
}
# Seconds after a proxy answers by which it is surely past mitmproxy's start-up, during which an error
# in its log makes it exit: a row checks that its proxy is still there.
START_UP = 3.0
BOOTS = 3  # instances on LIVE: one shared (`live`), two for rows that end theirs


@dataclass
class Opened:
    """An instance started through the proxy and opened in a browser; how its start was signed."""

    filename: str
    nonce: str
    browser: Browser
    ts: str
    sign: str


@dataclass(frozen=True)
class State:
    containers: frozenset[str]
    keys: frozenset[str]
    capacity: frozenset[str]  # members of slots, instances, pool, poolboot: what a start takes


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float
    before: State
    after: State
    may_keep: frozenset[str] = field(default_factory=frozenset)  # keys a failed accepted start leaves


def sign_now(proxy: Proxy, subject: str) -> tuple[str, str]:
    """A fresh (ts, X-SIGN) for the subject: milliseconds, so each signature is new."""
    ts = str(int(time.time() * 1000))
    return ts, signing.signature(proxy.sign_key, ts, subject, proxy.scheme)


class Env:
    """The rows' proxies and instances, started in parallel; what a row needs is waited for there."""

    def __init__(self, world, redis_url: str, sign_key: str, tmp_path_factory):
        self.world = world
        self.redis_url = redis_url
        self.sign_key = sign_key
        self.tmp = tmp_path_factory
        self.prefixes = {QUIET: world.sub("errors"), LIVE: world.sub("errors-live")}
        world.prefixes.update(self.prefixes.values())
        self.started: list[Proxy] = []
        self._tasks = ThreadPoolExecutor(len(PROXIES) + BOOTS)
        self._proxies: dict[str, tuple[Proxy, Future[float]]] = {}
        for name, (where, options, redis_url_) in PROXIES.items():
            p = self.new_proxy(where, options, redis_url_)
            self._proxies[name] = p, self._tasks.submit(lambda p=p: (p.start(), time.monotonic())[1])
        self._boots = [self._tasks.submit(self._open, f"e{i}.csv") for i in range(BOOTS)]
        self._handed = 0
        self.stopped: set[str] = set()

    def new_proxy(self, where: str, options: dict, redis_url: str | None = None) -> Proxy:
        workdir = self.tmp.mktemp("proxy")
        options = {"datalab_pool_size": 0, **{k: str(v).replace("{workdir}", str(workdir)) for k, v in options.items()}}
        p = Proxy(redis_url or self.redis_url, self.prefixes[where], self.sign_key, workdir, options)
        self.started.append(p)
        return p

    def proxy(self, name: str) -> Proxy:
        """The named proxy, once it is past its start-up (an error logged then makes mitmproxy exit)."""
        p, started = self._proxies[name]
        while not started.done() and not self._exited(p):
            time.sleep(0.05)
        if not self._exited(p):
            time.sleep(max(0.0, started.result() + START_UP - time.monotonic()))
        assert not self._exited(p), f"the {name} proxy exited:\n{p.log_text()[-2000:]}"
        return p

    @staticmethod
    def _exited(p: Proxy) -> bool:
        return p.proc is not None and p.proc.poll() is not None

    def _open(self, filename: str) -> Opened:
        """Start an instance (its file named apart from the others: same ms, same name, same X-SIGN)."""
        busy, started = self._proxies["busy"]
        started.result()
        ts, sign = sign_now(busy, filename)
        r = busy.upload(filename, CSV, ts=ts, sign=sign)
        assert r.status_code == 200, r.text
        browser = Browser(busy)
        nonce = r.json()["result"]["nonce"]
        browser.view(nonce)
        return Opened(filename, nonce, browser, ts, sign)

    def _settled(self) -> list[Opened]:
        """Every boot on LIVE is over, so nothing changes there behind a row's back."""
        return [b.result() for b in self._boots]

    @property
    def live(self) -> Opened:
        """The instance rows share; it stays up for the whole module."""
        return self._settled()[0]

    def own(self) -> Opened:
        """An instance of the row's own, which the row ends."""
        self._handed += 1
        return self._settled()[self._handed]

    def stop(self, opened: Opened) -> None:
        """End an instance through the product (a signed stop); its container goes."""
        r = self.proxy("busy").stop_instance(opened.nonce)
        assert r.status_code == 200, r.text
        self.stopped.add(opened.nonce)

    def instance(self, opened: Opened) -> Instance:
        prefix = self.prefixes[LIVE]
        instance_id = self.world.redis.get(f"{prefix}nonce:{opened.nonce}").decode()
        return Instance.from_json(self.world.redis.get(f"{prefix}instance:{instance_id}"))

    def state(self, where: str) -> State:
        prefix = self.prefixes[where]
        keys = {k.decode() for k in self.world.keys(prefix)}
        capacity = set()
        for name in ("slots", "poolboot"):
            capacity |= {f"{name}:{m.decode()}" for m in self.world.redis.zrange(prefix + name, 0, -1)}
        capacity |= {f"instances:{m.decode()}" for m in self.world.redis.smembers(prefix + "instances")}
        capacity |= {f"pool:{m.decode()}" for m in self.world.redis.lrange(prefix + "pool", 0, -1)}
        return State(
            frozenset(c.id for c in self.world.containers(prefix)),
            frozenset(k for k in keys if k.removeprefix(prefix) not in HOUSEKEEPING),
            frozenset(capacity),
        )

    def ask(self, where: str, send: Callable[[], object], spends: str | None = None) -> Answer:
        """Send one request that must be refused, noting the state of `where` around it. `spends`:
        the X-SIGN of a start that passes the signature checks, whose used mark may stay."""
        before = self.state(where)
        began = time.monotonic()
        r = send()
        seconds = time.monotonic() - began
        if isinstance(r, requests.Response):
            status, headers, body = r.status_code, r.headers, r.content
        elif isinstance(r, tuple):
            status, headers, body = r
        else:  # a refused WebSocket handshake (websockets' Response)
            status, headers, body = r.status_code, r.headers, r.body
        may_keep = {f"{self.prefixes[where]}signed:{spends}"} if spends else set()
        return Answer(status, headers, body, seconds, before, self.state(where), frozenset(may_keep))

    def close(self) -> None:
        for b in self._boots:
            if b.exception() is None and b.result().nonce not in self.stopped:
                try:
                    self.stop(b.result())
                except AssertionError:
                    pass  # the session's scrub removes what is left
        list(self._tasks.map(Proxy.stop, self.started))
        self._tasks.shutdown(wait=False, cancel_futures=True)  # a start that failed may still be waiting


@pytest.fixture(scope="module")
def env(world, redis_server, sign_key, tmp_path_factory):
    e = Env(world, redis_server.url, sign_key, tmp_path_factory)
    yield e
    e.close()


# Scenarios. Each provokes its code as a client or a fault would, and returns the refusal.


def upload(proxy_name: str, filename: str = "a.csv", data=CSV, where: str = QUIET, spends: bool = False, **signed):
    """A start on the named proxy; `signed` may give ts and sign, else they are made fresh and right."""

    def scenario(env: Env) -> Answer:
        p = env.proxy(proxy_name)
        ts = signed.get("ts") or sign_now(p, filename)[0]
        sign = signed.get("sign") or signing.signature(p.sign_key, ts, filename, p.scheme)
        return env.ask(where, lambda: p.upload(filename, data, ts=ts, sign=sign), spends=sign if spends else None)

    return scenario


def plain_request(method: str, path: str, **kw):
    """A request to the plain proxy, with nothing of a session or a signature unless given."""

    def scenario(env: Env) -> Answer:
        url = env.proxy("plain").url(path)
        return env.ask(QUIET, lambda: requests.request(method, url, timeout=30, allow_redirects=False, **kw))

    return scenario


def chunked(*parts: bytes):
    yield from parts


def non_utf8_filename(env: Env) -> Answer:
    p = env.proxy("plain")
    query = f"ts={int(time.time())}&filename=%80"  # one byte that is no UTF-8 once percent-decoded
    return env.ask(QUIET, lambda: requests.post(p.url(f"/datalab/start?{query}"), data=CSV, timeout=30))


def stale(seconds: int):
    """Correctly signed, with a ts `seconds` from now (milliseconds for a future one)."""

    def scenario(env: Env) -> Answer:
        now = int(time.time())
        ts = str(now + seconds) if seconds < 0 else str((now + seconds) * 1000)
        return upload("plain", ts=ts, sign=signing.signature(env.sign_key, ts, "a.csv"))(env)

    return scenario


def too_large_streamed(env: Env) -> Answer:
    """No Content-Length: the limit is found while the body streams, after the signature was used."""
    return upload("plain", data=chunked(b"x" * 10, b"y" * 10), spends=True)(env)


def unknown_host(env: Env) -> Answer:
    """Subdomain routing: a proxied request to the main host (sent to 127.0.0.1, no DNS asked)."""
    p = env.proxy("subdomain")
    headers = {"Host": f"localhost:{p.port}"}
    return env.ask(QUIET, lambda: requests.get(p.url("/api/status"), headers=headers, timeout=30))


def boots_then_fails(proxy_name: str):
    """A start that is accepted and boots a container, which fails: the container must be gone
    when the answer comes (the engine's events show it created and destroyed)."""

    def scenario(env: Env) -> Answer:
        began = time.time()
        answer = upload(proxy_name, spends=True)(env)
        label = f"{LABEL_PREFIX}={env.prefixes[QUIET]}"
        events = env.world.docker.events(
            since=began - 1, until=time.time(), decode=True, filters={"type": "container", "label": label}
        )
        seen: dict[str, set[str]] = {}
        for event in events:
            seen.setdefault(event["Actor"]["ID"], set()).add(event["Action"])
            if event["Action"] == "create" and event["timeNano"] < began * 1e9:
                seen[event["Actor"]["ID"]].add("before this row")
        ours = [actions for actions in seen.values() if "create" in actions and "before this row" not in actions]
        assert len(ours) == 1 and {"start", "destroy"} <= ours[0], seen
        return answer

    return scenario


def image_missing(env: Env) -> Answer:
    answer = upload("no_image", spends=True)(env)
    with pytest.raises(docker.errors.ImageNotFound):
        env.world.docker.images.get(MISSING_IMAGE)  # refused, and never pulled
    return answer


def not_ready(env: Env) -> Answer:
    """A start sent the moment a (re)starting proxy listens, as a frontend retrying in a tight loop
    does: the proxy answers before its upload sink is up. It shares LIVE's capacity of one, which
    the live instance holds, so a start that got through would boot nothing (503 CAPACITY)."""
    env.live  # noqa: B018 -- holds the one slot
    p = env.new_proxy(LIVE, {"datalab_max_instances": 1})
    ts, sign = sign_now(p, "a.csv")
    path = "/datalab/start?" + urlencode({"ts": ts, "filename": "a.csv"})

    def first_answer() -> tuple[int, Mapping[str, str], bytes]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
            try:
                conn.request("POST", path, body=CSV, headers={"X-SIGN": sign})
                r = conn.getresponse()
                return r.status, r.headers, r.read()
            except ConnectionRefusedError:
                continue  # not listening yet
            finally:
                conn.close()
        raise TimeoutError("the proxy never listened")

    with ThreadPoolExecutor(1) as starting:
        started = starting.submit(p.start)
        try:
            return env.ask(LIVE, first_answer)
        finally:
            started.result()
            p.stop()


def replayed(env: Env) -> Answer:
    """An eavesdropper replays the start that made the live instance: same ts, same X-SIGN."""
    live = env.live
    busy = env.proxy("busy")
    return env.ask(LIVE, lambda: busy.upload(live.filename, CSV, ts=live.ts, sign=live.sign))


def bad_origin(env: Env) -> Answer:
    """A page of another site opens a WebSocket to the notebook; the victim's cookie rides along."""
    live = env.live
    url = f"ws://127.0.0.1:{env.proxy('busy').port}/api/kernels/{'k' * 32}/channels"

    def open_ws():
        try:
            with websockets.sync.client.connect(
                url, additional_headers={"Cookie": live.browser.cookie_header()}, origin=EVIL, open_timeout=30
            ):
                raise AssertionError("the WebSocket of another origin was accepted")
        except websockets.exceptions.InvalidStatus as e:
            return e.response

    return env.ask(LIVE, open_ws)


def static_websocket(env: Env) -> Answer:
    live = env.live
    url = env.proxy("busy").url(f"/datalab/static/{live.nonce}/api/kernels/x/channels")
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    return env.ask(LIVE, lambda: requests.get(url, headers=upgrade, timeout=30))


def capacity(env: Env) -> Answer:
    """One instance lives on the Redis and the capacity is one: a start on any proxy is refused."""
    env.live  # noqa: B018 -- holds the one slot
    answer = upload("full", where=LIVE, spends=True)(env)
    assert answer.headers.get("Retry-After") == "30", answer.headers  # every slot taken
    return answer


def raw(port: int, data: bytes) -> tuple[int, Mapping[str, str], bytes]:
    """Send raw bytes (a request cut short); the answer, which must close the connection."""
    reply = rawhttp.exchange(port, data, timeout=ANSWER_WITHIN)
    assert reply.closed, "the proxy closes the connection after this answer"
    return reply.status, CaseInsensitiveDict(reply.headers), reply.body


def stalled_upload(env: Env) -> Answer:
    """A start whose body stops after 1 KiB of 1 MB: cut at datalab_upload_timeout (2 s)."""
    p = env.proxy("hasty")
    ts, sign = sign_now(p, "a.csv")
    head = rawhttp.start_head(p.sign_key, "a.csv", 1_000_000, ts=ts)
    return env.ask(QUIET, lambda: raw(p.port, head + b"x" * 1024), spends=sign)


def slow_head(env: Env) -> Answer:
    """A request head that never ends (slowloris): cut at datalab_header_timeout (2 s)."""
    p = env.proxy("hasty")
    return env.ask(QUIET, lambda: raw(p.port, b"POST /datalab/start?ts=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SIGN: "))


def huge_head(env: Env) -> Answer:
    """A header value past datalab_max_head (64 KiB): refused before its head ends."""
    p = env.proxy("plain")
    head = b"POST /datalab/start?ts=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SIGN: " + b"a" * 70_000
    return env.ask(QUIET, lambda: raw(p.port, head))


def uploads_busy(env: Env) -> Answer:
    """datalab_uploads_at_once (1) bodies are arriving already (a signed one, stalled): a start is
    refused at once, before its signature is spent, with 64 KiB of its 10 MB body sent."""
    p = env.proxy("narrow")
    held = rawhttp.hold_upload(p.port, p.sign_key, "held.csv")
    try:
        head = rawhttp.start_head(p.sign_key, "a.csv", 10_000_000)
        answer = env.ask(QUIET, lambda: raw(p.port, head + b"x" * 65536))
    finally:
        held.close()
    assert answer.headers.get("Retry-After") == "5", answer.headers  # bodies in flight end soon
    return answer


def owner_limit(env: Env) -> Answer:
    """An owner holding its one instance starts another: refused before anything is spent or made."""
    owned = env.proxy("owned")
    env._settled()  # nothing boots on LIVE behind the row's back
    nonce, _ = owned.start_with_work("mine.csv", CSV, owner=ROW_OWNER)
    try:
        answer = env.ask(LIVE, lambda: owned.upload("again.csv", CSV, owner=ROW_OWNER))
    finally:
        assert owned.stop_instance(nonce).status_code == 200
    assert answer.headers.get("Retry-After") == "30", answer.headers
    return answer


def instance_gone(env: Env) -> Answer:
    """The browser's instance was stopped by the frontend; the browser carries on."""
    opened = env.own()
    env.stop(opened)
    return env.ask(LIVE, lambda: opened.browser.get("/api/status"))


def instance_unreachable(env: Env) -> Answer:
    """The instance's Jupyter hangs (stopped by a signal: its container still runs, nothing answers)."""
    opened = env.own()
    try:
        container = env.world.docker.containers.get(env.instance(opened).handle)
        # PID 1 is tini; its one child is the Jupyter server, which the signal freezes.
        frozen = container.exec_run(["sh", "-c", "kill -STOP $(cat /proc/1/task/1/children)"])
        assert frozen.exit_code == 0, frozen.output
        url = env.proxy("busy").url(f"/datalab/static/{opened.nonce}/files/{opened.filename}")
        return env.ask(LIVE, lambda: requests.get(url, timeout=60))
    finally:
        env.stop(opened)


def upstream_timeout(env: Env) -> Answer:
    """The shared instance's Jupyter frozen (as above) while a routed request waits for its answer;
    it runs again after."""
    live = env.live
    container = env.world.docker.containers.get(env.instance(live).handle)
    cookies = {"datalab_session": live.browser.http.cookies["datalab_session"]}
    url = env.proxy("impatient").url("/api/status")
    frozen = container.exec_run(["sh", "-c", "kill -STOP $(cat /proc/1/task/1/children)"])
    assert frozen.exit_code == 0, frozen.output
    try:
        return env.ask(LIVE, lambda: requests.get(url, cookies=cookies, timeout=60))
    finally:
        container.exec_run(["sh", "-c", "kill -CONT $(cat /proc/1/task/1/children)"])


def unhealthy(env: Env) -> Answer:
    """Health asked of a proxy whose Redis is away (its body also names each part: `result`)."""
    url = env.proxy("no_redis").url("/datalab/health")
    return env.ask(QUIET, lambda: requests.get(url, timeout=30))


def bad_route(env: Env) -> Answer:
    """Whoever can write to Redis points the live instance's record at a service of this host
    (here Redis's port): the proxy refuses to route there. The record is put back after."""
    live = env.live
    real = env.instance(live)
    key = f"{env.prefixes[LIVE]}instance:{real.id}"
    env.world.redis.set(key, json.dumps(json.loads(real.to_json()) | {"host": "127.0.0.1", "port": 6379}))
    try:
        url = env.proxy("busy").url(f"/datalab/static/{live.nonce}/files/{live.filename}")
        return env.ask(LIVE, lambda: requests.get(url, timeout=30))
    finally:
        env.world.redis.set(key, real.to_json())


def unknown_profile(env: Env) -> Answer:
    """A rightly signed start naming a profile the operator never declared: refused before its
    signature is spent or its body read."""
    p = env.proxy("plain")
    return env.ask(QUIET, lambda: p.upload("a.csv", CSV, profile="no-such-profile"))


# The table: every code of docs/api.md's Errors table, except EXEMPT. Statuses are the docs'.
ROWS = [
    ("bad_request-traversal_filename", upload("plain", "../../etc/passwd"), 400, "BAD_REQUEST"),
    ("bad_request-slash_filename", upload("plain", "dir/a.csv"), 400, "BAD_REQUEST"),
    ("bad_request-nul_filename", upload("plain", "a\x00.csv"), 400, "BAD_REQUEST"),
    ("bad_request-missing_ts", plain_request("POST", "/datalab/start?filename=a.csv", data=CSV), 400, "BAD_REQUEST"),
    ("bad_request-non_utf8_filename", non_utf8_filename, 400, "BAD_REQUEST"),
    ("bad_request-malformed_nonce", plain_request("POST", "/datalab/stop?ts=1&nonce=../x"), 400, "BAD_REQUEST"),
    ("profile_unknown", unknown_profile, 400, "PROFILE_UNKNOWN"),
    ("bad_signature", upload("plain", sign="0" * 64), 403, "BAD_SIGNATURE"),
    ("stale_timestamp-past", stale(-3600), 403, "STALE_TIMESTAMP"),
    ("stale_timestamp-future_ms", stale(3600), 403, "STALE_TIMESTAMP"),
    ("no_session-no_cookie", plain_request("GET", "/api/status"), 403, "NO_SESSION"),
    (
        "no_session-unknown_cookie",
        plain_request("GET", "/api/status", cookies={"datalab_session": "A" * 32}),
        403,
        "NO_SESSION",
    ),
    ("nonce_unknown", plain_request("GET", f"/datalab/view/{inputs.new_token()}/tree"), 404, "NONCE_UNKNOWN"),
    ("not_found", plain_request("GET", "/datalab/nothing"), 404, "NOT_FOUND"),
    ("unknown_host", unknown_host, 404, "UNKNOWN_HOST"),
    (
        "method_not_allowed-get_start",
        plain_request("GET", "/datalab/start?ts=1&filename=a.csv"),
        405,
        "METHOD_NOT_ALLOWED",
    ),
    (
        "method_not_allowed-delete_view",
        plain_request("DELETE", f"/datalab/view/{inputs.new_token()}/tree"),
        405,
        "METHOD_NOT_ALLOWED",
    ),
    ("upload_too_large-declared", upload("plain", data=b"x" * 17), 413, "UPLOAD_TOO_LARGE"),
    ("upload_too_large-streamed", too_large_streamed, 413, "UPLOAD_TOO_LARGE"),
    ("start_failed", boots_then_fails("starved"), 502, "START_FAILED"),
    ("redis_unavailable", upload("no_redis"), 503, "REDIS_UNAVAILABLE"),
    ("engine_unavailable", upload("no_engine", spends=True), 503, "ENGINE_UNAVAILABLE"),
    ("image_missing", image_missing, 503, "IMAGE_MISSING"),
    ("start_timeout", boots_then_fails("slow"), 504, "START_TIMEOUT"),
    # On LIVE, once its boots are over.
    ("replayed", replayed, 403, "REPLAYED"),
    ("bad_origin", bad_origin, 403, "BAD_ORIGIN"),
    ("bad_request-static_websocket", static_websocket, 400, "BAD_REQUEST"),
    ("capacity", capacity, 503, "CAPACITY"),
    ("capacity-uploads_arriving", uploads_busy, 503, "CAPACITY"),
    ("owner_limit", owner_limit, 429, "OWNER_LIMIT"),
    ("upload_timeout", stalled_upload, 408, "UPLOAD_TIMEOUT"),
    ("header_timeout", slow_head, 408, "HEADER_TIMEOUT"),
    ("head_too_large", huge_head, 431, "HEAD_TOO_LARGE"),
    ("not_ready", not_ready, 503, "NOT_READY"),
    ("instance_gone", instance_gone, 410, "INSTANCE_GONE"),
    ("instance_unreachable", instance_unreachable, 502, "INSTANCE_UNREACHABLE"),
    ("upstream_timeout", upstream_timeout, 504, "UPSTREAM_TIMEOUT"),
    ("bad_route", bad_route, 502, "BAD_ROUTE"),
    ("unhealthy", unhealthy, 503, "UNHEALTHY"),
]

# Codes the docs name that have no row, and why no client or fault can provoke them. (CLIENT_GONE
# is in the docs' text below the table, not in it; should it move into the table, it stays exempt.)
EXEMPT = {
    "INTERNAL": "the proxy's answer to its own bug (an unexpected exception): no outside request provokes it",
    "NOT_ROUTED": "the proxy's answer to its own bug (a flow no addon claimed): no outside request provokes it",
    "NOT_CONFIGURED": (
        "mitmdump and mitmweb exit at start-up when a datalab_* option is invalid (the addon's OptionsError "
        "stops them), and a live change to an invalid value is rolled back, so a listening proxy always has "
        "valid options"
    ),
    "CLIENT_GONE": "only logged: the client that would receive it has hung up",
}


@pytest.mark.parametrize("scenario, status, code", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_every_documented_error(env, scenario, status, code):
    answer = scenario(env)
    assert (answer.status, answer.headers.get("Content-Type")) == (status, "application/json"), answer.body[:300]
    body = json.loads(answer.body)
    extra = {"result"} if code == "UNHEALTHY" else set()  # health says which part failed
    assert set(body) == {"code", "message"} | extra and body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip()
    assert not [leak for leak in LEAKS if leak in body["message"]], body["message"]
    if status == 405:
        assert answer.headers.get("Allow"), "a 405 names the allowed methods"
    if code == "CAPACITY":
        assert answer.headers.get("Retry-After", "").isdigit(), answer.headers  # which one: the row's own check
    assert answer.seconds < ANSWER_WITHIN

    created = answer.after.containers - answer.before.containers
    removed = answer.before.containers - answer.after.containers
    assert (created, removed) == (set(), set()), "a refused request starts or ends no container"
    assert answer.after.keys - answer.before.keys <= answer.may_keep
    assert answer.before.keys <= answer.after.keys, "a refused request ends nothing"
    assert answer.after.capacity == answer.before.capacity, "a refused start holds no slot"


def documented_errors() -> tuple[dict[str, int], str]:
    """docs/api.md's Errors table as code -> status, and the whole Errors section's text."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or not cells[0].isdigit():
            continue
        for code in re.findall(r"`([A-Z_]+)`", cells[1]):
            assert documented.setdefault(code, int(cells[0])) == int(cells[0]), f"{code} has two statuses"
    return documented, section


def test_the_table_covers_every_documented_error():
    documented, section = documented_errors()
    assert documented, "docs/api.md's Errors table was not found"
    covered = {code for _, _, _, code in ROWS}
    assert set(documented) - covered - set(EXEMPT) == set(), "documented codes without a row here"
    assert covered - set(documented) == set(), "rows for codes the docs do not list"
    assert [row for row in ROWS if documented.get(row[3]) != row[2]] == [], "rows whose status is not the docs'"
    assert covered & set(EXEMPT) == set(), "a code with a row needs no exemption"
    assert [code for code in EXEMPT if code not in section] == [], "exempt codes the docs no longer name"

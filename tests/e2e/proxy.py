"""A real mitmdump process running the addon, and a browser-like client for it."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode
from urllib.parse import urlsplit

import requests
import websockets.sync.client

import signing
from helpers import free_port
from helpers import wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Proxy:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        sign_key: str,
        workdir: Path,
        options: dict | None = None,
        tool="mitmdump",
        args: list[str] | None = None,
        url_scheme: str = "http",
        verify: str | bool = True,
    ):
        """`args`: more mitmproxy arguments (e.g. ["--certs", "*=combined.pem"]); `url_scheme`: the scheme
        of `base` ("https" to talk TLS to the listening port); `verify`: requests' verify for this
        class's own requests (a CA bundle path)."""
        self.tool = tool
        self.args = list(args or [])
        self.url_scheme = url_scheme
        self.verify = verify
        self.redis_url = redis_url
        self.prefix = prefix
        self.sign_key = sign_key
        self.workdir = workdir
        self.options = options or {}
        self.scheme = self.options.get("datalab_sign_scheme", "sha256")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"{self.url_scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> Proxy:
        sets = {
            "datalab_sign_key": self.sign_key,
            # Explicit: auto would pick local processes if the engine were slow to answer (tests of
            # auto and of the process backend say so themselves).
            "datalab_backend": "docker",
            # The suite leaves most instances it starts to the end-of-run scrub; the engine's memory
            # at the 1g default (24 here) is fewer than one run's live instances under its prefix.
            # Idle instances use ~100-200 MiB each, so 48 fit this machine. Tests of capacity set it.
            "datalab_max_instances": 48,
            "datalab_redis_url": self.redis_url,
            "datalab_key_prefix": self.prefix,
            "connection_strategy": "lazy",
            "keep_host_header": "true",
            **self.options,
        }
        if self.tool == "mitmweb":
            sets |= {"web_open_browser": "false", "web_port": str(free_port())}
        if self.tool == "lean":  # the production entry point (run.sh --lean)
            args = [str(BIN / "python"), str(ROOT / "addon" / "lean.py")]
        else:
            args = [str(BIN / self.tool), "-s", str(ROOT / "addon" / "datalab.py")]
        args += ["--mode", "reverse:http://127.0.0.1:1"]
        args += ["--listen-host", "127.0.0.1", "--listen-port", str(self.port)]
        for name, value in sets.items():  # "{port}" in a value: the port this proxy listens on
            args += ["--set", f"{name}={str(value).replace('{port}', str(self.port))}"]
        args += self.args
        self.log = self.workdir / "mitmdump.log"
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_for_port(self.port, proc=self.proc)
        self._wait_answering()
        return self

    def _wait_answering(self, timeout: float = 30.0) -> None:
        """Listening is not ready: wait until the addon itself answers (and the process is still up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = requests.get(self.url("/datalab/"), timeout=2, verify=self.verify)
                if r.status_code == 404 and r.json()["code"] == "NOT_FOUND":
                    time.sleep(0.2)
                    assert self.proc.poll() is None, f"{self.tool} exited at start-up; see {self.log}"
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.tool} did not answer in {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no clean-up of any kind."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop_instance(self, nonce: str, ts: str | None = None, sign: str | None = None) -> requests.Response:
        ts = str(int(time.time() * 1000)) if ts is None else ts  # milliseconds: each signature is used once
        sign = signing.signature(self.sign_key, ts, nonce, self.scheme) if sign is None else sign
        query = urlencode({"ts": ts, "nonce": nonce})
        return requests.post(
            self.url(f"/datalab/stop?{query}"), headers={"X-SIGN": sign}, timeout=60, verify=self.verify
        )

    def upload(
        self,
        filename: str,
        data: bytes,
        ts: str | None = None,
        sign: str | None = None,
        unpack: bool = False,
        accept: str | None = None,
        **extras: str,
    ) -> requests.Response:
        """A signed start; `extras` (owner=, profile=) and unpack are signed after the filename. With
        `accept`, its Accept header (text/event-stream: its progress, read with `events_of`)."""
        ts = str(int(time.time() * 1000)) if ts is None else ts
        extras = {**extras, **({"unpack": "1"} if unpack else {})}
        subject = signing.start_subject(filename, extras)
        sign = signing.signature(self.sign_key, ts, subject, self.scheme) if sign is None else sign
        query = urlencode({"ts": ts, "filename": filename, **extras})
        return requests.post(
            self.url(f"/datalab/start?{query}"),
            data=data,
            headers={
                "X-SIGN": sign,
                "Content-Type": "application/octet-stream",
                **({"Accept": accept} if accept else {}),
            },
            timeout=120,
            verify=self.verify,
            stream=bool(accept),
        )

    def start_instance(self, filename: str, data: bytes) -> str:
        return self.start_with_work(filename, data)[0]

    def start_with_work(self, filename: str, data: bytes, unpack: bool = False, **extras: str) -> tuple[str, str]:
        """Start an instance; its nonce and its work's id."""
        r = self.upload(filename, data, unpack=unpack, **extras)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["code"] == "OK"
        return body["result"]["nonce"], body["result"]["work"]

    def work(self, work_id: str, method: str = "GET", ts: str | None = None, sign: str | None = None, **kw):
        """The frontend's server fetching (or deleting) a user's work, signed like a stop."""
        ts = str(int(time.time() * 1000)) if ts is None else ts
        sign = signing.signature(self.sign_key, ts, work_id, self.scheme) if sign is None else sign
        return requests.request(
            method, self.url(f"/datalab/work/{work_id}?ts={ts}"), headers={"X-SIGN": sign}, timeout=120, **kw
        )

    def instances(self, owner: str | None = None, work: str | None = None, **kw) -> requests.Response:
        """The instance API, as the frontend's server asks it: an owner's instances, or one by its
        work id; signed over the method and path (and owner), never spent."""
        ts = str(int(time.time() * 1000))
        if work is not None:
            path, subject = f"/datalab/instances/{work}?ts={ts}", signing.instance_subject(work)
        else:
            path = f"/datalab/instances?{urlencode({'ts': ts, 'owner': owner})}"
            subject = signing.owner_listing_subject(owner)
        headers = {"X-SIGN": signing.signature(self.sign_key, ts, subject, self.scheme), **kw.pop("headers", {})}
        return requests.get(self.url(path), headers=headers, timeout=30, verify=self.verify, **kw)


class Browser:
    """One browser page: its cookie jar (a jar may be shared by several pages of one browser), on
    the page's origin `base` (the proxy's own by default; an instance's host in subdomain routing)."""

    def __init__(self, proxy: Proxy, base: str | None = None, http: requests.Session | None = None):
        self.proxy = proxy
        self._base = base
        self.http = http or requests.Session()

    @property
    def base(self) -> str:
        return self._base or self.proxy.base  # follows `proxy` when a test swaps it (a restart)

    def url(self, path: str) -> str:
        return self.base + path

    def view(self, nonce: str, destination: str = "tree") -> requests.Response:
        r = self.http.get(self.url(f"/datalab/view/{nonce}/{destination}"), allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        return r

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url(path), timeout=30, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.url(path), timeout=60, **kw)

    def cookie_header(self) -> str:
        """The cookies the jar holds for this page's host (what a browser would send with a WebSocket)."""
        host = urlsplit(self.base).hostname
        return "; ".join(
            f"{c.name}={c.value}" for c in self.http.cookies if c.domain.lstrip(".") in (host, f"{host}.local")
        )

    def start_kernel(self) -> str:
        self.get("/tree")  # as a browser does: Jupyter's page sets the _xsrf cookie
        xsrf = self.http.cookies.get("_xsrf")
        r = self.post("/api/kernels", json={"name": "python3"}, headers={"X-XSRFToken": xsrf or ""})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def execute(
        self,
        kernel_id: str,
        code: str,
        timeout: float = 90.0,
        origin: str | None = None,
        displays: list[dict] | None = None,
    ) -> str:
        """Run code over the kernel's WebSocket channel, through the proxy, as a page of `origin`
        (this page's own by default); return its stdout. The content of each display_data message
        it sends (a plot, say) goes into `displays` when given."""
        with self.kernel_channels(kernel_id, origin) as ws:
            return run_code(ws, code, timeout, displays)

    def kernel_channels(self, kernel_id: str, origin: str | None = None):
        """The kernel's WebSocket channel, opened through the proxy as a page of `origin` (this
        page's own by default): a context manager."""
        ws_base = "ws" + self.base.removeprefix("http")
        ws_url = f"{ws_base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        # over wss://, trust what this page's HTTP client trusts (a test's CA bundle, say)
        trusted = self.http.verify if isinstance(self.http.verify, str) else None
        tls = ssl.create_default_context(cafile=trusted) if ws_url.startswith("wss:") else None
        if tls is not None:
            # websockets' sync client reads its socket in a thread of its own while this one sends:
            # one SSL object used from two threads at once, which OpenSSL does not allow. Over TLS 1.3
            # (whose session tickets arrive after the handshake) an upgrade request now and then (one
            # in a few hundred here) never left the client: the proxy's socket had received only the
            # handshake, and it closed the connection at datalab_header_timeout. Browsers have no
            # such race; plain HTTP over TLS 1.3 is tested by the requests library's clients.
            tls.maximum_version = ssl.TLSVersion.TLSv1_2
        return websockets.sync.client.connect(
            ws_url,
            ssl=tls,
            additional_headers={"Cookie": self.cookie_header()},
            origin=origin or self.base,
            open_timeout=90,  # Jupyter answers the upgrade once the new kernel replied to kernel_info (up to 60 s)
        )


def run_code(ws, code: str, timeout: float = 90.0, displays: list[dict] | None = None) -> str:
    """Send an execute_request on an open kernel channel and return the code's stdout once the
    kernel is idle again (display_data contents go into `displays` when given)."""
    request = execute_request(code)
    msg_id = request["header"]["msg_id"]
    out: list[str] = []
    deadline = time.monotonic() + timeout
    ws.send(json.dumps(request))
    while time.monotonic() < deadline:
        msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "display_data" and displays is not None:
            displays.append(msg["content"])
        elif kind == "error":
            raise AssertionError("kernel error: " + "\n".join(msg["content"]["traceback"]))
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)
    raise TimeoutError("the kernel did not finish in time")


def execute_request(code: str) -> dict:
    """A kernel channel's execute_request message running `code` (its header's msg_id is fresh)."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "username": "e2e",
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "channel": "shell",
        "buffers": [],
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    }


def events_of(answer: requests.Response) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a start's progress answer, read as they come until it ends."""
    events, name, data = [], "", ""
    for line in answer.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif line == "" and name:
            events.append((name, json.loads(data)))
            name, data = "", ""
    return events

"""What a user's own code can reach from inside its instance, tried from a running kernel: real
containers on the proxy's instance network, real Redis and mitmdump. Every address tried is on
this machine; that nothing leaves it is read from the network's settings and the host's firewall,
never by contacting an outside address."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import threading
import time

import pytest
import requests

from backends import Instance
from e2e.helpers import record
from e2e.proxy import Browser
from helpers import host_address

CSV = b"a\n1\n"

PROBE = """
import errno, socket
def probe(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "open"
    except OSError as e:
        return "blocked" if isinstance(e, (TimeoutError, ConnectionRefusedError)) or e.errno in (
            errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT) else repr(e)
"""


class HostService:
    """A service of the host bound to every address (0.0.0.0), as Redis or a database might be."""

    def __init__(self):
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def host_service():
    service = HostService()
    yield service
    service.close()


def run(browser: Browser, code: str) -> dict:
    """Run code in the browser's instance; it prints one JSON object."""
    return json.loads(browser.execute(browser.start_kernel(), PROBE + code).strip().splitlines()[-1])


def bridge_of(network) -> str:
    return network.attrs["Options"]["com.docker.network.bridge.name"]


def gateway_of(world, instance: Instance) -> str:
    """The host's address on the instance's network: where its default route points."""
    container = world.docker.containers.get(instance.handle)
    (name,) = container.attrs["NetworkSettings"]["Networks"]
    return host_address(bridge_of(world.docker.networks.get(name)))


def test_an_instance_reaches_no_neighbour_and_no_host_service(proxy, world, host_service):
    """The host service stands for any: the proxy's port, Redis or a TCP Docker API bound to all
    addresses are reached the same way (and the Docker socket is not in the container at all)."""
    a, b = proxy.start_instance("a.csv", CSV), proxy.start_instance("b.csv", CSV)
    mine, neighbour = record(world, a), record(world, b)
    gateway = gateway_of(world, mine)
    docker0 = host_address(bridge_of(world.docker.networks.get("bridge")))  # another host address
    # the checks are worth something only if these are open from where they are meant to be used
    with socket.create_connection((gateway, host_service.port), timeout=3):
        pass  # the host reaches its own service at the bridge address
    assert requests.get(f"http://{neighbour.host}:{neighbour.port}/api", timeout=10).status_code == 200

    browser = Browser(proxy)
    browser.view(a)
    seen = run(
        browser,
        f"import json; print(json.dumps({{"
        f"'neighbour': probe('{neighbour.host}', {neighbour.port}),"
        f"'host_service_via_gateway': probe('{gateway}', {host_service.port}),"
        f"'host_service_via_docker0': probe('{docker0}', {host_service.port}),"
        f"'docker_socket': __import__('os').path.exists('/var/run/docker.sock') or "
        f"__import__('os').path.exists('/run/docker.sock'),"
        f"}}))",
    )
    assert seen == {
        "neighbour": "blocked",
        "host_service_via_gateway": "blocked",
        "host_service_via_docker0": "blocked",
        "docker_socket": False,
    }
    accepted = host_service.accepted
    time.sleep(0.5)
    assert host_service.accepted == accepted == 1  # only the host's own connection above


def test_no_egress_by_default_as_the_network_settings_show(proxy, world):
    """Proven from settings, never by contacting an outside address: the network is Docker-internal
    (Docker drops anything from its bridge that leaves its subnet), and the host drops new
    connections from the bridge to itself, which is where the instance's default route points."""
    instance = record(world, proxy.start_instance("route.csv", CSV))
    container = world.docker.containers.get(instance.handle)
    (name,) = container.attrs["NetworkSettings"]["Networks"]
    network = world.docker.networks.get(name)
    assert network.attrs["Internal"] is True
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    bridge = network.attrs["Options"]["com.docker.network.bridge.name"]
    subnet = network.attrs["IPAM"]["Config"][0]["Subnet"]
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout
    assert f"-A INPUT -i {bridge} -m conntrack --ctstate INVALID,NEW -j DROP" in rules
    assert any(f"-i {bridge}" in r and f"! -d {subnet}" in r and r.endswith("-j DROP") for r in rules.splitlines())


def test_the_file_system_is_read_only_but_for_bounded_work_and_tmp_and_has_no_set_uid_program(make_proxy, world):
    prefix = world.sub("disk")
    p = make_proxy(prefix=prefix, datalab_disk_limit="8m")
    browser = Browser(p)
    browser.view(p.start_instance("d.csv", CSV))
    seen = run(
        browser,
        """
import json, os
def write(path, size):
    try:
        with open(path, "wb") as f:
            for _ in range(size // 65536):
                f.write(b"x" * 65536)
                f.flush()
        return "written"
    except OSError as e:
        return errno.errorcode[e.errno]
root = [l.split() for l in open("/proc/mounts") if l.split()[1] == "/"][-1][3].split(",")[0]
def set_id(top):
    paths = (os.path.join(d, f) for d, _, files in os.walk(top) for f in files)
    return [p for p in paths if not os.path.islink(p) and os.lstat(p).st_mode & 0o6000]
print(json.dumps({
    "set_id_programs": set_id("/usr") + set_id("/opt"),
    "root": root,
    "home": write("/home/datalab/x", 65536),
    "etc": write("/etc/x", 65536),
    "work_small": write("d2.csv", 1 << 20),
    "work_past_limit": write("big", 16 << 20),
    "tmp_past_limit": write("/tmp/big", 16 << 20),
    "uid": os.getuid(),
}))
""",
    )
    assert seen == {
        "set_id_programs": [],  # (su, passwd...: on Swarm, which cannot ask for no-new-privileges, uid 0)
        "root": "ro",
        "home": "EROFS",
        "etc": "EROFS",
        "work_small": "written",
        "work_past_limit": "ENOSPC",
        "tmp_past_limit": "ENOSPC",
        "uid": 1000,
    }
    (container,) = world.containers(prefix)
    mounts = world.docker.api.inspect_container(container.id)["Mounts"]
    # nothing of the host but an empty file, read-only, as resolv.conf; no volume (the tmpfs mounts
    # are not listed here)
    assert [(m["Type"], m["Source"], m["Destination"], m["RW"]) for m in mounts] == [
        ("bind", "/dev/null", "/etc/resolv.conf", False)
    ]


FILL = """
import errno, json, os
def fill(directory):
    \"\"\"Write one file in `directory` until the write fails (4 GiB at most); how it failed.\"\"\"
    try:
        with open(os.path.join(directory, "fill"), "wb", buffering=0) as f:
            for _ in range(4096):
                f.write(b"x" * (1 << 20))
        return "written"
    except OSError as e:
        return errno.errorcode.get(e.errno, repr(e))
def fill_with_files(directory):
    \"\"\"Create empty files (which take no pages, only the kernel's record of them) until it fails.\"\"\"
    os.makedirs(os.path.join(directory, "many"))
    try:
        for n in range(1 << 22):
            open(os.path.join(directory, "many", str(n)), "wb").close()
        return "written"
    except OSError as e:
        return errno.errorcode.get(e.errno, repr(e))
"""


def test_filling_every_writable_place_fails_with_enospc_and_the_instance_lives(make_proxy, world):
    """The in-memory mounts are memory counted against the instance's limit: filled, they must leave
    room for Jupyter and a kernel (datalab_disk_limit=auto sizes them so), or the whole instance
    would be OOM-killed, its files lost, instead of a write failing with ENOSPC."""
    prefix = world.sub("full")
    p = make_proxy(prefix=prefix, datalab_mem_limit="512m")  # the disk limit: auto
    browser = Browser(p)
    nonce = p.start_instance("f.csv", CSV)
    browser.view(nonce)
    kernel = browser.start_kernel()
    began = time.time()
    code = (
        FILL
        + """
kernel = os.getpid()
print(json.dumps({place: [fill(place), fill_with_files(place)] for place in
    ("/home/datalab/work", "/tmp", "/dev/shm")}))
"""
    )
    filled = json.loads(browser.execute(kernel, code).strip().splitlines()[-1])
    assert filled == {place: ["ENOSPC", "ENOSPC"] for place in ("/home/datalab/work", "/tmp", "/dev/shm")}
    # the same kernel, with everything full, still runs code, pandas included
    after = browser.execute(kernel, "import pandas; print(os.getpid() == kernel, pandas.Series([1, 2]).sum())")
    assert after.split() == ["True", "3"]
    assert browser.get("/api/status").status_code == 200  # through the proxy
    assert requests.get(p.url(f"/datalab/static/{nonce}/files/f.csv"), timeout=30).content == CSV  # the upload is there
    (found,) = world.containers(prefix)
    state = world.docker.api.inspect_container(found.id)
    assert (state["State"]["Status"], state["State"]["OOMKilled"], state["RestartCount"]) == ("running", False, 0)
    ooms = world.docker.events(
        since=began, until=time.time(), decode=True, filters={"container": found.id, "event": "oom"}
    )
    assert list(ooms) == []  # not even one of its processes


def test_an_instance_has_no_name_server(proxy, world):
    """Docker's embedded DNS (127.0.0.11) forwards to the host's name servers (from the host's own
    namespace when they are loopback ones: CVE-2024-29018): a way out. Shown from the container's
    settings and its resolv.conf as the kernel reads it; no name is ever looked up but localhost,
    which /etc/hosts answers."""
    nonce = proxy.start_instance("n.csv", CSV)
    instance = record(world, nonce)
    attrs = world.docker.api.inspect_container(instance.handle)
    # the embedded server's only upstream: the container's own loopback, where nothing answers
    assert attrs["HostConfig"]["Dns"] == ["127.0.0.1"]
    assert {"Type": "bind", "Source": "/dev/null", "Destination": "/etc/resolv.conf", "RW": False}.items() <= next(
        m for m in attrs["Mounts"] if m["Destination"] == "/etc/resolv.conf"
    ).items()
    browser = Browser(proxy)
    browser.view(nonce)
    seen = run(
        browser,
        "import json; print(json.dumps({'resolv.conf': open('/etc/resolv.conf').read(), "
        "'localhost': socket.getaddrinfo('localhost', 8888, socket.AF_INET)[0][4][0]}))",
    )
    assert seen == {"resolv.conf": "", "localhost": "127.0.0.1"}  # no nameserver line, no 127.0.0.11


def test_a_forged_record_is_never_routed(proxy, world, host_service):
    """Whoever can write to Redis must not point the proxy anywhere: a record naming an address the
    backend never gives is refused and logged; nothing connects there."""
    nonce = proxy.start_instance("f.csv", CSV)
    real = record(world, nonce)
    forged = json.loads(real.to_json()) | {"host": "127.0.0.1", "port": host_service.port}
    world.redis.set(f"{world.prefix}instance:{real.id}", json.dumps(forged))
    try:
        r = requests.get(proxy.url(f"/datalab/view/{nonce}/tree"), allow_redirects=False, timeout=30)
        assert r.status_code == 502 and r.json()["code"] == "BAD_ROUTE"
        r = requests.get(proxy.url(f"/datalab/static/{nonce}/files/f.csv"), timeout=30)
        assert r.status_code == 502 and r.json()["code"] == "BAD_ROUTE"
        time.sleep(0.5)
        assert host_service.accepted == 0
        assert "not an address of its backend" in proxy.log_text()
    finally:
        world.redis.set(f"{world.prefix}instance:{real.id}", real.to_json())


def test_egress_on_opens_the_outside_only(make_proxy, world, host_service):
    """datalab_instance_egress=true: a network of its own that Docker lets out (NAT); the host's own
    services and the neighbours stay closed."""
    prefix = world.sub("egress")
    p = make_proxy(prefix=prefix, datalab_instance_egress="true")
    browser = Browser(p)
    nonce = p.start_instance("e.csv", CSV)
    browser.view(nonce)
    instance = record(world, nonce, prefix)
    container = world.docker.containers.get(instance.handle)
    (name,) = container.attrs["NetworkSettings"]["Networks"]
    network = world.docker.networks.get(name)
    assert (
        network.attrs["Internal"] is False
        and network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    )
    assert ipaddress.ip_address(instance.host) in ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
    gateway = gateway_of(world, instance)
    seen = run(browser, f"import json; print(json.dumps({{'host': probe('{gateway}', {host_service.port})}}))")
    assert seen == {"host": "blocked"}

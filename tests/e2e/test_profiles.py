"""Profiles end to end (real mitmdump, Redis and containers): a start that names a profile gets a
container with that profile's memory limit and environment; the default is untouched; a bad
profiles file, or a profile its backend cannot honour, stops the proxy at start-up with a message
naming the profile and the field. (An unknown profile is a row of test_errors.py: 400
PROFILE_UNKNOWN, nothing started, nothing held.)"""

from __future__ import annotations

import contextlib
import json

import pytest

from e2e.helpers import CSV
from e2e.helpers import error_of
from e2e.helpers import instance_of
from e2e.proxy import Proxy

PROFILES = {"big": {"mem_limit": "2g", "cpus": 0.5, "env": {"COURSE": "ml", "LEVEL": "two words"}}}


def container_of(world, prefix: str, nonce: str) -> dict:
    """The engine's inspection of the container a nonce's instance runs in."""
    return world.docker.api.inspect_container(instance_of(world, prefix, nonce).handle)


def test_a_profile_is_what_its_container_gets(make_proxy, world, tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(PROFILES))
    prefix = world.sub("profiles")
    proxy = make_proxy(prefix=prefix, datalab_profiles=str(path))
    big, _ = proxy.start_with_work("a.csv", CSV, profile="big")
    plain, _ = proxy.start_with_work("b.csv", CSV)
    try:
        inspected = container_of(world, prefix, big)
        assert (inspected["HostConfig"]["Memory"], inspected["HostConfig"]["NanoCpus"]) == (2 << 30, 5 * 10**8)
        assert {"COURSE=ml", "LEVEL=two words"} <= set(inspected["Config"]["Env"])
        assert instance_of(world, prefix, big).profile == "big"
        inspected = container_of(world, prefix, plain)
        assert (inspected["HostConfig"]["Memory"], inspected["HostConfig"]["NanoCpus"]) == (1 << 30, 10**9)
        assert not [e for e in inspected["Config"]["Env"] if e.startswith(("COURSE=", "LEVEL="))]
        assert instance_of(world, prefix, plain).profile == "default"
        unknown = proxy.upload("c.csv", CSV, profile="huge")
        assert (unknown.status_code, error_of(unknown)) == (400, "PROFILE_UNKNOWN")
    finally:
        for nonce in (big, plain):
            proxy.stop_instance(nonce)


class ExitingProxy(Proxy):
    """A proxy that must exit at start-up: start() returns once it has (whether it listened first or not)."""

    def start(self) -> ExitingProxy:
        with contextlib.suppress(RuntimeError):  # it exited before it listened
            super().start()
        return self

    def _wait_answering(self, timeout: float = 30.0) -> None:
        self.proc.wait(timeout)


def refused_at_start_up(world, redis_url: str, sign_key: str, workdir, options: dict) -> str:
    """Start a proxy that must exit at start-up; what it logged."""
    options = {"datalab_pool_size": 0, **options}
    proxy = ExitingProxy(redis_url, world.sub("profiles-refused"), sign_key, workdir, options).start()
    assert proxy.proc.wait(30) != 0
    return proxy.log_text()


@pytest.mark.parametrize(
    "name, text, said",
    [
        ("p.toml", '[big]\nmem_limit = "2 GB"\n', "profile 'big', field mem_limit: must look like 512m or 1g"),
        ("p.toml", "[big]\nmemory = 2\n", "profile 'big', field memory: is not a profile's field"),
        ("p.toml", '[big.env]\nDATALAB_AUTH = "x"\n', "field env: DATALAB_AUTH is set by the proxy itself"),
        ("p.json", '{"big": {"pool_size": -1}}', "profile 'big', field pool_size: must be zero or positive"),
        ("p.json", '{"big": ', "is not valid JSON"),
        ("p.toml", '[small]\nmem_limit = "512m"\ndisk_limit = "1g"\n', "profile 'small': datalab_disk_limit=1g"),
    ],
)
def test_a_bad_profiles_file_stops_the_proxy_at_start_up(world, redis_server, sign_key, tmp_path, name, text, said):
    path = tmp_path / name
    path.write_text(text)
    log = refused_at_start_up(world, redis_server.url, sign_key, tmp_path, {"datalab_profiles": str(path)})
    assert f"datalab_profiles: {path}: " in log or "datalab_profiles: profile" in log, log[-2000:]
    assert said in log, log[-2000:]


def test_the_process_backend_refuses_a_profile_with_an_image(world, redis_server, sign_key, tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text('[gpu]\nimage = "datalab-gpu:latest"\n')
    options = {"datalab_profiles": str(path), "datalab_backend": "process"}
    log = refused_at_start_up(world, redis_server.url, sign_key, tmp_path, options)
    assert "profile 'gpu' cannot run on the process backend" in log and "runs no images" in log, log[-2000:]

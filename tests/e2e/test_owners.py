"""Owners, the signed start parameters and the instance API, end to end: real mitmdump processes on
one Redis, real containers.

- An owner at datalab_max_instances_per_owner gets 429 OWNER_LIMIT on either proxy while another
  owner starts; its signature was not spent, so the same request passes once the owner's instance ended.
- Every start parameter is signed: changing any one of filename, ts, owner, profile, unpack after
  signing (or adding or dropping one) is 403.
- The instance API's idle and max-age deadlines are when culling ends the instance (within a cull
  round's slack), and a listing after the end says it ended and how.
"""

from __future__ import annotations

import io
import time
import zipfile
from urllib.parse import urlencode

import pytest
import requests

import signing

CSV = b"x,y\n1,2\n"
INTERVAL = 2  # datalab_cull_interval of the culling proxies
SLACK = 2 * INTERVAL + 3  # a round every INTERVAL, its probes and the end itself
WAIT = 90.0  # seconds an end may take to show at most (a bound on a loaded machine, not a claim)


def zipped() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a.csv", CSV)
    return buffer.getvalue()


def code_of(r: requests.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("code", "")


@pytest.fixture
def capped(make_proxy, world):
    """Two proxies on one Redis, an owner holding at most one instance across both."""
    prefix = world.sub("owners")
    return [make_proxy(prefix, datalab_max_instances_per_owner=1) for _ in "ab"]


def test_an_owner_at_its_cap_gets_429_on_either_proxy_while_another_owner_starts(capped):
    a, b = capped
    nonce, work = a.start_with_work("first.csv", CSV, owner="alice")
    ts = str(int(time.time() * 1000))
    subject = signing.start_subject("second.csv", {"owner": "alice"})
    sign = signing.signature(b.sign_key, ts, subject, b.scheme)
    refused = b.upload("second.csv", CSV, ts=ts, sign=sign, owner="alice")
    assert code_of(refused) == (429, "OWNER_LIMIT") and refused.headers["Retry-After"] == "30"
    assert code_of(a.upload("third.csv", CSV, owner="alice")) == (429, "OWNER_LIMIT")
    other, _ = b.start_with_work("bob.csv", CSV, owner="bob")  # another owner starts meanwhile
    [entry] = b.instances(owner="alice").json()["result"]["instances"]
    assert (entry["work"], entry["state"], entry["filename"]) == (work, "ready", "first.csv")
    assert a.stop_instance(nonce).status_code == 200
    again = b.upload("second.csv", CSV, ts=ts, sign=sign, owner="alice")  # the refused one, unspent
    assert again.status_code == 200, again.text
    for n in (other, again.json()["result"]["nonce"]):
        assert b.stop_instance(n).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"filename": "b.zip"},
        {"ts": "+1"},
        {"owner": "mallory"},
        {"profile": "other"},
        {"unpack": "0"},
        {"owner": None},  # dropped
        {"profile": None},
        {"unpack": None},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_every_start_parameter_is_signed(capped, change):
    a, _ = capped
    ts = str(int(time.time() * 1000))
    signed = {"owner": f"signer-{ts}", "profile": "default", "unpack": "1"}
    sign = signing.signature(a.sign_key, ts, signing.start_subject("a.zip", signed), a.scheme)
    sent = {"ts": ts, "filename": "a.zip", **signed}
    for name, value in change.items():
        if value is None:
            del sent[name]
        else:
            sent[name] = str(int(ts) + 1) if value == "+1" else value
    r = requests.post(a.url(f"/datalab/start?{urlencode(sent)}"), data=zipped(), headers={"X-SIGN": sign}, timeout=60)
    assert code_of(r) == (403, "BAD_SIGNATURE"), r.text
    r = requests.post(
        a.url(f"/datalab/start?{urlencode({'ts': ts, 'filename': 'a.zip', **signed})}"),
        data=zipped(),
        headers={"X-SIGN": sign},
        timeout=120,
    )
    assert r.status_code == 200, r.text  # as signed, the same request starts
    assert a.stop_instance(r.json()["result"]["nonce"]).status_code == 200


def ended(proxy, work: str) -> dict:
    """The instance once the API says it ended (the culler's doing: nobody stops it here)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        entry = proxy.instances(work=work).json()["result"]
        if entry["state"] == "ended":
            return entry
        time.sleep(0.5)
    raise AssertionError(f"instance of work {work} did not end within {WAIT} s")


def test_the_idle_deadline_is_when_culling_ends_it_and_the_listing_says_so(make_proxy, world):
    p = make_proxy(world.sub("owners-idle"), datalab_idle_timeout=8, datalab_cull_interval=INTERVAL)
    _, work = p.start_with_work("idle.csv", CSV, owner="carol")
    [ready] = p.instances(owner="carol").json()["result"]["instances"]
    assert (ready["state"], ready["work"], ready["owner"], ready["work_state"]) == ("ready", work, "carol", "live")
    assert ready["idle_deadline"] == ready["last_activity"] + 8 and ready["last_activity"] >= ready["created"]
    assert ready["max_age_deadline"] == ready["created"] + 28800
    entry = ended(p, work)
    assert entry["ended"] == "idle", entry
    assert ready["idle_deadline"] <= entry["ended_at"] <= ready["idle_deadline"] + SLACK, (ready, entry)
    [listed] = p.instances(owner="carol").json()["result"]["instances"]
    assert (listed["state"], listed["ended"], listed["filename"]) == ("ended", "idle", "idle.csv")
    assert listed["idle_deadline"] is None and listed["work_state"] in ("saving", "saved")


def test_the_max_age_deadline_is_when_culling_ends_it(make_proxy, world):
    p = make_proxy(world.sub("owners-age"), datalab_max_age=10, datalab_cull_interval=INTERVAL)
    _, work = p.start_with_work("old.csv", CSV)  # no owner: read by its work id
    ready = p.instances(work=work).json()["result"]
    assert ready["state"] == "ready" and ready["owner"] == ""
    assert ready["max_age_deadline"] == ready["created"] + 10 < ready["idle_deadline"]
    entry = ended(p, work)
    assert entry["ended"] == "max_age", entry
    assert ready["max_age_deadline"] <= entry["ended_at"] <= ready["max_age_deadline"] + SLACK, (ready, entry)


def test_the_instance_api_refuses_browsers_and_unknown_works(capped):
    a, _ = capped
    assert code_of(a.instances(owner="alice", headers={"Origin": "https://evil.example"})) == (403, "BAD_ORIGIN")
    assert code_of(a.instances(owner="alice", headers={"Sec-Fetch-Site": "cross-site"})) == (403, "BAD_ORIGIN")
    assert code_of(a.instances(work="w" * 32)) == (404, "WORK_UNKNOWN")
    assert a.instances(owner="nobody").json()["result"] == {"instances": [], "omitted": 0}

import hashlib
import importlib.util
from pathlib import Path

import pytest

import signing


def test_signature_is_sha256_of_key_ts_filename():
    assert signing.signature("k", "1700000000", "a.csv") == hashlib.sha256(b"k1700000000a.csv").hexdigest()


@pytest.mark.parametrize(
    "given, ok",
    [
        (hashlib.sha256(b"k1700000000a.csv").hexdigest(), True),
        (hashlib.sha256(b"k1700000000a.csv").hexdigest().upper(), True),
        (hashlib.sha256(b"k1700000000b.csv").hexdigest(), False),
        (hashlib.sha256(b"x1700000000a.csv").hexdigest(), False),
        ("", False),
        ("zz" * 32, False),
        ("é" * 64, False),
    ],
)
def test_signature_ok(given, ok):
    assert signing.signature_ok("k", "1700000000", "a.csv", given) is ok


@pytest.mark.parametrize(
    "ts, seconds",
    [("1700000000", 1700000000.0), ("1700000000123", 1700000000.123), ("0", 0.0)],
)
def test_parse_timestamp(ts, seconds):
    assert signing.parse_timestamp(ts) == pytest.approx(seconds)


@pytest.mark.parametrize("ts", ["", "-1", "1.5", "abc", "17000000001", "１７００", "170000000012345"])
def test_parse_timestamp_rejects(ts):
    with pytest.raises(ValueError):
        signing.parse_timestamp(ts)


@pytest.mark.parametrize(
    "ts, now, fresh", [(1000, 1000, True), (1000, 1300, True), (1000, 1301, False), (1301, 1000, False)]
)
def test_timestamp_fresh(ts, now, fresh):
    assert signing.timestamp_fresh(ts, now, 300) is fresh


def test_a_start_without_extras_signs_the_seeds_subject():
    assert signing.start_subject("data.csv", {}) == "data.csv"


def test_a_starts_extras_are_signed_in_one_order_and_each_changes_the_subject():
    extras = {"unpack": "1", "owner": "alice", "profile": "big"}
    assert signing.start_subject("a.zip", extras) == "a.zip\nowner=alice\nprofile=big\nunpack=1"
    for name in extras:
        assert signing.start_subject("a.zip", {**extras, name: extras[name] + "x"}) != signing.start_subject(
            "a.zip", extras
        )
        left_out = {k: v for k, v in extras.items() if k != name}
        assert signing.start_subject("a.zip", left_out) != signing.start_subject("a.zip", extras)


def documented_vectors() -> list[tuple[str, str, str]]:
    """docs/api.md's test vectors (key k, ts 1700000000): subject, sha256, hmac-sha256."""
    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    table = text.split("Test vectors", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return [(subject.replace("\\n", "\n"), sha, mac) for subject, sha, mac in rows]


def test_the_documented_vectors_are_the_proxys_signatures():
    vectors = documented_vectors()
    assert len(vectors) == 3
    for subject, sha, mac in vectors:
        assert signing.signature("k", "1700000000", subject) == sha
        assert signing.signature("k", "1700000000", subject, "hmac-sha256") == mac
    subjects = [v[0] for v in vectors]
    start = signing.start_subject("data.zip", {"unpack": "1", "profile": "big", "owner": "alice"})
    assert subjects[1:] == [start, signing.owner_listing_subject("alice")]


def test_the_sample_client_signs_as_the_docs_say():
    spec = importlib.util.spec_from_file_location("client", Path(__file__).parent.parent / "scripts/datalab-client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    _, start, listing = documented_vectors()
    assert client.start_subject("data.zip", {"unpack": "1", "owner": "alice", "profile": "big"}) == start[0]
    assert client.listing_subject("alice") == listing[0]
    for subject, sha, mac in (start, listing):
        assert (
            client.sign("k", "1700000000", subject, "sha256"),
            client.sign("k", "1700000000", subject, "hmac-sha256"),
        ) == (sha, mac)
    for extras in ({}, {"owner": "a"}, {"profile": "p", "unpack": "0"}):
        assert client.start_subject("f.csv", extras) == signing.start_subject("f.csv", extras)

import hashlib

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

"""The redis+sentinel:// URL: what it names, and what datalab_redis_url refuses."""

import dataclasses

import pytest

from config import Settings
from config import parse_settings
from sentinel import SentinelUrl
from sentinel import parse_sentinel_url


def good(**changes) -> dict:
    return {**dataclasses.asdict(Settings(sign_key="k")), **changes}


@pytest.mark.parametrize(
    "url, parsed",
    [
        ("redis+sentinel://s1/mymaster", SentinelUrl([("s1", 26379)], "mymaster")),
        (
            "redis+sentinel://127.0.0.1:26380,127.0.0.1:26381,10.0.0.3/datalab/2",
            SentinelUrl([("127.0.0.1", 26380), ("127.0.0.1", 26381), ("10.0.0.3", 26379)], "datalab", 2),
        ),
        ("redis+sentinel://:s%40cret@h:1/m", SentinelUrl([("h", 1)], "m", 0, None, "s@cret")),
        ("redis+sentinel://ann:pw@h:1/m/0", SentinelUrl([("h", 1)], "m", 0, "ann", "pw")),
        ("redis+sentinel://[::1]:26379/m", SentinelUrl([("::1", 26379)], "m")),
    ],
)
def test_a_sentinel_url_names_sentinels_service_db_and_the_primarys_credentials(url, parsed):
    assert parse_sentinel_url(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h:26379",  # no service
        "redis+sentinel://h:26379/",
        "redis+sentinel://h:26379/m/x",  # db not a number
        "redis+sentinel://h:26379/m/1/2",
        "redis+sentinel://h:99999/m",
        "redis+sentinel://h:0/m",
        "redis+sentinel://h:26379,/m",  # an empty host
        "redis+sentinel://h:p/m",
        "redis+sentinel://password@h/m",  # credentials without ':'
        "redis+sentinel://h/m?ssl=true",
        "redis+sentinel://h/m a",
    ],
)
def test_a_malformed_sentinel_url_is_refused_at_start_up(url):
    with pytest.raises(ValueError, match="datalab_redis_url"):
        parse_settings(good(redis_url=url))


def test_a_sentinel_url_is_a_valid_redis_url():
    url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/datalab"
    assert parse_settings(good(redis_url=url)).redis_url == url

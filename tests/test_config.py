import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from config import Config
from config import Settings
from config import parse_settings


def good(**changes):
    values = {**Settings(sign_key="k").__dict__, **changes}
    return values


def test_defaults_with_a_key_are_valid():
    s = parse_settings(good())
    assert s.nonce_ttl == 600 and s.max_upload == 100 * 1024 * 1024 and s.max_skew == 300


@pytest.mark.parametrize(
    "changes",
    [
        {"sign_key": ""},
        {"redis_url": "http://x"},
        {"nonce_ttl": 0},
        {"max_upload": -1},
        {"cookie_samesite": "Sometimes"},
        {"cookie_samesite": "None"},
        {"cookie_name": "a;b"},
        {"mem_limit": "lots"},
        {"cpus": "0"},
        {"cpus": "many"},
        {"key_prefix": ""},
        {"route_cache_ttl": -1},
        {"pool_size": -1},
        {"boots_at_once": -2},
        {"max_instances": -1},
        {"queue_timeout": 0},
        {"idle_timeout": 0},
        {"max_age": -5},
        {"cull_interval": 0},
        {"upload_timeout": 0},
        {"uploads_at_once": 0},
        {"header_timeout": -1},
        {"upstream_timeout": 0},
        {"max_head": 0},
        {"max_head_lines": -1},
        {"sign_scheme": "md5"},
        {"allowed_origins": "evil.example"},
        {"allowed_origins": "https://a.example/path"},
        {"routing": "path"},
        {"public_host": "https://datalab.example"},
        {"public_host": "Not A Host"},
    ],
)
def test_bad_settings_say_which_option(changes):
    with pytest.raises(ValueError, match="datalab_" + next(iter(changes))):
        parse_settings(good(**changes))


def test_client_bounds_defaults():
    s = parse_settings(good())
    assert (s.upload_timeout, s.uploads_at_once, s.header_timeout) == (300, 64, 60)
    assert s.upstream_timeout == 120  # above Jupyter's own 60 s wait for a kernel's kernel_info reply
    assert (s.max_head, s.max_head_lines) == (65536, 100)  # tornado's head limit (Jupyter's); Apache's line count


def test_lifecycle_defaults():
    s = parse_settings(good())
    assert (s.pool_size, s.queue_timeout, s.idle_timeout, s.max_age, s.cull_interval) == (2, 30, 1800, 28800, 60)
    assert s.max_instances == 0  # what the engine's memory holds, asked at start-up
    assert s.boot_slots >= 1  # one per CPU
    assert parse_settings(good(boots_at_once=3)).boot_slots == 3


def test_options_are_declared_and_validated_at_configure():
    seen = []
    addon = Config(seen.append)
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="datalab_sign_key"):
            tctx.configure(addon, datalab_sign_key="")
        tctx.configure(addon, datalab_sign_key="secret", datalab_nonce_ttl=5, datalab_cpus="0.5")
        assert seen[-1].sign_key == "secret" and seen[-1].nonce_ttl == 5 and seen[-1].cpus == "0.5"
        with pytest.raises(exceptions.OptionsError, match="datalab_cookie_samesite"):
            tctx.configure(addon, datalab_cookie_samesite="Never")


def test_required_mitmproxy_options_are_enforced():
    addon = Config(lambda s: None)
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, datalab_sign_key="k", keep_host_header=False, connection_strategy="eager")
        assert tctx.options.keep_host_header is True
        assert tctx.options.connection_strategy == "lazy"


def test_block_global_is_turned_off_so_public_clients_are_served():
    """mitmproxy's default kills every client connection from a public address."""
    from mitmproxy.addons.block import Block

    addon = Config(lambda s: None)
    with taddons.context(Block(), addon) as tctx:
        assert tctx.options.block_global is True
        tctx.configure(addon, datalab_sign_key="k")
        assert tctx.options.block_global is False


def test_big_bodies_stream_unless_the_operator_chose_a_threshold():
    """Held whole, a 1 GiB download would cost the proxy 1 GiB; small bodies stay visible in mitmweb."""
    from mitmproxy.addons.proxyserver import Proxyserver

    addon = Config(lambda s: None)
    with taddons.context(Proxyserver(), addon) as tctx:
        assert tctx.options.stream_large_bodies is None
        tctx.configure(addon, datalab_sign_key="k")
        assert tctx.options.stream_large_bodies == "256k"
        tctx.configure(addon, stream_large_bodies="2m")
        assert tctx.options.stream_large_bodies == "2m"


def test_security_options():
    s = parse_settings(good(allowed_origins=" https://App.example , http://localhost:3000/ ", cookie_secure=True))
    assert s.origins == {"https://app.example", "http://localhost:3000"}
    assert s.session_cookie == "__Host-datalab_session"
    assert parse_settings(good()).session_cookie == "datalab_session"
    with pytest.raises(ValueError, match="datalab_public_host"):
        parse_settings(good(routing="subdomain"))
    sub = parse_settings(good(routing="subdomain", public_host="datalab.example.com", sign_scheme="hmac-sha256"))
    assert (sub.routing, sub.public_host, sub.sign_scheme) == ("subdomain", "datalab.example.com", "hmac-sha256")

from urllib.parse import urljoin
from urllib.parse import urlsplit

import pytest

import hosts
import inputs


@pytest.mark.parametrize("name", ["data.csv", "notebook.ipynb", "a b.txt", "über.csv", ".hidden", "x" * 255])
def test_filename_accepted(name):
    assert inputs.check_filename(name) == name


@pytest.mark.parametrize(
    "name",
    ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.csv", "\U0001f468\u200d\U0001f4bb.csv"]
    + ["a\u00a0b.csv", "e\u0301.csv"],
    ids=["persian_zwnj", "emoji_zwj", "no_break_space", "combining_accent"],
)
def test_filename_keeps_joiners_and_visible_spaces(name):
    assert inputs.check_filename(name) == name


# Names that forge a line in the proxy's log or `datalab-admin list`, or read otherwise than they are.
DISGUISES = {
    "line_separator": "a\u2028forged line.csv",
    "paragraph_separator": "a\u2029b.csv",
    "right_to_left_override": "report\u202evsc.exe",  # shown as "reportexe.csv"
    "left_to_right_mark": "a\u200eb.csv",
    "right_to_left_mark": "a\u200fb.csv",
    "embedding": "\u202ab.csv",
    "pop_directional": "a\u202c.csv",
    "isolate": "a\u2067b\u2069.csv",
    "first_strong_isolate": "\u2068a.csv",
    "arabic_letter_mark": "a\u061cb.csv",
    "zero_width_space": "pass\u200bwd.csv",
    "word_joiner": "a\u2060b.csv",
    "byte_order_mark": "\ufeffa.csv",
    "soft_hyphen": "a\u00adb.csv",
    "tag_character": "a\U000e0041.csv",
}


@pytest.mark.parametrize("name", DISGUISES.values(), ids=DISGUISES.keys())
def test_filename_refuses_separators_bidi_controls_and_invisible_format_characters(name):
    with pytest.raises(ValueError, match="separators, bidirectional controls"):
        inputs.check_filename(name)


def test_shown_puts_any_name_on_one_printable_line():
    assert inputs.shown("über.csv") == "über.csv"
    for name in DISGUISES.values():
        text = inputs.shown(name)
        assert text.isprintable() and text.startswith("'") and len(text.splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "a\\b", "/etc/passwd", "a\x00b", "a\nb", "a\x7fb", "x" * 256, "é" * 128, "a..b"]
    + ["a\x85b", "\x9b31m.csv"],  # C1 control characters (found by test_fuzz)
)
def test_filename_rejected(name):
    with pytest.raises(ValueError):
        inputs.check_filename(name)


def test_tokens_are_random_urlsafe_and_long():
    tokens = {inputs.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(inputs.is_token(t) and len(t) * 6 >= 128 for t in tokens)


def test_new_instance_ids_never_start_with_a_dash():
    """Operators type them on command lines (datalab-admin remove); one token in 64 starts with '-'."""
    ids = {inputs.new_instance_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(inputs.is_token(i) and not i.startswith("-") for i in ids)


@pytest.mark.parametrize("value", ["", "short", "a" * 21, "has space" * 4, "x/y" * 10, "é" * 30, "a" * 22 + "\n"])
def test_is_token_rejects(value):
    assert not inputs.is_token(value)


@pytest.mark.parametrize(
    "raw, query, location",
    [
        ("", "", "/"),
        ("tree", "", "/tree"),
        ("notebooks/a.ipynb", "kernel=1&x=%20", "/notebooks/a.ipynb?kernel=1&x=%20"),
        ("files/a%20b.csv", "", "/files/a%20b.csv"),
    ],
)
def test_safe_destination_keeps_ordinary_paths(raw, query, location):
    assert inputs.safe_destination(raw, query) == location


@pytest.mark.parametrize(
    "raw",
    [
        "/evil.example",
        "//evil.example",
        "\\evil.example",
        "/\\evil.example",
        "%2F%2Fevil.example",
        "%2f%5cevil.example",
        "%252F%252Fevil.example",
        "http://evil.example/",
        "https:evil.example",
        " //evil.example",
        "%0d%0aSet-Cookie:x=1",
        "\t/\\/evil.example",
    ],
)
def test_safe_destination_never_leaves_origin(raw):
    location = inputs.safe_destination(raw, "a=\r\nb")
    assert location.startswith("/") and not location.startswith(("//", "/\\"))
    assert "\r" not in location and "\n" not in location and "\\" not in location
    assert urlsplit(urljoin("http://proxy.example/", location)).netloc == "proxy.example"


@pytest.mark.parametrize(
    "raw, query, location",
    [
        ("a\udc80b", "x=\udcff", "/a%80b?x=%FF"),  # non-UTF-8 bytes, as mitmproxy decodes them: given back
        ("\ud800", "\udfff", "/%ED%A0%80?%ED%BF%BF"),  # a surrogate no decoding yields
    ],
)
def test_safe_destination_encodes_lone_surrogates(raw, query, location):
    assert inputs.safe_destination(raw, query) == location  # was a UnicodeEncodeError (found by test_fuzz)


@pytest.mark.parametrize(
    "origin, normal",
    [
        ("https://App.Example:443/", "https://app.example"),
        ("http://[::1]:80", "http://[::1]"),
        ("http://a.example:8080", "http://a.example:8080"),
        # found by test_fuzz: a ValueError, or a result that normalizes to something else again
        ("http://a:\u00b2", ""),
        ("http://a:80:80", ""),
        ("http://a:99999", ""),
        ("http://:80", ""),
        ("http://a :80", ""),
        ("http://\u00e9.example", ""),
        ("http://u@a.example", ""),
    ],
)
def test_normalize_origin(origin, normal):
    assert hosts.normalize_origin(origin) == normal


def test_origin_allowed_with_a_non_ascii_digit_port_is_a_bool():
    # found by test_fuzz: int('²') raised, so a Host header of b'a:\xc2\xb2' broke the WebSocket check
    assert hosts.origin_allowed("http://a", "a:\u00b2", frozenset()) is False
    assert hosts.origin_allowed("http://a:80", "a:80", frozenset()) is True


def test_place_names_the_instance_host_its_own_and_every_other_instance_host_other():
    a, b, public = inputs.new_instance_id(), inputs.new_instance_id(), "datalab.example:8443"
    host_a = hosts.instance_host(a, public)
    assert hosts.place(host_a, public, a) == hosts.OWN
    assert hosts.place(host_a.upper() + ".", public, a) == hosts.OWN  # DNS names ignore case and a final dot
    assert hosts.place(hosts.instance_host(b, public), public, a) == hosts.OTHER
    assert [hosts.place(h, public, a) for h in (public, "127.0.0.1:8443", "", "x.evil.example")] == [hosts.NEUTRAL] * 4


@pytest.mark.parametrize("owner", ["alice\n", "a\n", "x" * 128 + "\n"])
def test_an_owner_ending_in_a_newline_is_refused(owner):
    """`$` matches before a final newline: the owner's rule is a full match."""
    with pytest.raises(ValueError):
        inputs.check_owner(owner)


@pytest.mark.parametrize("owner", ["a", "x" * 128, "alice@example.org", "u:1.2_3+4-5"])
def test_an_owner_at_the_limits_is_taken(owner):
    assert inputs.check_owner(owner) == owner


@pytest.mark.parametrize("owner", ["", "x" * 129, "al ice", "alice\r", "älice", "alice\x00"])
def test_an_owner_past_the_limits_is_refused(owner):
    with pytest.raises(ValueError):
        inputs.check_owner(owner)


def test_a_profile_name_ending_in_a_newline_is_refused():
    with pytest.raises(ValueError):
        inputs.check_profile_name("gpu\n")

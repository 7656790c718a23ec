from urllib.parse import urljoin
from urllib.parse import urlsplit

import pytest

import inputs


@pytest.mark.parametrize("name", ["data.csv", "notebook.ipynb", "a b.txt", "über.csv", ".hidden", "x" * 255])
def test_filename_accepted(name):
    assert inputs.check_filename(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "a\\b", "/etc/passwd", "a\x00b", "a\nb", "a\x7fb", "x" * 256, "é" * 128, "a..b"],
)
def test_filename_rejected(name):
    with pytest.raises(ValueError):
        inputs.check_filename(name)


def test_tokens_are_random_urlsafe_and_long():
    tokens = {inputs.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(inputs.is_token(t) and len(t) * 6 >= 128 for t in tokens)


@pytest.mark.parametrize("value", ["", "short", "a" * 21, "has space" * 4, "x/y" * 10, "é" * 30])
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

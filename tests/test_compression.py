"""image/datalab_compression.py's rules: which answers the instance gzips."""

from __future__ import annotations

import pytest
from tornado import httputil

from datalab_compression import TextCompression
from datalab_compression import accepts_gzip
from datalab_compression import is_user_file


@pytest.mark.parametrize(
    "header, accepted",
    [
        ("gzip, deflate, br", True),
        ("GZIP", True),
        ("br;q=1.0, gzip;q=0.8", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, br", False),
        ("identity", False),
        ("", False),
        ("br", False),
        ("xgzip", False),
        ("gzip;q=nonsense", False),
        ("*;q=0, gzip", True),
        ("*, gzip;q=0", False),
        ("br, *;q=0.5", True),
    ],
)
def test_accept_encoding(header, accepted):
    assert accepts_gzip(header) is accepted


@pytest.mark.parametrize(
    "path, query, base, user_file",
    [
        ("/files/data.csv", "", "/", True),
        ("/files/sub/a.txt", "_xsrf=x", "/", True),
        ("/nbconvert/html/a.ipynb", "download=true", "/", True),
        ("/api/datalab/work", "", "/", True),
        ("/api/contents/a.csv", "download=1", "/", True),
        ("/lab", "", "/", False),
        ("/static/lab/main.js", "v=1", "/", False),
        ("/api/contents/a.ipynb", "content=1", "/", False),
        ("/user/x/files/a.csv", "", "/user/x/", True),
        ("/user/x/lab", "", "/user/x/", False),
        ("/lab/tree/files/a.csv", "", "/", False),
    ],
)
def test_the_users_files_are_left_alone(path, query, base, user_file):
    assert is_user_file(path, query, base) is user_file


def request(accept: str = "gzip") -> httputil.HTTPServerRequest:
    return httputil.HTTPServerRequest(
        method="GET", uri="/static/lab/main.js", headers=httputil.HTTPHeaders({"Accept-Encoding": accept})
    )


@pytest.mark.parametrize(
    "status, extra, gzipped",
    [
        (200, {}, True),
        (206, {"Content-Range": "bytes 0-4999/75427"}, False),  # a Range asked for: its offsets are the file's
        (200, {"Content-Encoding": "br"}, False),
        (200, {"Content-Type": "text/event-stream"}, False),
    ],
)
def test_a_part_of_a_file_goes_as_it_is(status, extra, gzipped):
    headers = httputil.HTTPHeaders({"Content-Type": "application/javascript", "Content-Length": "5000", **extra})
    body = b"x" * 5000
    status_out, headers_out, chunk = TextCompression(request()).transform_first_chunk(status, headers, body, True)
    assert status_out == status
    assert (headers_out.get("Content-Encoding") == "gzip") is gzipped
    assert (chunk != body) is gzipped
    assert headers_out["Content-Length"] == str(len(chunk))

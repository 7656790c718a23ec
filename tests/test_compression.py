"""image/datalab_compression.py's rules: which answers the instance gzips."""

from __future__ import annotations

import pytest

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

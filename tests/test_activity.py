"""Which requests keep an instance: what JupyterLab and Notebook 7 send by themselves does not,
what a person does does (activity.py says where each case was read)."""

from urllib.parse import parse_qsl
from urllib.parse import urlsplit

import pytest
from mitmproxy.http import Headers

from activity import counts

FETCH = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}  # what a page's fetch() sends
PAGE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
FRAME = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade"}


def verdict(method: str, url: str, headers: dict[str, str]) -> bool:
    parts = urlsplit(url)
    return counts(method, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)), Headers(**headers))


@pytest.mark.parametrize(
    "method, url, headers",
    [
        ("GET", "/api/kernels?1733572000000", FETCH),
        ("GET", "/api/sessions?1733572000000", FETCH),
        ("GET", "/api/terminals?1733572000000", FETCH),
        ("GET", "/api/kernelspecs?1733572000000", FETCH),
        ("GET", "/api/me?1733572000000", FETCH),
        ("GET", "/api/status?1733572000000", FETCH),
        ("GET", "/api/contents?content=1&hash=0&1733572000000", FETCH),  # the root listing
        ("GET", "/api/contents/data%20dir?content=1&hash=0&1733572000000", FETCH),
        ("GET", "/api/contents/a.ipynb/checkpoints?1733572000000", FETCH),  # Notebook 7, every 2 s
        ("GET", "/api/contents/a.ipynb?content=0&hash=1&1733572000000", FETCH),  # a save's check
        ("GET", "/lab/api/workspaces?1733572000000", FETCH),
        ("GET", "/lab/api/settings?1733572000000", FETCH),
        ("GET", "/lab/api/translations/default?1733572000000", FETCH),
        ("GET", "/api/config/notebook?1733572000000", FETCH),
        ("GET", "/static/lab/main.js", {"Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}),
        ("HEAD", "/api/kernels", {}),
        ("GET", "/api/events/subscribe", UPGRADE),
        ("GET", "/lsp/ws/pylsp", UPGRADE),
        ("OPTIONS", "/api/contents/a.ipynb", {"Access-Control-Request-Method": "PUT"}),
        ("POST", "/api/security/csp-report", {"Content-Type": "application/csp-report"}),
        ("GET", "/api/kernels/k1/channels?session_id=s", FETCH),  # no upgrade: a plain GET of the path
    ],
)
def test_what_a_tab_sends_by_itself_does_not_count(method, url, headers):
    assert verdict(method, url, headers) is False


@pytest.mark.parametrize(
    "method, url, headers",
    [
        ("GET", "/lab", PAGE),
        ("GET", "/lab/tree/a.ipynb", PAGE),
        ("GET", "/notebooks/a.ipynb", FRAME),  # the frontend frames the instance
        ("GET", "/tree", PAGE),
        ("GET", "/api/kernels", {"Sec-Fetch-Mode": "NAVIGATE"}),  # any page a person loads
        ("GET", "/api/contents/a.ipynb?type=notebook&content=1&hash=1&1733572000000", FETCH),
        ("GET", "/api/contents/d/a.csv?type=file&format=text&content=1&hash=1&1733572000000", FETCH),
        ("GET", "/files/a.csv?1733572000000", FETCH),
        ("GET", "/files/plot.png", {"Sec-Fetch-Dest": "image"}),
        ("GET", "/nbconvert/html/a.ipynb?download=true", PAGE),
        ("PUT", "/api/contents/a.ipynb", FETCH),
        ("PATCH", "/api/contents/a.ipynb", FETCH),
        ("DELETE", "/api/contents/a.csv", FETCH),
        ("POST", "/api/contents", FETCH),
        ("POST", "/api/sessions", FETCH),
        ("POST", "/api/kernels/k1/interrupt", FETCH),
        ("POST", "/api/terminals", FETCH),
        ("PUT", "/lab/api/workspaces/default", FETCH),
        ("post", "/api/kernels", {}),
        ("GET", "/api/kernels/k1/channels?session_id=s", UPGRADE),
        ("GET", "/terminals/websocket/1", {"Upgrade": "WebSocket"}),
    ],
)
def test_what_a_person_does_counts(method, url, headers):
    assert verdict(method, url, headers) is True

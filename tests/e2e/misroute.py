"""A buggy addon, loaded after datalab's (mitmdump -s ... -s misroute.py) by a test: it points a
flow the router has routed at another address, as a bug in any addon might."""

from mitmproxy import http


def requestheaders(flow: http.HTTPFlow) -> None:
    target = flow.request.headers.get("X-Test-Misroute")
    if target:
        host, _, port = target.rpartition(":")
        flow.request.host, flow.request.port = host, int(port)

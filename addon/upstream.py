"""Where a flow goes upstream: the one place that points a flow at a host and port."""

from __future__ import annotations

from mitmproxy import http

from backends import AUTH_HEADER
from backends import Instance


def reroute(flow: http.HTTPFlow, host: str, port: int) -> None:
    """Send the flow to host:port while the upstream still sees the public Host (origin/XSRF checks)."""
    public_host = flow.request.host_header
    flow.request.scheme = "http"
    flow.request.host = host
    flow.request.port = port
    flow.request.host_header = public_host


def frame_for_http1(request: http.Request) -> None:
    """HTTP/2 and /3 may send a body with no length at all; passed to an HTTP/1.1 upstream as it is,
    that body would be unframed bytes after the head (lost, or read as another request). Chunked,
    mitmproxy frames each piece (an empty body is just the last chunk)."""
    framed = "Content-Length" in request.headers or "Transfer-Encoding" in request.headers
    if (request.is_http2 or request.is_http3) and not framed:
        request.headers["Transfer-Encoding"] = "chunked"


def route_to_instance(flow: http.HTTPFlow, instance: Instance) -> None:
    """Reroute to the instance with its secret, which only the proxy knows: a neighbour container
    that reaches the instance directly is refused. A client's own credentials for Jupyter (a token
    or a forged secret header) never pass."""
    reroute(flow, instance.host, instance.port)
    frame_for_http1(flow.request)
    flow.request.headers.pop("Authorization", None)
    flow.request.headers.pop(AUTH_HEADER, None)
    if instance.token:
        flow.request.headers[AUTH_HEADER] = instance.token

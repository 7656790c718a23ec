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


def route_to_instance(flow: http.HTTPFlow, instance: Instance) -> None:
    """Reroute to the instance with its secret, which only the proxy knows: a neighbour container
    that reaches the instance directly is refused. A client's own credentials for Jupyter (a token
    or a forged secret header) never pass."""
    reroute(flow, instance.host, instance.port)
    flow.request.headers.pop("Authorization", None)
    flow.request.headers.pop(AUTH_HEADER, None)
    if instance.token:
        flow.request.headers[AUTH_HEADER] = instance.token

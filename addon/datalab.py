"""datalab proxy: a mitmproxy addon that starts a Jupyter instance per upload and routes each
browser to its own instance.

    mitmdump -s addon/datalab.py --mode reverse:http://127.0.0.1:1 \
        --set connection_strategy=lazy --set keep_host_header=true --set datalab_sign_key=...

Wiring only. A request goes: Api.requestheaders (/datalab/*: api.py; uploads stream through
upload.py and are answered in Api.response) or Router.requestheaders (everything else: router.py,
cookie -> Redis -> instance), then FailClosed (guards.py). A start takes an instance in
instances.py (warm pool: pool.py, boot queue: admission.py); an end saves the user's work first
(work.py; served back by api.py and work_files.py). Runtime runs the background work that keeps
instances in order (pool.py, culler.py). Clients are bounded in time and number:
request heads by deadlines.py (time) and heads.py (bytes, lines), upload bodies by upload.py,
WebSocket messages by websocket_bound.py (or not parsed at all: passthrough.py). Instances'
answers must begin in time (upstream_deadline.py).
"""

from api import Api
from config import Config
from connect_deadline import ConnectDeadline
from deadlines import HeaderDeadline
from deadlines import OneRequestAtATime
from guards import FailClosed
from guards import TransportSecurity
from guards import TrimWebSockets
from heads import HeadBounds
from listener import SharedPort
from metrics import Metrics
from passthrough import WebSocketPassthrough
from router import Router
from runtime import Runtime
from session_expiry import SessionExpiry
from upload import UploadSink
from upstream_deadline import UpstreamDeadline
from websocket_bound import WebSocketBound
from work_files import WorkFiles

runtime = Runtime()  # also an addon: running() starts the pool, culling and exit events; done() stops them
deadline = HeaderDeadline(runtime)  # closes connections whose request head does not come in time
sink = UploadSink(runtime)  # also an addon: a loopback server that drains upload bodies (upload.py)
files = WorkFiles()  # also an addon: a loopback server that streams saved works (work_files.py)

addons = [
    Config(runtime.apply),
    deadline,
    HeadBounds(runtime),  # request heads within datalab_max_head bytes and _lines, or 431
    runtime,
    sink,
    files,
    Metrics(runtime),  # before the api: GET /datalab/metrics with the token (metrics.py)
    Api(runtime, sink, files),
    Router(runtime, sink),
    FailClosed(runtime, sink, files),
    TransportSecurity(runtime),
    TrimWebSockets(),
    ConnectDeadline(runtime),  # a connection to an instance opens within datalab_connect_timeout, or 502
    UpstreamDeadline(runtime),  # an instance's answer begins within datalab_upstream_timeout, or 504
    WebSocketBound(runtime),  # a WebSocket message is held up to datalab_max_ws_message
    WebSocketPassthrough(runtime),  # datalab_websocket=passthrough: routed WebSockets relayed as raw TCP
    SessionExpiry(runtime),  # an open WebSocket is closed when its session expires
    OneRequestAtATime(),  # after the others: a flow is claimed (upload or not) before reading pauses
    SharedPort(runtime),  # run.sh --workers: several processes on one port
    deadline.after,  # last: a request is over once every other addon is done with it
]

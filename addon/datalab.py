"""datalab proxy: a mitmproxy addon that starts a Jupyter instance per upload and routes each
browser to its own instance.

    mitmdump -s addon/datalab.py --mode reverse:http://127.0.0.1:1 \
        --set connection_strategy=lazy --set keep_host_header=true --set datalab_sign_key=...

Wiring only. A request goes: Api.requestheaders (/datalab/*: api.py) or Router.requestheaders
(everything else: router.py, cookie -> Redis -> instance), then FailClosed (guards.py).
"""

from config import Config
from runtime import Runtime

from api import Api
from guards import FailClosed
from guards import TrimWebSockets
from router import Router

runtime = Runtime()


class Lifecycle:
    """Start-up checks and clean shutdown of the shared parts."""

    async def running(self) -> None:
        await runtime.running()

    async def done(self) -> None:
        await runtime.done()


addons = [Config(runtime.apply), Lifecycle(), Api(runtime), Router(runtime), FailClosed(), TrimWebSockets()]

"""The production entry point: the datalab addons in a mitmproxy master that carries only what a
reverse proxy needs, with hooks dispatched to the addons that have them.

    python addon/lean.py --mode reverse:http://127.0.0.1:1 --set datalab_sign_key=... [options]
    (./run.sh --lean does this)

Why: mitmdump carries ~35 addons (playback, export, the flow dumper ...), and mitmproxy's addon
manager asks every one of them for every hook of every flow, about a third of a request's CPU
(../shared/notes/mitmproxy-scaling.md). Here the chain is mitmproxy's core, the proxy server, layer
selection, TLS, h2c refusal and start-up error checks, then datalab's own addons (datalab.py); flows
are not printed, and routed WebSockets pass through unparsed (datalab_websocket=passthrough, unless
DATALAB_WEBSOCKET or --set says otherwise). `mitmdump -s addon/datalab.py` and mitmweb run the very
same addons, for debugging.
It takes mitmdump's arguments that matter here: --mode, --listen-host, --listen-port, --certs,
--set, -q and -v; scripts (-s) are not loaded.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from collections.abc import Sequence

from mitmproxy import addonmanager
from mitmproxy import exceptions
from mitmproxy import hooks
from mitmproxy import master
from mitmproxy import options
from mitmproxy.addons import core
from mitmproxy.addons import disable_h2c
from mitmproxy.addons import errorcheck
from mitmproxy.addons import next_layer
from mitmproxy.addons import proxyserver
from mitmproxy.addons import termlog
from mitmproxy.addons import tlsconfig
from mitmproxy.tools import main as tools_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # datalab's modules, as under mitmdump -s

# datalab_websocket's default here, where nobody watches flows: WebSockets at wire speed, unparsed.
PASSTHROUGH_ENV = "DATALAB_WEBSOCKET"
Handlers = list[list[Callable]]  # per top-level addon that has the hook: its own and its children's


class HookIndex(addonmanager.AddonManager):
    """mitmproxy's addon manager, but each hook goes only to the addons that implement it: which
    those are is worked out once per hook name, and again whenever an addon comes or goes. Errors
    and AddonHalt are handled per top-level addon, as mitmproxy does."""

    def __init__(self, m: master.Master):
        super().__init__(m)
        self._index: dict[str, Handlers] = {}

    def register(self, addon):
        self._index.clear()
        return super().register(addon)

    def remove(self, addon) -> None:
        self._index.clear()
        super().remove(addon)

    def _handlers(self, event: hooks.Hook) -> Handlers:
        found = self._index.get(event.name)
        if found is None:
            per_top = ([func for _, func in self._iter_hooks(top, event)] for top in self.chain)
            found = self._index[event.name] = [funcs for funcs in per_top if funcs]
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        args = event.args()
        for funcs in self._handlers(event):
            try:
                with addonmanager.safecall():
                    for func in funcs:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return


class LeanMaster(master.Master):
    def __init__(self, opts: options.Options, with_termlog: bool = True):
        super().__init__(opts, with_termlog=False)
        self.addons = HookIndex(self)
        if with_termlog:
            self._termlog_addon = termlog.TermLog()
            self.addons.add(self._termlog_addon)
        self.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            disable_h2c.DisableH2C(),
            errorcheck.ErrorCheck(),
        )

    async def run(self) -> None:
        """datalab's addons come once the command line is read, as mitmdump loads a -s script: their
        options (--set datalab_...) wait until then, and are checked as they are declared."""
        os.environ.setdefault(PASSTHROUGH_ENV, "passthrough")  # WebSockets unparsed here (passthrough.py)
        import datalab

        with addonmanager.safecall():  # a bad option is logged: errorcheck then ends the start-up
            self.addons.add(*datalab.addons)
            for addon in datalab.addons:  # as mitmproxy configures a -s script once loaded: every option
                self.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(self.options.keys())))
        await super().run()


def make_parser(opts: options.Options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lean.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="show versions and exit")
    parser.add_argument("--options", action="store_true", help="show every option and exit")
    parser.add_argument("--commands", action="store_true", help="show every command and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    for name, short in (("mode", "m"), ("listen_host", None), ("listen_port", "p"), ("certs", None)):
        opts.make_parser(parser, name, short=short)
    parser.add_argument("--set", dest="setoptions", action="append", default=[], metavar="option[=value]")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    tools_main.run(LeanMaster, make_parser, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

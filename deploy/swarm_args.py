"""`./run.sh --swarm`'s mitmproxy arguments, read as every replica's mitmdump reads them (after
deploy/proxy-entrypoint.sh's own), so deploy/swarm.sh can refuse at once, before anything is deployed,
those that would leave the published port answering nothing.

A replica listens in reverse mode on port 8080 of its container, on all its addresses: that is where the
routing mesh (or the edge) sends each connection. Another port (-p, --listen-port, --set listen_port=), an
address (--listen-host: the container's loopback, say) or another mode would leave every request hanging
with nothing said; the published port is DATALAB_PORT. The stack runs the Swarm backend, so another
datalab_backend is refused too. Prints one refusal per line; exits 1 if any, 2 if mitmdump would refuse
the arguments itself (argparse says why), 0 when they are fine.

    python deploy/swarm_args.py [mitmproxy arguments ...]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from mitmproxy import options
from mitmproxy.tools import cmdline

# The options that decide where a replica listens, and the flags that set them.
LISTENING = {"listen_port": "-p/--listen-port", "listen_host": "--listen-host", "mode": "-m/--mode"}
WHY = (
    "is not for --swarm: every replica listens in reverse mode on port 8080 of its container, where the"
    " published port DATALAB_PORT (default 8080) reaches it"
)


def flag_value(value: object) -> str:
    """As given: a flag repeated (--mode, appended to a list) shows each value."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def refusals(args: list[str]) -> Iterator[str]:
    """What the arguments set that a replica must not be given, in words (and what to do instead)."""
    parser = cmdline.mitmdump(options.Options())
    parser.prog = "mitmdump (every replica's)"
    parsed = parser.parse_args(args)  # argparse exits 2, saying why, on what mitmdump refuses
    given = {  # option -> (as given, its value)
        name: (f"{LISTENING[name]} {flag_value(getattr(parsed, name))}", flag_value(getattr(parsed, name)))
        for name in LISTENING
        if getattr(parsed, name) is not None
    }
    for setting in parsed.setoptions:
        name, _, value = setting.partition("=")
        if name in LISTENING:
            given[name] = (f"--set {setting}", value)
        elif name == "datalab_backend" and value != "swarm":
            yield f"--set {setting} is not for --swarm: its replicas run the Swarm backend (datalab_backend=swarm)"
    for name, (shown, value) in given.items():
        if name == "listen_port" and value.isdigit():
            yield f"{shown} {WHY}: to serve on port {value}, set DATALAB_PORT={value} instead"
        else:
            yield f"{shown} {WHY}: set the port to serve on with DATALAB_PORT (published on every node's addresses)"


def main() -> int:
    found = list(refusals(sys.argv[1:]))
    for refusal in found:
        print(refusal)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

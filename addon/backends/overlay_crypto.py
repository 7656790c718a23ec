"""Whether the instances' overlay can be `encrypted`: the kernel's IPsec ESP, looked for, never required.

Traffic between the proxy and an instance on another node crosses the hosts' network inside VXLAN,
readable there (the instance's secret, every notebook's data). Docker encrypts an overlay made with
`--opt encrypted` with IPsec ESP in the kernel (CONFIG_INET_ESP); where the kernel lacks it, the
engine still makes the network and traffic between nodes fails or goes in clear, depending on the
version. So the Swarm backend makes its overlay encrypted only where this node's kernel shows ESP, and
says at start-up which it is (the other nodes' kernels cannot be seen from here: docs/operations.md).

Read from /proc/kallsyms (readable in a container; esp4's symbols are there when built in or
loaded); a kernel without modules (no /proc/modules) has nothing more; else the kernel's module
directory (esp4.ko, which the kernel loads on the first ESP state; deploy/datalab-stack.yml says how
to mount /lib/modules into the proxy read-only for this); nothing readable: unknown, and the overlay is made
unencrypted.
"""

from __future__ import annotations

import os
from pathlib import Path

ESP_SYMBOLS = (" esp_output", " esp_input")  # esp4.c's, as `<address> <type> <name>` lines end
ENCRYPTED = "encrypted"  # the overlay driver's option


def esp_in_symbols(kallsyms: str) -> bool:
    """Whether the kernel's symbol table (/proc/kallsyms' text) holds ESP's functions."""
    return any(line.endswith(ESP_SYMBOLS) for line in kallsyms.splitlines())


def esp_as_module(modules: Path) -> bool:
    """Whether the kernel's module tree (/lib/modules/<release>) has esp4, compressed or not."""
    return any(modules.glob("kernel/net/ipv4/esp4.ko*"))


def kernel_has_esp(proc: Path = Path("/proc"), lib: Path = Path("/lib/modules")) -> bool | None:
    """True or False where the kernel says, None where nothing could be read. Blocking: in a thread."""
    try:
        if esp_in_symbols((proc / "kallsyms").read_text(errors="replace")):
            return True
    except OSError:
        return None
    if not (proc / "modules").exists():
        return False  # a kernel without loadable modules: what it has is built in, and ESP is not
    modules = lib / os.uname().release
    return esp_as_module(modules) if modules.is_dir() else None


def encryption_note(name: str, options: dict[str, str], esp: bool | None) -> str:
    """The start-up line: whether the overlay is encrypted, and what to do where it is not."""
    if ENCRYPTED in options:
        return f"datalab: the instances' overlay {name} is encrypted (IPsec ESP between nodes)"
    if esp:
        return (
            f"datalab: the instances' overlay {name} is not encrypted though this kernel has ESP: "
            f"remove it (docker network rm {name}) to have it made encrypted, or make it with --opt encrypted"
        )
    why = "cannot tell whether this kernel has ESP" if esp is None else "this kernel lacks ESP (CONFIG_INET_ESP)"
    return (
        f"datalab: the instances' overlay {name} is not encrypted: {why}; traffic to instances on other "
        f"nodes crosses the hosts' network in clear (use a private network between nodes)"
    )

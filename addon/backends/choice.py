"""Which backend runs instances: the registry of backend classes, and datalab_backend=auto's choice.

Adding a backend: write its class (backends/__init__.py says what it implements) and list it in
BACKENDS. Its Options fields become datalab_* options by themselves (config.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from backends import Backend
from backends import Limits
from backends.docker_engine import DockerBackend
from backends.local_process import ProcessBackend
from backends.swarm import SwarmBackend

log = logging.getLogger(__name__)

# In the order datalab_backend=auto prefers them: the first that can run here is chosen.
AUTO_ORDER: tuple[type[Backend], ...] = (DockerBackend, ProcessBackend)
# Chosen by name only: swarm needs the proxy inside the cluster's overlay, a deployment decision.
BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (*AUTO_ORDER, SwarmBackend)}
AUTO = "auto"
CHOICES = (AUTO, *BACKENDS)


def option_fields() -> list[dataclasses.Field]:
    """Every backend's option fields, each name once: backends may share an option (a Swarm backend
    takes the Docker backend's datalab_image) by declaring the same field (e.g. by subclassing)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in BACKENDS.values():
        for f in dataclasses.fields(cls.Options):
            fields.setdefault(f.name, f)
    return list(fields.values())


def options_of(cls: type[Backend], values: dict[str, Any]) -> Any:
    """The backend's Options from option values keyed by field name (missing ones: defaults).
    Raises ValueError naming the option when a value is refused."""
    names = {f.name for f in dataclasses.fields(cls.Options)}
    return cls.Options(**{k: v for k, v in values.items() if k in names})


def choose(name: str, values: dict[str, Any]) -> tuple[type[Backend], str]:
    """The backend class to use and why: the one named, or with auto the first that can run here
    (none: the last, whose answers then say what is missing until an operator installs it)."""
    if name != AUTO:
        return BACKENDS[name], "datalab_backend=" + name
    reasons = []
    for cls in AUTO_ORDER:
        usable, reason = cls.probe(options_of(cls, values))
        reasons.append(reason)
        if usable:
            break
    else:
        reasons.append("none can run here yet")
    return cls, "datalab_backend=auto: " + "; ".join(reasons)


def build(name: str, values: dict[str, Any], limits: Limits, profiles: dict[str, Limits] | None = None) -> Backend:
    """The backend for these settings; says which one and why (the proxy's first datalab log line).
    ValueError when it cannot honour a profile (Backend.refusal)."""
    cls, reason = choose(name, values)
    log.info("datalab: instances run on the %s backend (%s)", cls.name, reason)
    return cls(limits, options_of(cls, values), profiles)

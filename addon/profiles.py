"""Profiles: the operator's named kinds of instance (datalab_profiles, a TOML or JSON file), each an
image, limits, environment variables, a warm pool and culling times, so a start can ask for more
memory than the default (`profile=big`) without every instance getting it.

The file holds one table per profile; each field it leaves out is the default profile's, but
pool_size (0: a profile keeps no pool unless it says so). `default` is the proxy's own options, and a
file may redefine its fields too. Everything is checked when the file is read, at start-up: a
bad file stops the proxy with a message naming the profile and the field. Pure rules: reading the
file is the only I/O, and the field rules come from the caller (config.py's options').
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

import inputs
from backends import RESERVED_ENV
from backends import RESERVED_ENV_PREFIXES
from backends import Limits

DEFAULT = "default"  # the profile of a start that names none: the proxy's own options
# A profile's fields, each with its type: config.py's options of the same name hold their rules.
LIMITS = {"mem_limit": str, "cpus": str, "pids_limit": int, "disk_limit": str}
TIMES = {"idle_timeout": int, "max_age": int, "pool_size": int}
FIELDS = ("image", *LIMITS, *TIMES, "env")
MAX_PROFILES = 64
MAX_ENV = 64  # variables per profile
MAX_ENV_VALUE = 4096  # characters
MAX_INTEGER = 2**31 - 1  # a count or seconds (68 years): what every consumer of one takes
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")

# What is wrong with a field's value (its option's rule), or None.
Rules = Mapping[str, Callable[[Any], str | None]]


@dataclass(frozen=True)
class Profile:
    """One kind of instance: what the backend starts it with, how many wait ready in its pool, and
    when culling ends it."""

    name: str
    limits: Limits  # image ('' = datalab_image), memory, CPUs, processes, disk, environment
    idle_timeout: int
    max_age: int
    pool_size: int


def read_file(path: str, rules: Rules) -> dict[str, dict[str, Any]]:
    """The profiles file's tables, checked (`check_tables`); ValueError naming the file, and the
    profile and field at fault."""
    where = f"datalab_profiles: {path}"
    try:
        text = Path(path).read_bytes().decode()
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot be read ({e})") from e
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{where}: is not valid {'JSON' if path.endswith('.json') else 'TOML'} ({e})") from e
    try:
        return check_tables(data, rules)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def check_tables(data: Any, rules: Rules) -> dict[str, dict[str, Any]]:
    """The profiles, name -> fields, each value checked and of its field's type (a number of CPUs
    may be written as a number); ValueError says which profile and field, and why."""
    if not isinstance(data, dict):
        raise ValueError("must be a table of profiles, one table each")
    if len(data) > MAX_PROFILES:
        raise ValueError(f"declares {len(data)} profiles; at most {MAX_PROFILES}")
    tables = {}
    for name, table in data.items():
        try:
            inputs.check_profile_name(name)
        except ValueError as e:
            raise ValueError(f"profile {name!r}: the name is not valid: {e}") from e
        if not isinstance(table, dict):
            raise ValueError(f"profile {name!r}: must be a table of fields")
        tables[name] = {field: _checked(name, field, value, rules) for field, value in table.items()}
    return tables


def _checked(profile: str, field: str, value: Any, rules: Rules) -> Any:
    def refuse(problem: str) -> ValueError:
        return ValueError(f"profile {profile!r}, field {field}: {problem}")

    if field not in FIELDS:
        raise refuse(f"is not a profile's field (they are: {', '.join(FIELDS)})")
    if field == "env":
        problem = env_problem(value)
    elif field == "image":
        problem = None if isinstance(value, str) and _IMAGE.fullmatch(value) else "must name a local image"
    else:
        value = _typed(value, {**LIMITS, **TIMES}[field], numeric=field == "cpus")
        problem = "has the wrong type" if value is None else _too_large(value) or rules[field](value)
    if problem is not None:
        raise refuse(problem)
    return dict(value) if field == "env" else value


def _typed(value: Any, kind: type, numeric: bool) -> Any:
    """The value as its field's type, or None: an integer is never a bool; a `numeric` string (CPUs)
    may be written as a number."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return value if is_number and isinstance(value, int) else None
    if numeric and is_number:
        return str(value)
    return value if isinstance(value, str) else None


def _too_large(value: Any) -> str | None:
    """An integer no engine (pids), Redis TTL or timer takes: refused here, not at each start."""
    return f"is larger than {MAX_INTEGER}" if isinstance(value, int) and value > MAX_INTEGER else None


def env_problem(env: Any) -> str | None:
    """What is wrong with a profile's environment variables, or None: names of letters, digits and
    '_'; values of printable characters without newlines; none the proxy sets itself (RESERVED_ENV)."""
    if not isinstance(env, dict):
        return "must be a table of NAME = value"
    if len(env) > MAX_ENV:
        return f"has {len(env)} variables; at most {MAX_ENV}"
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):  # not match: `$` matches before a final newline
            return f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)"
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            return f"{name} is set by the proxy itself and may not be overridden"
        if not isinstance(value, str) or len(value) > MAX_ENV_VALUE or not value.isprintable():
            return f"{name} must be a string of at most {MAX_ENV_VALUE} printable characters (no newlines)"
    return None


def build(tables: Mapping[str, Mapping[str, Any]], default: Profile, default_image: str) -> dict[str, Profile]:
    """Every profile by name: `default` (the options, with the file's default table already applied
    to them) and the file's others, each field it leaves out the default's (but pool_size: 0). An
    image equal to datalab_image is the default ('')."""
    own = tables.get(DEFAULT, {})
    default = _apply(default, {f: v for f, v in own.items() if f in ("image", "env")}, default_image)
    found = {DEFAULT: default}
    for name, table in tables.items():
        if name != DEFAULT:
            found[name] = _apply(replace(default, name=name, pool_size=0), table, default_image)
    return found


def _apply(base: Profile, table: Mapping[str, Any], default_image: str) -> Profile:
    """The profile `base` with the table's fields."""
    limits = {f: (float(v) if f == "cpus" else v) for f, v in table.items() if f in LIMITS}
    if "env" in table:
        limits["env"] = dict(table["env"])
    if "image" in table:
        limits["image"] = "" if table["image"] == default_image else table["image"]
    times = {f: v for f, v in table.items() if f in TIMES}
    return replace(base, limits=replace(base.limits, **limits), **times)

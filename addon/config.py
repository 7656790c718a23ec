"""All datalab_* options: declared in load(), validated in configure(), frozen into Settings.

Only this addon reads ctx.options; everything else receives a Settings value, so tests build one
directly and a bad option fails at start-up, not on the first request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from mitmproxy import ctx
from mitmproxy import exceptions
from redis.asyncio.connection import parse_url

import sentinel
import signing
from backends import Limits
from backends import choice
from backends import memory_budget
from paths import STATE

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SAMESITE = ("Lax", "Strict", "None")
ROUTINGS = ("cookie", "subdomain")
HOST_COOKIE_PREFIX = "__Host-"
# Without these, a client connection dies before the hooks run, or the instance sees the wrong Host.
MITMPROXY_REQUIRED = {"connection_strategy": "lazy", "keep_host_header": True}
# mitmproxy's default kills every client with a public address; a proxy facing the internet must serve them.
MITMPROXY_FORCED = {"block_global": False}
# Instances' answers up to this size are held (mitmweb shows them); bigger ones, and chunked ones once
# they pass it, stream through, so a 1 GiB download costs the proxy this much, not 1 GiB. Set when
# unset. (Clients' routed bodies always stream: router.py.)
MITMPROXY_DEFAULTS = {"stream_large_bodies": "256k"}
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(:[0-9]{1,5})?$"
)
_ORIGIN_RE = re.compile(r"^https?://[^/?#@\s]+$")


# The Redis run.sh starts (scripts/setup.sh ensure_redis): a Unix socket in a directory only its user
# may enter, which no instance can reach or pose as (a loopback port, process instances could).
LOCAL_REDIS_URL = "unix://" + quote(f"{STATE}/redis/local/redis.sock")


@dataclass(frozen=True)
class Settings:
    sign_key: str = ""
    redis_url: str = LOCAL_REDIS_URL
    redis_timeout: int = 3
    key_prefix: str = "datalab:"
    backend: str = "auto"
    nonce_ttl: int = 600
    session_ttl: int = 86400
    cookie_name: str = "datalab_session"
    cookie_samesite: str = "Lax"
    cookie_secure: bool = False
    sign_scheme: str = "sha256"
    allowed_origins: str = ""
    routing: str = "cookie"
    public_host: str = ""
    max_upload: int = 100 * MIB
    upload_timeout: int = 300
    max_uploads: int = 64
    max_ws_message: int = 64 * MIB
    header_timeout: int = 60
    upstream_timeout: int = 120
    max_head: int = 64 * 1024  # tornado's own limit (Jupyter Server runs on it): what passes here, it takes
    max_head_lines: int = 100
    max_skew: int = 300
    start_timeout: int = 60
    mem_limit: str = "1g"
    cpus: str = "1.0"
    pids_limit: int = 256
    disk_limit: str = memory_budget.AUTO
    route_cache_ttl: int = 5
    pool_size: int = 2
    start_concurrency: int = 0
    queue_timeout: int = 30
    max_instances: int = 0
    idle_timeout: int = 1800
    max_age: int = 28800
    cull_interval: int = 60
    work_dir: str = str(STATE / "work")
    work_max: str = memory_budget.AUTO
    work_ttl: int = 7 * 86400
    work_timeout: int = 45
    unpack_max_entries: int = 10000
    # The chosen backend's own options (and the others'), keyed by field name: backends/choice.py.
    backend_options: dict[str, typing.Any] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def limits(self) -> Limits:
        """What every backend gets: whose instances, and their limits (a disk limit of auto is made a
        size by the backend: what fits beside Jupyter in a container's memory limit)."""
        return Limits(
            label_prefix=self.key_prefix,
            mem_limit=self.mem_limit,
            cpus=float(self.cpus),
            pids_limit=self.pids_limit,
            disk_limit=self.disk_limit,
            start_timeout=float(self.start_timeout),
        )

    @property
    def boot_concurrency(self) -> int:
        """Cold starts booting at once in this process: the option, or one per CPU."""
        return self.start_concurrency or os.cpu_count() or 1

    @functools.cached_property
    def session_cookie(self) -> str:
        """The cookie's name: a Secure cookie gets the __Host- prefix, so no subdomain or plain-HTTP
        page can set or shadow it (browsers then insist on Secure, Path=/ and no Domain)."""
        return HOST_COOKIE_PREFIX + self.cookie_name if self.cookie_secure else self.cookie_name

    @functools.cached_property
    def origins(self) -> frozenset[str]:
        """Origins other than the request's own that may open a WebSocket to an instance (read on
        every routed request: worked out once)."""
        return frozenset(o.strip().lower().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())


# name (without the datalab_ prefix), environment variable for the default or None, help text.
_HELP: dict[str, tuple[str | None, str]] = {
    "sign_key": ("DATALAB_SIGN_KEY", "Shared secret for X-SIGN = sha256(sign_key + ts + filename). Required."),
    "redis_url": (
        "DATALAB_REDIS_URL",
        "Redis holding nonces, sessions and instances: unix://<socket> (run.sh starts the default one), "
        "redis://host:port/db, or "
        "redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/db] (its primary, through Sentinel)",
    ),
    "redis_timeout": (
        None,
        "Seconds a Redis call may take, retries and reconnects included; then 503 REDIS_UNAVAILABLE.",
    ),
    "key_prefix": ("DATALAB_KEY_PREFIX", "Prefix of every Redis key (and container label) this proxy owns."),
    "backend": (
        "DATALAB_BACKEND",
        "What runs instances: docker, process (local Jupyter processes) or auto (docker when an engine answers).",
    ),
    "nonce_ttl": (None, "Seconds a nonce from /datalab/start stays valid."),
    "session_ttl": (None, "Seconds a browser session (cookie) stays bound to its instance."),
    "cookie_name": (None, "Name of the session cookie set by /datalab/view."),
    "cookie_samesite": (None, "SameSite attribute of the session cookie: Lax, Strict or None."),
    "cookie_secure": (None, "Mark the session cookie Secure, with the __Host- prefix (serve the proxy over HTTPS)."),
    "sign_scheme": (
        "DATALAB_SIGN_SCHEME",
        "X-SIGN scheme: sha256 (the seed's) or hmac-sha256 (over ts + newline + subject).",
    ),
    "allowed_origins": (
        None,
        "Comma-separated origins (https://app.example.com) besides the request's own that may open WebSockets.",
    ),
    "routing": (
        "DATALAB_ROUTING",
        "cookie: every instance on the proxy's host; subdomain: each on <label>.<public_host>.",
    ),
    "public_host": (
        "DATALAB_PUBLIC_HOST",
        "The proxy's public host name (datalab.example.com[:port]); subdomain routing needs it.",
    ),
    "max_upload": (None, "Largest accepted upload body, in bytes."),
    "upload_timeout": (
        None,
        "Seconds an upload body (a start's, or a refused request's) may take to arrive after its headers; "
        "then it is cut: 408 UPLOAD_TIMEOUT.",
    ),
    "max_uploads": (
        None,
        "Upload bodies arriving at this proxy process at once; beyond it a request is refused at once "
        "(503 CAPACITY) without its body being read.",
    ),
    "max_ws_message": (
        None,
        "Largest WebSocket message, in bytes, either way (a kernel's output too); past it the WebSocket "
        "closes with 1009.",
    ),
    "header_timeout": (
        None,
        "Seconds a client connection may take to send a request head, from its opening or from its "
        "previous answer (an idle kept-alive connection is closed after it).",
    ),
    "upstream_timeout": (
        None,
        "Seconds an instance may take to begin its answer (its head; a WebSocket: its 101) once a request "
        "has reached it whole; then 504 UPSTREAM_TIMEOUT. A begun answer or an open WebSocket is never cut.",
    ),
    "max_head": (
        None,
        "Largest request head (request line and headers), in bytes; a bigger one is refused before it is "
        "parsed: 431 HEAD_TOO_LARGE, and the connection closes.",
    ),
    "max_head_lines": (None, "Most lines in a request head (request line and headers); beyond it 431 HEAD_TOO_LARGE."),
    "max_skew": (None, "Seconds a signed ts may differ from the proxy's clock."),
    "start_timeout": (None, "Seconds to wait for a new instance's Jupyter to answer /api/status."),
    "mem_limit": (None, "Memory limit of each instance (512m, 1g; the process backend: per process)."),
    "cpus": (None, "CPU limit of each instance, in CPUs (not enforced by the process backend)."),
    "pids_limit": (None, "Process-count limit of each instance (the process backend: only when run as root)."),
    "disk_limit": (
        None,
        "Docker, swarm: size of each instance's writable places (work directory, /tmp), in memory; they must fit "
        "in datalab_mem_limit beside Jupyter; auto: what fits, (mem_limit - 448m) / 2. Process backend: "
        "largest file. 256m, 1g or auto.",
    ),
    "route_cache_ttl": (None, "Seconds a session's route is cached in memory (0 disables the cache)."),
    "pool_size": (None, "Instances kept started and ready for the next uploads, shared by all proxies on the Redis."),
    "start_concurrency": (None, "Instances booting at once in this proxy; 0 means one per CPU."),
    "queue_timeout": (None, "Seconds a start may wait for a boot slot before 503 CAPACITY."),
    "max_instances": (
        None,
        "Live and pooled instances across all proxies on the Redis; 0: what the engine's memory holds.",
    ),
    "idle_timeout": (
        None,
        "Seconds without a person's activity (a page loaded, a file opened or saved, code run, a terminal "
        "used; not an open tab's own polling) after which an instance is removed (not while a kernel is busy).",
    ),
    "max_age": (None, "Seconds after which an instance is removed, however busy."),
    "cull_interval": (None, "Seconds between rounds of culling and reconciliation."),
    "work_dir": (
        "DATALAB_WORK_DIR",
        "The work store: where an ended instance's working directory is saved as one tar.gz (created 0700; "
        "shared by every proxy on the Redis).",
    ),
    "work_max": (
        None,
        "Largest saved work (the tar.gz), bytes with an optional k/m/g; auto: the instance's disk limit and "
        "the archive's own overhead. A bigger one is abandoned: its work is unsaved.",
    ),
    "work_ttl": (None, "Seconds a saved work is kept after its instance ended (then the culler removes it)."),
    "work_timeout": (
        None,
        "Seconds saving one instance's work may take; then it is abandoned (unsaved) and the end goes on.",
    ),
    "unpack_max_entries": (None, "Most entries in an archive a start unpacks (unpack=1)."),
}

_DEFAULTS = Settings()


def option_name(field: str) -> str:
    return f"datalab_{field}"


def _shared_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if f.name != "backend_options"]


def _typed_default(default: typing.Any, env: str | None) -> typing.Any:
    """The option default: the environment variable when set, else the given default."""
    raw = os.environ.get(env) if env else None
    if raw is None or raw == "":
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(default)(raw)


def add_options(add_option: Callable[..., None]) -> None:
    for field in _shared_fields():
        env, help_text = _HELP[field.name]
        default = getattr(_DEFAULTS, field.name)
        add_option(option_name(field.name), type(default), _typed_default(default, env), help_text)
    for field in choice.option_fields():
        env, help_text = field.metadata["env"], field.metadata["help"]
        add_option(option_name(field.name), type(field.default), _typed_default(field.default, env), help_text)


def _default_of(name: str) -> typing.Any:
    """An option's default as the proxy would take it (its environment variable, else built in)."""
    field = name.removeprefix("datalab_")
    if field in _HELP:
        return _typed_default(getattr(_DEFAULTS, field), _HELP[field][0])
    spec = next(f for f in choice.option_fields() if f.name == field)
    return _typed_default(spec.default, spec.metadata["env"])


def settings_from_environment(**changes: typing.Any) -> Settings:
    """Settings as a proxy started in this environment would have them (scripts act as the proxy does)."""
    values = option_values(_default_of)
    return Settings(**{**values, **changes})


def option_values(get: Callable[[str], typing.Any]) -> dict[str, typing.Any]:
    """Settings' keyword arguments from option values (`get` reads datalab_<name>)."""
    values = {f.name: get(option_name(f.name)) for f in _shared_fields()}
    values["backend_options"] = {f.name: get(option_name(f.name)) for f in choice.option_fields()}
    return values


def parse_settings(values: dict[str, typing.Any]) -> Settings:
    """Settings from option values (keyed by field name); ValueError says which one is wrong and why."""
    s = Settings(**values)
    _require(s.backend in choice.CHOICES, "backend", f"must be one of {', '.join(choice.CHOICES)}")
    for cls in choice.BACKENDS.values():
        choice.options_of(cls, s.backend_options)  # each refuses its own bad values
    _require(bool(s.sign_key), "sign_key", "is required: set DATALAB_SIGN_KEY or --set datalab_sign_key=...")
    _check_redis_url(s.redis_url)
    _require(bool(s.key_prefix) and " " not in s.key_prefix, "key_prefix", "must be non-empty without spaces")
    positive = ("nonce_ttl", "session_ttl", "max_upload", "max_skew", "pids_limit", "start_timeout")
    positive += ("queue_timeout", "idle_timeout", "max_age", "cull_interval")
    positive += ("upload_timeout", "max_uploads", "header_timeout")
    positive += ("max_ws_message",)
    positive += ("upstream_timeout",)
    positive += ("max_head", "max_head_lines")
    positive += ("redis_timeout",)
    positive += ("work_ttl", "work_timeout", "unpack_max_entries")
    for name in positive:
        _require(getattr(s, name) > 0, name, "must be positive")
    for name in ("route_cache_ttl", "pool_size", "start_concurrency", "max_instances"):
        _require(getattr(s, name) >= 0, name, "must be zero or positive")
    _require(_positive_number(s.cpus), "cpus", "must be a positive number of CPUs, e.g. 0.5 or 2")
    _require(
        s.cookie_name.isascii() and s.cookie_name.replace("_", "").replace("-", "").isalnum(),
        "cookie_name",
        "must be letters, digits, '_' or '-'",
    )
    _require(s.cookie_samesite in SAMESITE, "cookie_samesite", f"must be one of {', '.join(SAMESITE)}")
    _require(
        not (s.cookie_samesite == "None" and not s.cookie_secure),
        "cookie_samesite",
        "None needs datalab_cookie_secure=true (browsers refuse it otherwise)",
    )
    _require(bool(re.fullmatch(r"[0-9]+[bkmgBKMG]?", s.mem_limit)), "mem_limit", "must look like 512m or 1g")
    _require(
        bool(re.fullmatch(r"auto|[1-9][0-9]*[kmgKMG]?", s.disk_limit)), "disk_limit", "must look like 256m, 1g or auto"
    )
    _check_in_memory_fit(s)
    _require(
        bool(re.fullmatch(r"auto|[1-9][0-9]*[kmgKMG]?", s.work_max)), "work_max", "must look like 256m, 1g or auto"
    )
    _require(os.path.isabs(s.work_dir), "work_dir", "must be an absolute path")
    _require(s.sign_scheme in signing.SCHEMES, "sign_scheme", f"must be one of {', '.join(signing.SCHEMES)}")
    for origin in s.origins:
        _require(
            bool(_ORIGIN_RE.match(origin)), "allowed_origins", f"has {origin!r}, not an origin like https://host[:port]"
        )
    _require(s.routing in ROUTINGS, "routing", f"must be one of {', '.join(ROUTINGS)}")
    _require(
        s.public_host == "" or bool(_HOST_RE.match(s.public_host)),
        "public_host",
        "must be a lowercase host name with an optional port, e.g. datalab.example.com",
    )
    _require(
        s.routing != "subdomain" or bool(s.public_host), "public_host", "is required with datalab_routing=subdomain"
    )
    return s


def _check_in_memory_fit(s: Settings) -> None:
    """Container instances keep their writable places in memory: they must fit in the memory limit
    (backends/memory_budget.py). Not the process backend's concern (its disk limit is a file size)."""
    if s.backend != "process" and (problem := memory_budget.misfit(s.mem_limit, s.disk_limit)):
        raise ValueError(problem)


def _check_redis_url(url: str) -> None:
    """A plain Redis URL, or a redis+sentinel:// one (sentinel.py gives its syntax)."""
    if sentinel.is_sentinel_url(url):
        try:
            sentinel.parse_sentinel_url(url)
        except ValueError as e:
            raise ValueError(f"{option_name('redis_url')}: {e}") from e
        return
    _require(
        url.startswith(("redis://", "rediss://", "unix://")),
        "redis_url",
        "must be a redis://, rediss://, unix:// or redis+sentinel://host:port[,host:port...]/service[/db] URL",
    )
    parse_url(url)


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{option_name(field)} {message}")


class Config:
    """Declares the options and hands a validated Settings to `on_settings` whenever they change."""

    def __init__(self, on_settings: Callable[[Settings], None]):
        self.on_settings = on_settings

    def load(self, loader) -> None:
        add_options(loader.add_option)

    def configure(self, updated: set[str]) -> None:
        # The datalab options first: the backend's choice is the first thing the proxy says.
        if any(name.startswith("datalab_") for name in updated):
            values = option_values(lambda name: getattr(ctx.options, name))
            try:
                settings = parse_settings(values)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
            self.on_settings(settings)
        for name, value in MITMPROXY_FORCED.items():
            if name in ctx.options and getattr(ctx.options, name) != value:
                log.info("datalab sets %s=%s (see README)", name, str(value).lower())
                ctx.options.update(**{name: value})
        for name, value in MITMPROXY_DEFAULTS.items():
            if name in ctx.options and getattr(ctx.options, name) is None:
                ctx.options.update(**{name: value})
        for name, value in MITMPROXY_REQUIRED.items():
            if name in updated and getattr(ctx.options, name) != value:
                log.warning("datalab needs --set %s=%s (see README); setting it", name, str(value).lower())
                ctx.options.update(**{name: value})

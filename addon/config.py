"""All datalab_* options: Settings' fields (and the backends' Options, backends/choice.py), each
declared once with options.option(); declared to mitmproxy in load(), validated in configure(),
frozen into Settings.

Only this addon reads the datalab_* options from ctx.options; every other addon reads a Settings
value from the runtime, so tests build one directly and a bad option fails at start-up, not on the
first request.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
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

import options
import profiles
import sentinel
import signing
from backends import Limits
from backends import choice
from backends import memory_budget
from options import absolute_path
from options import holds
from options import matches
from options import non_negative
from options import option
from options import option_error
from options import option_name
from options import positive
from paths import STATE

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SAMESITE = ("Lax", "Strict", "None")
ROUTINGS = ("cookie", "subdomain")
WEBSOCKET_MODES = ("parse", "passthrough")  # passthrough.py
HOST_COOKIE_PREFIX = "__Host-"
MAX_CPUS = 1_000_000  # a CPU limit in nanoseconds per second stays within Docker's int64
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
SIZE_OR_AUTO = r"auto|[1-9][0-9]*[kmgKMG]?"
# The metrics exporter's (metrics.py): its options are declared here with every other.
METRICS_PATH = "/datalab/metrics"
METRICS_TOKEN_ENV = "DATALAB_METRICS_TOKEN"
MIN_METRICS_TOKEN = 16  # characters: the token guards the proxy's public port


def parse_origins(text: str) -> frozenset[str]:
    """The comma-separated origins of datalab_allowed_origins, normalised."""
    return frozenset(o.strip().lower().rstrip("/") for o in text.split(",") if o.strip())


def _positive_number(text: str) -> bool:
    """A CPU count: positive and finite, and at most MAX_CPUS (its nanoseconds fit Docker's int64)."""
    try:
        return 0 < float(text) <= MAX_CPUS
    except ValueError:
        return False


def _origins_problem(text: str) -> str | None:
    bad = [origin for origin in parse_origins(text) if not _ORIGIN_RE.match(origin)]
    return f"has {bad[0]!r}, not an origin like https://host[:port]" if bad else None


def _ip_address_problem(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"must be an IP address (127.0.0.1, ::1), not {host!r}"
    return None


# The Redis run.sh starts (scripts/setup.sh ensure_redis): a Unix socket in a directory only its user
# may enter, which no instance can reach or pose as (a loopback port, process instances could).
LOCAL_REDIS_URL = "unix://" + quote(f"{STATE}/redis/local/redis.sock")


@dataclass(frozen=True)
class Settings:
    """Every datalab_* option but the backends' own (backends/choice.py): a field each, declared
    with its help, the environment variable of its default and its rule (options.py)."""

    sign_key: str = option(
        "",
        "Shared secret for X-SIGN = sha256(sign_key + ts + filename). Required.",
        "DATALAB_SIGN_KEY",
        check=holds(bool, "is required: set DATALAB_SIGN_KEY or --set datalab_sign_key=..."),
    )
    redis_url: str = option(
        LOCAL_REDIS_URL,
        "Redis holding nonces, sessions and instances: unix://<socket> (run.sh starts the default one), "
        "redis://host:port/db, or "
        "redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/db] (its primary, through Sentinel)",
        "DATALAB_REDIS_URL",
    )
    redis_timeout: int = option(
        3, "Seconds a Redis call may take, retries and reconnects included; then 503 REDIS_UNAVAILABLE.", check=positive
    )
    key_prefix: str = option(
        "datalab:",
        "Prefix of every Redis key (and container label) this proxy owns.",
        "DATALAB_KEY_PREFIX",
        check=holds(lambda v: bool(v) and " " not in v, "must be non-empty without spaces"),
    )
    backend: str = option(
        choice.AUTO,
        f"What runs instances: {', '.join(choice.BACKENDS)}, or {choice.AUTO} (the first of "
        f"{', '.join(cls.name for cls in choice.AUTO_ORDER)} that can run here).",
        "DATALAB_BACKEND",
        choices=choice.CHOICES,
    )
    nonce_ttl: int = option(600, "Seconds a nonce from /datalab/start stays valid.", check=positive)
    session_ttl: int = option(86400, "Seconds a browser session (cookie) stays bound to its instance.", check=positive)
    cookie_name: str = option(
        "datalab_session",
        "Name of the session cookie set by /datalab/view.",
        check=holds(
            lambda v: v.isascii() and v.replace("_", "").replace("-", "").isalnum(),
            "must be letters, digits, '_' or '-'",
        ),
    )
    cookie_samesite: str = option(
        "Lax", "SameSite attribute of the session cookie: Lax, Strict or None.", choices=SAMESITE
    )
    cookie_secure: bool = option(
        False, "Mark the session cookie Secure, with the __Host- prefix (serve the proxy over HTTPS)."
    )
    sign_scheme: str = option(
        "sha256",
        "X-SIGN scheme: sha256 (the seed's) or hmac-sha256 (over ts + newline + subject).",
        "DATALAB_SIGN_SCHEME",
        choices=signing.SCHEMES,
    )
    allowed_origins: str = option(
        "",
        "Comma-separated origins (https://app.example.com) besides the request's own that may open WebSockets.",
        check=_origins_problem,
    )
    routing: str = option(
        "cookie",
        "cookie: every instance on the proxy's host; subdomain: each on <label>.<public_host>.",
        "DATALAB_ROUTING",
        choices=ROUTINGS,
    )
    public_host: str = option(
        "",
        "The proxy's public host name (datalab.example.com[:port]); subdomain routing needs it.",
        "DATALAB_PUBLIC_HOST",
        check=holds(
            lambda v: v == "" or bool(_HOST_RE.match(v)),
            "must be a lowercase host name with an optional port, e.g. datalab.example.com",
        ),
    )
    max_upload: int = option(100 * MIB, "Largest accepted upload body, in bytes.", check=positive)
    upload_timeout: int = option(
        300,
        "Seconds an upload body (a start's, or a refused request's) may take to arrive after its headers; "
        "then it is cut: 408 UPLOAD_TIMEOUT.",
        check=positive,
    )
    uploads_at_once: int = option(
        64,
        "Upload bodies arriving at this proxy process at once; beyond it a request is refused at once "
        "(503 CAPACITY) without its body being read.",
        check=positive,
    )
    websocket: str = option(
        "parse",
        "Routed WebSockets after their handshake (Origin check and routing stay on it): parse (each message "
        "decoded, bounded by datalab_max_ws_message and shown by mitmweb) or passthrough (relayed as raw "
        "TCP, unparsed, at wire speed; the lean entry's default, run.sh --lean).",
        "DATALAB_WEBSOCKET",
        choices=WEBSOCKET_MODES,
    )
    max_ws_message: int = option(
        64 * MIB,
        "Largest WebSocket message, in bytes, either way (a kernel's output too); past it the WebSocket "
        "closes with 1009. Only with datalab_websocket=parse: a passthrough does not read messages.",
        check=positive,
    )
    header_timeout: int = option(
        60,
        "Seconds a client connection may take to send a request head, from its opening or from its "
        "previous answer (an idle kept-alive connection is closed after it).",
        check=positive,
    )
    upstream_timeout: int = option(
        120,
        "Seconds an instance may take to begin its answer (its head; a WebSocket: its 101) once a request "
        "has reached it whole; then 504 UPSTREAM_TIMEOUT. A begun answer or an open WebSocket is never cut.",
        check=positive,
    )
    connect_timeout: int = option(
        10,
        "Seconds an instance's address may take to accept a connection (once tried); then the attempt is "
        "given up (502), and the backend is asked whether the instance is gone (a lost swarm node's are).",
        check=positive,
    )
    max_head: int = option(  # tornado's own limit (Jupyter Server runs on it): what passes here, it takes
        64 * 1024,
        "Largest request head (request line and headers), in bytes; a bigger one is refused before it is "
        "parsed: 431 HEAD_TOO_LARGE, and the connection closes.",
        check=positive,
    )
    max_head_lines: int = option(
        100, "Most lines in a request head (request line and headers); beyond it 431 HEAD_TOO_LARGE.", check=positive
    )
    max_skew: int = option(300, "Seconds a signed ts may differ from the proxy's clock.", check=positive)
    start_timeout: int = option(
        60, "Seconds to wait for a new instance's Jupyter to answer /api/status.", check=positive
    )
    mem_limit: str = option(
        "1g",
        "Memory limit of each instance (512m, 1g; the process backend: per process).",
        check=matches(r"[0-9]+[bkmgBKMG]?", "must look like 512m or 1g"),
    )
    cpus: str = option(
        "1.0",
        "CPU limit of each instance, in CPUs (not enforced by the process backend).",
        check=holds(_positive_number, "must be a positive number of CPUs, e.g. 0.5 or 2"),
    )
    pids_limit: int = option(
        256, "Process-count limit of each instance (the process backend: only when run as root).", check=positive
    )
    disk_limit: str = option(
        memory_budget.AUTO,
        "Docker, swarm: size of each instance's writable places (work directory, /tmp), in memory; they must fit "
        "in datalab_mem_limit beside Jupyter; auto: what fits, (mem_limit - 448m) / 2. Process backend: "
        "largest file. 256m, 1g or auto.",
        check=matches(SIZE_OR_AUTO, "must look like 256m, 1g or auto"),
    )
    route_cache_ttl: int = option(
        5, "Seconds a session's route is cached in memory (0 disables the cache).", check=non_negative
    )
    pool_size: int = option(
        2,
        "Instances of the default profile kept started and ready for the next uploads, shared by all "
        "proxies on the Redis (each profile has its own pool: datalab_profiles).",
        check=non_negative,
    )
    boots_at_once: int = option(0, "Instances booting at once in this proxy; 0 means one per CPU.", check=non_negative)
    queue_timeout: int = option(30, "Seconds a start may wait for a boot slot before 503 CAPACITY.", check=positive)
    max_instances: int = option(
        0,
        "Live and pooled instances across all proxies on the Redis, a count; 0: what the engine's memory "
        "holds, each instance weighing its profile's memory limit.",
        check=non_negative,
    )
    max_instances_per_owner: int = option(
        0,
        "Live and starting instances one owner (a start's owner=) may hold across all proxies on the Redis; "
        "0: no cap. Starts without an owner are not capped.",
        check=non_negative,
    )
    idle_timeout: int = option(
        1800,
        "Seconds without a person's activity (a page loaded, a file opened or saved, code run, a terminal "
        "used; not an open tab's own polling) after which an instance is removed (not while a kernel is busy).",
        check=positive,
    )
    max_age: int = option(28800, "Seconds after which an instance is removed, however busy.", check=positive)
    cull_interval: int = option(60, "Seconds between rounds of culling and reconciliation.", check=positive)
    work_dir: str = option(
        str(STATE / "work"),
        "The work store: where an ended instance's working directory is saved as one tar.gz (created 0700; "
        "shared by every proxy on the Redis).",
        "DATALAB_WORK_DIR",
        check=absolute_path,
    )
    work_max: str = option(
        memory_budget.AUTO,
        "Largest saved work (the tar.gz), bytes with an optional k/m/g; auto: the instance's disk limit and "
        "the archive's own overhead. A bigger one is abandoned: its work is unsaved.",
        check=matches(SIZE_OR_AUTO, "must look like 256m, 1g or auto"),
    )
    work_ttl: int = option(
        7 * 86400,
        "Seconds a saved work is kept after its instance ended (then the culler removes it).",
        check=positive,
    )
    work_timeout: int = option(
        45,
        "Seconds saving one instance's work may take; then it is abandoned (unsaved) and the end goes on.",
        check=positive,
    )
    events_url: str = option(
        "",
        'Where each lifecycle event (docs/api.md "Events") is POSTed as JSON, signed in X-Datalab-Signature; '
        "empty: none is sent (the Redis stream <prefix>lifecycle still holds them).",
        "DATALAB_EVENTS_URL",
        check=holds(lambda v: not v or v.startswith(("http://", "https://")), "must be an http:// or https:// URL"),
    )
    events_key: str = option(
        "",
        "Key of the events' X-Datalab-Signature: sha256=<hex HMAC-SHA256(key, body)>; empty: datalab_sign_key.",
        "DATALAB_EVENTS_KEY",
    )
    events_max: int = option(
        100_000, "Lifecycle events the Redis stream keeps (about: the oldest go first).", check=positive
    )
    events_retry_max: int = option(
        60,
        "Longest seconds between tries of an event its receiver did not take (the wait doubles up to this).",
        check=positive,
    )
    unpack_max_entries: int = option(10000, "Most entries in an archive a start unpacks (unpack=1).", check=positive)
    metrics_port: int = option(
        0,
        "Serve Prometheus metrics at /metrics on this port (0: not served).",
        check=holds(lambda v: 0 <= v <= 65535, "must be a port number (0: off)"),
    )
    metrics_host: str = option(
        "127.0.0.1",
        "Address of the metrics port; keep it away from the public.",
        check=_ip_address_problem,
    )
    metrics_token: str = option(
        "",
        f"Also answer GET {METRICS_PATH} on the proxy's port to 'Authorization: Bearer <token>' "
        f"(empty: not served there). Default: ${METRICS_TOKEN_ENV}.",
        METRICS_TOKEN_ENV,
        check=holds(
            lambda v: not v or (len(v) >= MIN_METRICS_TOKEN and all("!" <= c <= "~" for c in v)),
            f"must be at least {MIN_METRICS_TOKEN} printable ASCII characters, no spaces",
        ),
    )
    reuse_port: bool = option(
        False,
        "Listen with SO_REUSEPORT, so several proxy processes share the port (run.sh --workers N); "
        "needs --set server=false, which this turns on once the listener can be shared.",
    )
    profiles: str = option(
        "",
        "A TOML or JSON file of named profiles (image, mem_limit, cpus, pids_limit, disk_limit, env, "
        'idle_timeout, max_age, pool_size) a start may ask for with profile=; empty: only "default", '
        'these options (docs/operations.md "Profiles").',
        "DATALAB_PROFILES",
        check=holds(lambda v: v == "" or os.path.isabs(v), "must be empty or an absolute path"),
    )
    # The chosen backend's own options (and the others'), keyed by field name: backends/choice.py.
    backend_options: dict[str, typing.Any] = dataclasses.field(default_factory=dict)
    # The profiles file's tables, checked (profiles.read_file); its default table is in the fields above.
    profile_tables: dict[str, dict[str, typing.Any]] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def limits(self) -> Limits:
        """What every backend gets: whose instances, and their limits (a disk limit of auto is made a
        size by the backend: what fits beside Jupyter in a container's memory limit): the default
        profile's."""
        return self.profile(profiles.DEFAULT).limits

    @functools.cached_property
    def profile_table(self) -> dict[str, profiles.Profile]:
        """Every declared profile by name, "default" (these options) first."""
        limits = Limits(
            label_prefix=self.key_prefix,
            mem_limit=self.mem_limit,
            cpus=float(self.cpus),
            pids_limit=self.pids_limit,
            disk_limit=self.disk_limit,
            start_timeout=float(self.start_timeout),
        )
        default = profiles.Profile(profiles.DEFAULT, limits, self.idle_timeout, self.max_age, self.pool_size)
        return profiles.build(self.profile_tables, default, self.backend_options.get("image", ""))

    def profile(self, name: str) -> profiles.Profile:
        """The profile an instance or a start names: its limits, pool and culling times. A name no
        longer declared (the file changed since the instance started) is the default's."""
        return self.profile_table.get(name) or self.profile_table[profiles.DEFAULT]

    @property
    def boot_slots(self) -> int:
        """Cold starts booting at once in this process: datalab_boots_at_once, or one per CPU."""
        return self.boots_at_once or os.cpu_count() or 1

    @property
    def events_signing_key(self) -> str:
        """The events' HMAC key: datalab_events_key, else the sign key."""
        return self.events_key or self.sign_key

    @functools.cached_property
    def session_cookie(self) -> str:
        """The cookie's name: a Secure cookie gets the __Host- prefix, so no subdomain or plain-HTTP
        page can set or shadow it (browsers then insist on Secure, Path=/ and no Domain)."""
        return HOST_COOKIE_PREFIX + self.cookie_name if self.cookie_secure else self.cookie_name

    @functools.cached_property
    def origins(self) -> frozenset[str]:
        """Origins other than the request's own that may open a WebSocket to an instance (read on
        every routed request: worked out once)."""
        return parse_origins(self.allowed_origins)


def _shared_fields() -> list[dataclasses.Field]:
    return options.option_fields(Settings)


def add_options(add_option: Callable[..., None]) -> None:
    """Declare every datalab_* option: the Settings' and the backends'."""
    options.add_options(add_option, _shared_fields() + choice.option_fields())


def _default_of(name: str) -> typing.Any:
    """An option's default as the proxy would take it (its environment variable, else built in)."""
    field = name.removeprefix(options.PREFIX)
    return options.typed_default(next(f for f in _shared_fields() + choice.option_fields() if f.name == field))


def settings_from_environment(**changes: typing.Any) -> Settings:
    """Settings as a proxy started in this environment would have them (scripts act as the proxy does)."""
    values = option_values(_default_of)
    return with_profiles(Settings(**{**values, **changes}))


def _profile_rules() -> profiles.Rules:
    """A profile's fields are checked by the rules of the options of the same name."""
    fields = {f.name: f for f in _shared_fields()}
    return {name: functools.partial(options.problem_of, fields[name]) for name in (*profiles.LIMITS, *profiles.TIMES)}


def with_profiles(s: Settings) -> Settings:
    """The settings with the datalab_profiles file read and checked (ValueError names the profile and
    field at fault); its default table's fields replace the options'."""
    if not s.profiles:
        return s
    tables = profiles.read_file(s.profiles, _profile_rules())
    own = {f: v for f, v in tables.get(profiles.DEFAULT, {}).items() if f in (*profiles.LIMITS, *profiles.TIMES)}
    return dataclasses.replace(s, profile_tables=tables, **own)


def option_values(get: Callable[[str], typing.Any]) -> dict[str, typing.Any]:
    """Settings' keyword arguments from option values (`get` reads datalab_<name>)."""
    values = {f.name: get(option_name(f.name)) for f in _shared_fields()}
    values["backend_options"] = {f.name: get(option_name(f.name)) for f in choice.option_fields()}
    return values


def parse_settings(values: dict[str, typing.Any]) -> Settings:
    """Settings from option values (keyed by field name); ValueError says which one is wrong and why."""
    s = Settings(**values)
    options.check_options(s)  # each option by its own choices and rule
    s = with_profiles(s)
    for cls in choice.BACKENDS.values():
        choice.options_of(cls, s.backend_options)  # each refuses its own bad values
    _check_redis_url(s.redis_url)
    # What one option needs of another:
    _require(
        not (s.cookie_samesite == "None" and not s.cookie_secure),
        "cookie_samesite",
        "None needs datalab_cookie_secure=true (browsers refuse it otherwise)",
    )
    _check_in_memory_fit(s)
    _require(
        s.routing != "subdomain" or bool(s.public_host), "public_host", "is required with datalab_routing=subdomain"
    )
    return s


def _check_in_memory_fit(s: Settings) -> None:
    """Container instances keep their writable places in memory: they must fit in the memory limit
    (backends/memory_budget.py), every profile's. Not the process backend's concern (its disk limit
    is a file size)."""
    if s.backend == "process":
        return
    for name, profile in s.profile_table.items():
        if problem := memory_budget.misfit(profile.limits.mem_limit, profile.limits.disk_limit):
            raise ValueError(problem if name == profiles.DEFAULT else f"datalab_profiles: profile {name!r}: {problem}")


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


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise option_error(field, message)


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
                log.info('datalab sets %s=%s (docs/operations.md "Deployment")', name, str(value).lower())
                ctx.options.update(**{name: value})
        for name, value in MITMPROXY_DEFAULTS.items():
            if name in ctx.options and getattr(ctx.options, name) is None:
                ctx.options.update(**{name: value})
        for name, value in MITMPROXY_REQUIRED.items():
            if name in updated and getattr(ctx.options, name) != value:
                log.warning(
                    'datalab needs --set %s=%s (docs/operations.md "Options"); setting it', name, str(value).lower()
                )
                ctx.options.update(**{name: value})

"""Routing: session cookie -> session -> instance -> the flow's upstream, HTTP and WebSocket alike.

Routes are cached in memory for route_cache_ttl seconds, keyed by session id, so a busy notebook
does not cost a Redis round trip per request. A session's binding never changes, and an instance's
address never changes while it lives; when an instance is removed, every proxy hears it on the
store's pub/sub channel and drops its routes at once (the TTL only bounds a missed message).
Only a person's requests are the instance's activity (activity.py), not a tab's own polls.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http
from redis.exceptions import RedisError

import activity
import counters
import ended
import errors
import hosts
import inputs
from answers import answering_errors
from backends import Instance
from errors import ApiError
from errors import InstanceGone
from marks import HANDLED
from marks import ROUTED
from marks import SESSION
from runtime import Runtime
from upload import UploadSink
from upstream import route_to_instance

log = logging.getLogger(__name__)

CACHE_MAX = 10_000
MAX_SESSION_COOKIES = 3  # values of the session cookie tried per request (tossed cookies come first)


class RouteCache:
    """session id -> Instance, with a TTL and a size bound; dropped per instance on removal. The
    sessions are indexed by instance, so an instance's end costs its own routes, not a walk over
    the whole cache (each proxy drops them on every instance's end: a cull round may end hundreds)."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._routes: dict[str, tuple[Instance, float]] = {}
        self._sessions: dict[str, set[str]] = {}  # instance id -> its session ids in _routes

    def get(self, session_id: str) -> Instance | None:
        hit = self._routes.get(session_id)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, session_id: str, instance: Instance) -> None:
        if self.ttl <= 0:
            return
        self.drop_session(session_id)  # its expired route, if any
        if len(self._routes) >= CACHE_MAX:
            self.drop_session(next(iter(self._routes)))  # oldest insertion first
        self._routes[session_id] = (instance, time.monotonic() + self.ttl)
        self._sessions.setdefault(instance.id, set()).add(session_id)

    def drop_session(self, session_id: str) -> None:
        hit = self._routes.pop(session_id, None)
        if hit is None:
            return
        sessions = self._sessions.get(hit[0].id)
        if sessions is not None:
            sessions.discard(session_id)
            if not sessions:
                del self._sessions[hit[0].id]

    def drop_instance(self, instance_id: str) -> None:
        for sid in self._sessions.pop(instance_id, ()):
            self._routes.pop(sid, None)

    def clear(self) -> None:
        self._routes.clear()
        self._sessions.clear()


def _routing(flow: http.HTTPFlow) -> str:
    """The request, as a backend fault's log line names it."""
    return f"routing {flow.request.path.partition('?')[0]}"


class Router:
    def __init__(self, runtime: Runtime, sink: UploadSink):
        self.runtime = runtime
        self.sink = sink  # a refused request is answered there at once, its body never in memory
        self.cache = RouteCache(ttl=0)
        self._listener: asyncio.Task | None = None
        self._checking: dict[str, asyncio.Task] = {}  # instances being checked after a failed connection

    def configure(self, updated: set[str]) -> None:
        self.cache = RouteCache(ttl=self.runtime.settings.route_cache_ttl)

    def running(self) -> None:
        self._listener = asyncio.create_task(self._follow_removals())

    async def done(self) -> None:
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.metadata.get(HANDLED):
            return
        await answering_errors(flow, self._route, _routing, drain=self.sink)

    async def _route(self, flow: http.HTTPFlow) -> None:
        try:
            instance = await self._instance_for(flow)
        except InstanceGone as e:
            flow.response = await self._gone_answer(flow, e)
            return
        route_to_instance(flow, instance)
        # A client's body is never held: held bodies would let slow clients pile them up in memory,
        # with no deadline. (Answers are held up to stream_large_bodies: config.MITMPROXY_DEFAULTS.)
        flow.request.stream = True
        flow.metadata[ROUTED] = instance.id
        request = flow.request
        if activity.counts(request.method, request.path.partition("?")[0], request.query, request.headers):
            self.runtime.activity.touch(instance.id)
        counters.PROXIED.inc()

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Counted only: frames are no activity here. Running code and typing in a terminal are,
        and Jupyter records them per kernel and terminal (the culler reads that: culler.py)."""
        if ROUTED in flow.metadata:
            counters.websocket_message(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The frontend's origins may frame an instance's answer; it must not
        set (or fixate) the proxy's own session cookie, and behind HTTPS its own cookies (Jupyter's
        _xsrf) are Secure too."""
        if ROUTED not in flow.metadata or not flow.response:
            return
        s = self.runtime.settings
        csp = flow.response.headers.get("Content-Security-Policy")
        if csp and s.origins:
            flow.response.headers["Content-Security-Policy"] = hosts.allow_framing(csp, s.origins)
        cookies = flow.response.headers.get_all("Set-Cookie")
        if cookies:
            kept = [c for c in cookies if inputs.cookie_name_of(c) not in (s.cookie_name, s.session_cookie)]
            flow.response.headers.set_all(
                "Set-Cookie", [inputs.secure_cookie(c) for c in kept] if s.cookie_secure else kept
            )

    def error(self, flow: http.HTTPFlow) -> None:
        """An instance that gave no answer may have died (Docker's port proxy accepts a connection
        even then, and closes it): ask Redis again next time, and have the backend say whether it
        is gone (then it ends, and its sessions answer 410)."""
        if ROUTED not in flow.metadata or flow.response is not None:
            return
        if SESSION in flow.metadata:
            self.cache.drop_session(flow.metadata[SESSION])
        instance_id = flow.metadata[ROUTED]
        if instance_id not in self._checking:
            self._checking[instance_id] = asyncio.create_task(self._end_if_gone(instance_id))
            self._checking[instance_id].add_done_callback(lambda _: self._checking.pop(instance_id, None))

    async def _end_if_gone(self, instance_id: str) -> None:
        try:
            await self.runtime.instances.end_if_gone(instance_id)
        except Exception as e:  # culling's reconciliation finds it later
            log.warning("datalab: could not check instance %s: %s", instance_id, e)

    async def _instance_for(self, flow: http.HTTPFlow) -> Instance:
        if not self.runtime.ready:
            raise errors.not_configured()
        s = self.runtime.settings
        self._check_origin(flow)
        label = self._host_label(flow)
        # Every value counts: a page on another host of ours may have added (tossed) a cookie of the
        # same name for a wider domain or a longer path, which browsers then send first.
        candidates = [v for v in flow.request.cookies.get_all(s.session_cookie) if inputs.is_token(v)]
        if not candidates:
            raise ApiError(403, "NO_SESSION", "no datalab session: open this instance through /datalab/view/<nonce>/")
        del flow.request.cookies[s.session_cookie]  # the session id is the proxy's, not the instance's
        refusal = None
        for session_id in candidates[:MAX_SESSION_COOKIES]:
            try:
                instance = await self._session_instance(session_id)
            except ApiError as e:
                refusal = refusal or e
                continue
            if label is None or label == hosts.instance_label(instance.id):
                flow.metadata[SESSION] = session_id
                return instance
            refusal = refusal or ApiError(403, "NO_SESSION", "this session belongs to another instance's host")
        raise refusal

    async def _session_instance(self, session_id: str) -> Instance:
        instance = self.cache.get(session_id)
        if instance is None:
            instance = await self._lookup(session_id)
            self.cache.put(session_id, instance)
        return instance

    def _check_origin(self, flow: http.HTTPFlow) -> None:
        """A WebSocket is not covered by Jupyter's XSRF check: refuse one that a page of another
        origin opens, before anything reaches the instance. Behind HTTPS (datalab_cookie_secure), a
        plain-HTTP page of the same host is another origin too (Jupyter compares hosts only), for
        WebSockets and every other request that names its origin."""
        s = self.runtime.settings
        origin = flow.request.headers.get("Origin")
        host = flow.request.host_header or ""
        if s.cookie_secure and origin is not None and not origin.strip().lower().startswith("https://"):
            raise ApiError(403, "BAD_ORIGIN", "behind HTTPS, only https:// pages may send requests here")
        if flow.request.headers.get("Upgrade", "").lower() != "websocket":
            return
        if hosts.origin_allowed(origin, host, frozenset()):
            return  # this host's own page (or no browser at all)
        if not hosts.origin_allowed(origin, host, s.origins):
            raise ApiError(403, "BAD_ORIGIN", "a WebSocket may be opened only by a page of this host's own origin")
        # Allowed by the operator's list: Jupyter, which only knows its own host, is told so.
        flow.request.headers["Origin"] = f"http://{host}"

    def _host_label(self, flow: http.HTTPFlow) -> str | None:
        """In subdomain routing, the instance label of the Host asked for (None in cookie routing)."""
        s = self.runtime.settings
        if s.routing != "subdomain":
            return None
        label = hosts.classify(flow.request.host_header or "", s.public_host).label
        if not label:
            raise ApiError(404, "UNKNOWN_HOST", f"instances are served on their own hosts under {s.public_host}")
        return label

    async def _lookup(self, session_id: str) -> Instance:
        store = self.runtime.store
        instance_id = await store.session_target(session_id)
        if instance_id is None:
            raise ApiError(403, "NO_SESSION", "this datalab session is unknown or expired; open the instance again")
        instance = await self.runtime.instances.record(instance_id)
        if instance is None:
            raise errors.instance_gone(instance_id)
        return instance

    async def _gone_answer(self, flow: http.HTTPFlow, gone: InstanceGone) -> http.Response:
        """A person navigating into an ended instance is told, in a page, why it ended and what became
        of the work; API and WebSocket requests keep the JSON 410."""
        request = flow.request
        if not gone.instance_id or not ended.is_navigation(request.method, request.headers, request.path):
            return gone.response()
        try:
            how = await self.runtime.store.ended(gone.instance_id)
            work = await self.runtime.store.work(how.work) if how and how.work else None
        except RedisError:
            return gone.response()
        page = ended.page(how.cause if how else "", work.state if work else "")
        counters.refused(gone.code, gone.status)
        return http.Response.make(410, page, ended.headers(self.runtime.settings.origins))

    async def _follow_removals(self) -> None:
        """Drop cached routes of removed instances; reconnect with backoff when Redis goes away."""
        delay = 0.5
        while True:
            try:
                if self.runtime.store is not None:
                    self.cache.clear()  # anything may have happened while we were not listening
                    async for instance_id in self.runtime.store.gone_events():
                        delay = 0.5
                        self.cache.drop_instance(instance_id)
            except Exception as e:  # whatever broke the subscription, keep following removals
                log.warning("datalab: lost Redis pub/sub (%s); retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

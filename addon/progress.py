"""Start progress: a start sent with `Accept: text/event-stream` is answered with Server-Sent Events as
it goes (queued, booting, uploading, then ready or error) instead of one JSON answer at the end.

mitmproxy sends an answer an addon sets in a hook whole, once the hook returns; only an upstream's
answer streams. A start's body already goes to the upload sink (upload.py), so the sink's answer is
the stream: the api opens a `Channel` for the start when its headers are checked and names it to the
sink (PROGRESS_HEADER); the sink, once the body has arrived, answers 200 text/event-stream and writes
out what the channel carries until it closes; the api, seeing that answer's head, streams it on
(`responseheaders`) and runs the start, putting each phase in the channel. A client that goes
away closes the sink's connection: the channel's start is cancelled, and its clean-up (instances.py)
leaves nothing running, as for a client gone while it waits for the JSON answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import inputs

PROGRESS_HEADER = "X-Datalab-Progress"  # to the sink: the token of the start's channel
EVENT_STREAM = "text/event-stream"
FIRST_EVENT_WITHIN = 30.0  # seconds the sink waits for the api to begin a stream it answered (a bug, else)
QUEUED, BOOTING, UPLOADING, READY, ERROR = "queued", "booting", "uploading", "ready", "error"


def wants_progress(accept: str) -> bool:
    """Whether the Accept header asks for the event stream (any of its media types, any quality)."""
    return any(part.split(";", 1)[0].strip().lower() == EVENT_STREAM for part in accept.split(","))


def frame(event: str, data: dict) -> bytes:
    """One Server-Sent Event: its name and its JSON data (one line: json.dumps escapes newlines)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class Channel:
    """One start's events, from the api (`put`, `close`) to the sink's connection (`frames`)."""

    def __init__(self) -> None:
        self._frames: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None  # the start writing into it, cancelled if nobody reads

    def put(self, event: str, **data: object) -> None:
        self._frames.put_nowait(frame(event, data))

    def close(self) -> None:
        self._frames.put_nowait(None)

    async def frames(self) -> AsyncIterator[bytes]:
        """Each event as it comes, until the channel closes (the first within FIRST_EVENT_WITHIN)."""
        async with asyncio.timeout(FIRST_EVENT_WITHIN) as first:
            chunk = await self._frames.get()
            first.reschedule(None)
            while chunk is not None:
                yield chunk
                chunk = await self._frames.get()

    def abandon(self) -> None:
        """Its reader went away: the start stops, and its clean-up runs."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Channels:
    """The channels of the starts whose answers are streams, by the token the sink is told."""

    def __init__(self) -> None:
        self._open: dict[str, Channel] = {}

    def open(self) -> str:
        token = inputs.new_token()
        self._open[token] = Channel()
        return token

    def get(self, token: str) -> Channel | None:
        return self._open.get(token)

    def discard(self, token: str) -> None:
        """The start's flow is over (answered, failed or cut): its channel goes, and its start with it."""
        channel = self._open.pop(token, None)
        if channel is not None:
            channel.abandon()

"""datalab's Jupyter server extension: the proxy takes the working directory out as one archive, and
puts an uploaded archive in. Registered by jupyter_server_config.py (beside this file); the pure
work is datalab_archive.py's.

Both handlers are Jupyter API handlers: without the proxy's X-Datalab-Auth secret they answer 403
(Jupyter's own JSON), and Jupyter's XSRF check applies to the POST (the proxy sends an `_xsrf`
cookie and a matching X-XSRFToken header, as for the contents API). The working directory is the
server's root_dir (ContentsManager.root_dir).

GET /api/datalab/work
    200, Content-Type application/gzip: the whole working directory as one tar.gz (gzip level 1),
    streamed as it is made (chunked on HTTP/1.1, to the connection's close on HTTP/1.0), at the
    reader's pace. Entries are named relative to the working directory ("a.csv", "data/b.csv",
    folders "data"); only plain files and folders go in: symbolic links, devices, FIFOs and sockets
    are skipped, no link is followed. A file that vanishes or cannot be read is skipped; one that
    shrinks while it is read is padded with zeros. If archiving fails midway the connection is
    closed: the body then lacks gzip's trailer, so a reader can tell a whole archive from a cut one.

POST /api/datalab/unpack?format=zip|tar|tar.gz&max_entries=N&max_bytes=B
    Body: the archive (any Content-Length up to Jupyter's ServerApp.max_body_size, 512 MiB by
    default; taken into a temporary file in TMPDIR, not memory). Unpacked into the working
    directory, all of it or nothing: every entry is checked (name, kind, declared size) before
    anything is written, and whatever was written is removed again if writing fails. Entries must
    be plain files and folders, relative, every part of their names passing the proxy's filename
    rule (addon/inputs.py check_filename); a leading "./" is dropped (`tar -C dir .`). At most N
    entries (folders count) and B bytes of files in all, from the declared sizes, then from the
    bytes written. Nothing already in the working directory is replaced (existing folders are
    merged into). Files are 0644, or 0755 where the archive marks them executable; folders 0755.
    One unpack runs at a time. Answers (JSON objects):
      201 {"entries": n, "bytes": b}     n: files and folders written; b: bytes of the files
      400 {"code": "BAD_REQUEST", ...}   format, max_entries or max_bytes missing or invalid (at once,
                                         before the body is read)
      400 {"code": "BAD_ARCHIVE", "message": ...}   an entry refused (the message names it, escaped
                                         and cut short), a corrupt or truncated archive, the wrong format
      409 {"code": "ALREADY_EXISTS", "message": ...}   an entry's place is taken in the working directory
      413 {"code": "ARCHIVE_TOO_LARGE", "message": ...}   more than N entries or B bytes, or no room
                                         left (ENOSPC) for the archive or its files
      500 {"code": "UNPACK_FAILED", "message": ...}   the working directory could not be written
                                         otherwise (nothing of the archive is left in it)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.iostream import StreamClosedError

from datalab_archive import FORMATS
from datalab_archive import FULL
from datalab_archive import Limits
from datalab_archive import Refused
from datalab_archive import pack
from datalab_archive import unpack

AUTH_RESOURCE = "contents"  # what Jupyter's authorizer is asked about: the working directory's files
_NUMBER = re.compile(r"[0-9]{1,18}")
_UNPACKING = asyncio.Lock()  # one unpack at a time: two archives' checks would not see each other


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "datalab_work"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    base = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "/api/datalab/work"), WorkHandler),
            (url_path_join(base, "/api/datalab/unpack"), UnpackHandler),
        ],
    )


class WorkHandler(APIHandler):
    """GET: the working directory as one tar.gz, made as it is sent."""

    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.set_header("Content-Type", "application/gzip")
        self.set_header("Content-Disposition", 'attachment; filename="work.tar.gz"')
        self.set_header("Cache-Control", "no-store")
        pieces = pack(self.contents_manager.root_dir)
        loop = asyncio.get_running_loop()
        try:
            # Each piece is made in a thread (file reads, compression) and sent before the next is
            # made: a slow reader holds the archive back instead of the server buffering it.
            while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                self.write(piece)
                await self.flush()
        except StreamClosedError:
            return  # the reader went away
        except Exception:
            self.log.exception("datalab_work: archiving the working directory failed; the connection is closed")
            self.request.connection.close()
            return
        finally:
            with contextlib.suppress(ValueError):  # (closes its open files)
                pieces.close()
        with contextlib.suppress(StreamClosedError):
            await self.finish(set_content_type="application/gzip")


@web.stream_request_body
class UnpackHandler(APIHandler):
    """POST: an archive unpacked into the working directory (see the module's docstring)."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self._body: Any = None  # the temporary file the archive goes into
        self._failure: OSError | None = None  # why the body could not be kept
        self._request: tuple[str, Limits] | None = None
        self._busy = False  # post() runs: it closes the file itself

    async def prepare(self) -> None:
        """Authentication (and XSRF) and the parameters are checked before a byte of the body is read."""
        await super().prepare()
        if self._finished:
            return
        try:
            self._request = self._parameters()
        except ValueError as e:
            self._answer(400, {"code": "BAD_REQUEST", "message": str(e)})
            return
        self._body = tempfile.TemporaryFile(prefix="datalab-unpack-")

    def _parameters(self) -> tuple[str, Limits]:
        fmt = self.get_query_argument("format", "")
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        numbers = []
        for name in ("max_entries", "max_bytes"):
            value = self.get_query_argument(name, "")
            if not _NUMBER.fullmatch(value):
                raise ValueError(f"{name} must be a whole number of at most 18 digits")
            numbers.append(int(value))
        return fmt, Limits(*numbers)

    def data_received(self, chunk: bytes) -> None:
        if self._body is None or self._failure is not None:
            return
        try:
            self._body.write(chunk)
        except OSError as e:
            self._failure = e  # answered once the body has arrived

    @web.authenticated
    @authorized
    async def post(self) -> None:
        self._busy = True
        try:
            await self._unpack()
        finally:
            self._close()

    async def _unpack(self) -> None:
        if self._kept() is not None:
            if self._failure.errno in FULL:
                self._answer(413, {"code": "ARCHIVE_TOO_LARGE", "message": "there is no room for the archive itself"})
            else:
                self._answer(
                    500, {"code": "UNPACK_FAILED", "message": f"the archive could not be kept: {self._failure}"}
                )
            return
        fmt, limits = self._request
        root = self.contents_manager.root_dir
        async with _UNPACKING:
            try:
                self._body.seek(0)
                done = await asyncio.to_thread(unpack, self._body, fmt, root, limits)
            except Refused as e:
                self._answer(e.status, {"code": e.code, "message": str(e)})
            except OSError as e:
                self.log.warning("datalab_work: unpacking into %s failed: %s", root, e)
                message = f"the working directory could not be written ({e.strerror or e})"
                self._answer(500, {"code": "UNPACK_FAILED", "message": message})
            else:
                self._answer(201, {"entries": done.entries, "bytes": done.bytes})

    def _kept(self) -> OSError | None:
        """Why the whole body could not be kept, if so (its last bytes are written here)."""
        if self._failure is None:
            try:
                self._body.flush()
            except OSError as e:
                self._failure = e
        return self._failure

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def _close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def on_connection_close(self) -> None:
        """A client gone before its body arrived: post() never runs to close the file."""
        super().on_connection_close()
        if not self._busy:
            self._close()

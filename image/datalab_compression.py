"""gzip for the text a JupyterLab page is made of, in the instance (issue 19: fewer bytes per page).

A first Lab load is ~5 MB, nearly all JavaScript, CSS and JSON, and jupyter_server sends it
uncompressed (tornado's `compress_response` is off). Compressing here puts the CPU on the instance,
which has its own CPU limit, not on the proxy every instance shares; the proxy passes the bytes as
they are. Tornado's own transform would also compress the user's files: a text file downloaded
from /files/ or an export would lose its Content-Length (the browser's progress) and cost the
instance CPU at every download, so those, and streams, go out as they are.
"""

from __future__ import annotations

from typing import Any

from tornado import httputil
from tornado.web import GZipContentEncoding

# Where the user's own files are downloaded (a path under the server's base URL), and answers that
# must reach the reader as they are written.
USER_FILE_PREFIXES = ("files/", "nbconvert/", "api/datalab/")
STREAMED_TYPES = ("text/event-stream",)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header accepts gzip: its entry `gzip`, else `*`, with a q that is
    not 0 (an entry naming gzip wins over `*` wherever it stands, as RFC 9110 12.5.3 says)."""
    weights: dict[str, bool] = {}
    for entry in accept_encoding.split(","):
        coding, *params = (part.strip().lower() for part in entry.split(";"))
        if coding in ("gzip", "*") and coding not in weights:
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                weights[coding] = float(q) > 0
            except ValueError:
                weights[coding] = False
    return weights.get("gzip", weights.get("*", False))


def is_user_file(path: str, query: str, base_url: str = "/") -> bool:
    """A download of the user's files (or an export of them): sent as it is."""
    within = path[len(base_url) :] if path.startswith(base_url) else path.lstrip("/")
    wants_download = any(part.split("=")[0] == "download" for part in query.split("&") if part)
    return within.startswith(USER_FILE_PREFIXES) or wants_download


class TextCompression(GZipContentEncoding):
    """Tornado's gzip transform, for the page's text only: not the user's files, not streams."""

    base_url = "/"

    def __init__(self, request: httputil.HTTPServerRequest) -> None:
        super().__init__(request)
        self._gzipping = accepts_gzip(request.headers.get("Accept-Encoding", "")) and not is_user_file(
            request.path, request.query, self.base_url
        )

    def _compressible_type(self, ctype: str) -> bool:
        return ctype not in STREAMED_TYPES and super()._compressible_type(ctype)

    def transform_first_chunk(
        self, status_code: int, headers: httputil.HTTPHeaders, chunk: bytes, finishing: bool
    ) -> tuple[int, httputil.HTTPHeaders, bytes]:
        """A part of a file (206, a Range asked for) goes as it is: its Content-Range counts the
        file's own bytes, which a gzip body would no longer match (the client could not join it)."""
        if status_code == 206 or "Content-Range" in headers:
            self._gzipping = False
        return super().transform_first_chunk(status_code, headers, chunk, finishing)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "datalab_compression"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """The transform joins the web app's, once (tornado builds each request's from this list)."""
    app = serverapp.web_app
    TextCompression.base_url = app.settings.get("base_url", "/")
    app.transforms = [t for t in app.transforms if t is not GZipContentEncoding]
    app.transforms.append(TextCompression)
